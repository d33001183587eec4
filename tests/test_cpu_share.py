"""The cross-process CPU budget (matten.cpu_share): busy processes split the cores evenly."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from matten.cpu_share import CPUShare


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def live_peer(folder, name="peer-a", age_s=0.0):
    """A registration held by a live process: another open file description holding the
    lock (flock locks belong to the open file, so this stands in for another process)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / name, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    stamp = time.time() - age_s
    os.utime(handle.name, (stamp, stamp))
    return handle


def test_alone_a_process_keeps_all_its_threads(tmp_path, torch_threads):
    torch.set_num_threads(1)
    share = CPUShare(tmp_path, threads=4, interval=0)
    assert share.update() == 4
    assert torch.get_num_threads() == 4
    assert os.listdir(tmp_path) == [str(os.getpid())]


def test_busy_peers_split_the_threads_and_give_them_back(tmp_path, torch_threads):
    torch.set_num_threads(4)
    share = CPUShare(tmp_path, threads=4, interval=0)
    assert share.update() == 4
    peer = live_peer(tmp_path)
    assert share.update() == 2 and torch.get_num_threads() == 2
    other = live_peer(tmp_path, "peer-b")
    assert share.update() == 1  # 4 // 3
    peer.close()  # that process ends: its lock is free, its file is removed
    other.close()
    assert share.update() == 4 and torch.get_num_threads() == 4
    assert os.listdir(tmp_path) == [str(os.getpid())]


def test_an_idle_peer_does_not_count(tmp_path, torch_threads):
    torch.set_num_threads(2)
    peer = live_peer(tmp_path, age_s=60)  # registered, but has not updated for a minute
    share = CPUShare(tmp_path, threads=2, interval=0, busy_window=10)
    assert share.update() == 2
    assert (tmp_path / "peer-a").exists()  # idle, not ended: kept
    peer.close()


def test_a_killed_process_is_removed(tmp_path, torch_threads):
    code = (
        "import sys, time, torch; from matten.cpu_share import CPUShare\n"
        f"s = CPUShare({str(tmp_path)!r}, threads=2, interval=0); s.update()\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        torch.set_num_threads(2)
        share = CPUShare(tmp_path, threads=2, interval=0)
        assert share.update() == 1  # the child is busy
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / str(proc.pid)).exists()  # no clean-up ran in the child
    assert share.update() == 2
    assert not (tmp_path / str(proc.pid)).exists()


def registered_child(folder, work: str):
    """A process that registers in ``folder``, then runs ``work`` (Python) until killed."""
    code = (
        "import time, torch; from matten.cpu_share import CPUShare\n"
        f"s = CPUShare({str(folder)!r}, threads=2, interval=0); s.update()\n"
        f"print('ready', flush=True)\n{work}\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_waiting_process_gives_its_cores_to_a_busy_one(tmp_path, torch_threads):
    sleeper = registered_child(tmp_path, "time.sleep(60)")
    spinner = registered_child(tmp_path, "while True: pass")
    try:
        torch.set_num_threads(4)
        share = CPUShare(tmp_path, threads=4, interval=0)
        assert share.update() == 1  # first sight: both registered just now, both count (4 // 3)
        time.sleep(1.0)
        assert share.update() == 2  # 4 // 2: the spinner's CPU time grew, the sleeper's did not
    finally:
        for proc in (sleeper, spinner):
            proc.kill()
            proc.wait()


def test_a_count_set_by_the_user_stands(tmp_path, torch_threads):
    torch.set_num_threads(2)
    share = CPUShare(tmp_path, threads=2, interval=0)
    assert share.update() == 2
    torch.set_num_threads(1)  # the user's choice
    peer = live_peer(tmp_path)
    assert share.update() is None
    peer.close()
    assert share.update() is None and torch.get_num_threads() == 1


def test_updates_are_rate_limited(tmp_path, torch_threads):
    torch.set_num_threads(2)
    share = CPUShare(tmp_path, threads=2, interval=60)
    assert share.update() == 2
    peer = live_peer(tmp_path)
    assert share.update() == 2  # not looked at again within the interval
    assert share.update(force=True) == 1
    peer.close()


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": "2"}, {"MATTEN_SPLIT_CORES": "0"}])
def test_the_environment_turns_the_process_share_off(tmp_path, env):
    code = "import matten.cpu_share as c; print(c.update())"
    unset = ("OMP_NUM_THREADS", "MATTEN_SPLIT_CORES")
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    clean["MATTEN_SPLIT_CORES_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
    assert not any(tmp_path.iterdir())
    on = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True)
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip().isdigit()  # without them the share runs (and set a count)
