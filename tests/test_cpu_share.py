"""The cross-process CPU budget (matten.cpu_share): busy processes split the cores evenly."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_train import tiny_config  # the tiny run the training tests share

from matten.cpu_share import CPUShare

# Registry names of processes that cannot exist (above any pid_max): /proc has nothing on them,
# so they are judged by their file's time, as on first sight.
FAKE_PIDS = ("9000000001", "9000000002")


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def live_peer(folder, name=FAKE_PIDS[0], age_s=0.0):
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
    other = live_peer(tmp_path, FAKE_PIDS[1])
    assert share.update() == 1  # 4 // 3
    peer.close()  # that process ends: its lock is free, its file is removed
    other.close()
    assert share.update() == 4 and torch.get_num_threads() == 4
    assert os.listdir(tmp_path) == [str(os.getpid())]


def test_the_share_is_an_even_split_among_the_busy():
    share = CPUShare(threads=16)
    assert share.share([]) == 16
    assert share.share([None]) == 8  # busy, not measured yet
    assert share.share([0.4, 15.0]) == 5  # 16 // 3, whatever the peers use now
    assert share.share([0.0, 0.0]) == 16  # idle peers
    assert CPUShare(threads=2).share([1.0, 1.0, 1.0]) == 1  # never below one


def test_an_idle_peer_does_not_count(tmp_path, torch_threads):
    torch.set_num_threads(2)
    peer = live_peer(tmp_path, age_s=60)  # registered, but has not updated for a minute
    share = CPUShare(tmp_path, threads=2, interval=0, busy_window=10)
    assert share.update() == 2
    assert (tmp_path / FAKE_PIDS[0]).exists()  # idle, not ended: kept
    peer.close()


def test_files_that_are_not_registrations_are_left_alone(tmp_path, torch_threads):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "123").mkdir()  # a folder named like a pid
    peer = live_peer(tmp_path)
    torch.set_num_threads(2)
    share = CPUShare(tmp_path, threads=2, interval=0)
    assert share.update() == 1  # the live peer still counts
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "123").is_dir()
    peer.close()


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


def test_a_killed_process_is_removed(tmp_path, torch_threads):
    proc = registered_child(tmp_path, "time.sleep(120)")
    try:
        torch.set_num_threads(2)
        share = CPUShare(tmp_path, threads=2, interval=0, busy_window=120)
        assert share.update() == 1  # first sight: registered just now, so busy
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / str(proc.pid)).exists()  # no clean-up ran in the child
    assert share.update() == 2
    assert not (tmp_path / str(proc.pid)).exists()


def test_a_waiting_process_gives_its_cores_to_a_busy_one(tmp_path, torch_threads):
    sleeper = registered_child(tmp_path, "time.sleep(120)")
    spinner = registered_child(tmp_path, "while True: pass")
    try:
        torch.set_num_threads(4)
        share = CPUShare(tmp_path, threads=4, interval=0, busy_window=120)
        assert share.update() == 1  # first sight: both registered recently, both count (4 // 3)
        deadline = time.monotonic() + 20  # the spinner needs a quarter core between looks
        while share.update() != 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert share.update() == 2  # the spinner's CPU time grew, the sleeper's did not: 4 // 2
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


def test_each_thread_gets_the_share_and_keeps_its_own_choice(tmp_path, torch_threads):
    torch.set_num_threads(2)
    share = CPUShare(tmp_path, threads=2, interval=0)
    peer = live_peer(tmp_path)
    assert share.update() == 1
    seen = {}

    def worker():
        seen["first"] = share.update()  # torch's count is per thread: this one starts afresh
        seen["count"] = torch.get_num_threads()
        torch.set_num_threads(2)  # this thread's own choice
        seen["after"] = share.update()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"first": 1, "count": 1, "after": None}
    assert share.update() == 1  # the main thread is still managed
    peer.close()


def test_a_removed_registration_is_made_again(tmp_path, torch_threads):
    torch.set_num_threads(2)
    share = CPUShare(tmp_path, threads=2, interval=0)
    share.update()
    (tmp_path / str(os.getpid())).unlink()  # e.g. a temporary-files cleaner
    share.update()
    assert (tmp_path / str(os.getpid())).exists()


def test_a_forked_child_leaves_the_parents_registration_alone(tmp_path, torch_threads):
    torch.set_num_threads(2)
    share = CPUShare(tmp_path, threads=2, interval=0)
    share.update()
    pid = os.fork()
    if pid == 0:  # the child: forget the parent's registration, then leave as a process does
        share.after_fork()
        share.close()
        os._exit(0)
    os.waitpid(pid, 0)
    assert (tmp_path / str(os.getpid())).exists()
    assert share.update() == 2
    share.close()
    assert not (tmp_path / str(os.getpid())).exists()


def test_an_unusable_folder_means_running_alone(tmp_path, torch_threads):
    (tmp_path / "registry").write_text("a file where the folder should be")
    torch.set_num_threads(1)
    share = CPUShare(tmp_path / "registry", threads=2, interval=0)
    assert share.update() == 2


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
    assert (tmp_path / f"matten-cpu-{os.getuid()}").is_dir()  # its registry, in that folder


def test_the_training_loop_takes_its_share_each_step(tmp_path, monkeypatch):
    import types

    from matten import cpu_share
    from matten.ssm import threads
    from matten.training import train

    calls = []
    monkeypatch.setattr(cpu_share, "update", lambda: calls.append(torch.get_num_threads()))
    # the scan launches' own updates go elsewhere: only the loop's are counted
    monkeypatch.setattr(threads, "cpu_share", types.SimpleNamespace(update=lambda: None))
    cfg = tiny_config("train.max_steps=3")
    train(cfg, output=tmp_path / "run", progress=False)
    assert len(calls) == 3  # once per step
