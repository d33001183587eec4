"""Stopping `matten sample --frames` from outside: Ctrl-C (SIGINT) keeps a playable partial video,
SIGKILL's leftover temporary file is cleaned by the next run; the matten.interrupts helpers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import matten
from matten.config import load_config
from matten.data import read_video, write_video
from matten.interrupts import Terminated, exit_status, interrupts_deferred, sigterm_as_interrupt
from matten.training import train

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

# Imports matten from this checkout, and makes Ctrl-C raise KeyboardInterrupt even where the test
# runner was started with SIGINT ignored (a background job), which the child would inherit.
LAUNCHER = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from matten.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("interrupt") / "run"
    train(
        load_config(
            "long",
            [
                "model.depth=1",
                "model.hidden_size=32",
                "model.num_heads=2",
                "model.causal.window=2",
                "data.num_frames=4",
                "data.num_videos=4",
                "data.options.blackout=0",
                "train.batch_size=2",
                "train.max_steps=1",
                "sample.num_samples=1",
                "sample.steps=1",
                "model.causal.memory=none",
                "train.cpu=true",
            ],
        ),  # no scan: quick to start
        output=run,
        progress=False,
    )
    return run


def start_sampling(run, output) -> subprocess.Popen:
    """`matten sample --frames` with far more frames than it will get to make."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(Path(matten.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            "sample",
            "--checkpoint",
            str(run),
            "--output",
            str(output),
            "--frames",
            "100000",
            "--chunk-size",
            "1",
            "--steps",
            "1",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_frames(proc: subprocess.Popen, output: Path) -> Path:
    """The temporary file ``proc`` writes ``output`` to, once it holds encoded frames (the
    container is only written to from the first encoded packet on)."""
    pattern = f".{output.name}.{proc.pid}-*.tmp"
    deadline = time.monotonic() + 120  # only against a hang: this normally takes seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sampling ended early ({proc.returncode}): {proc.communicate()[1]}")
        for tmp in output.parent.glob(pattern):
            if tmp.stat().st_size > 0:
                return tmp
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no frames were written")


def test_ctrl_c_keeps_a_playable_partial_video_and_sigkill_leftovers_are_cleaned(
    causal_run, tmp_path
):
    output = tmp_path / "long.mp4"
    write_video(output, np.full((3, 8, 8, 3), 128, dtype=np.uint8))
    finished = output.read_bytes()  # an earlier, finished video of the same name

    # SIGKILL: nothing can run, the temporary file stays behind.
    killed = start_sampling(causal_run, output)
    leftover = wait_for_frames(killed, output)
    killed.kill()
    killed.wait()
    assert leftover.exists()

    # Ctrl-C: the next run removes the leftover, then keeps its frames in long.partial.mp4.
    proc = start_sampling(causal_run, output)
    wait_for_frames(proc, output)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "removed 1 temporary file(s) that an earlier, killed run left" in err
    partial = tmp_path / "long.partial.mp4"
    assert f"'{partial}', a partial video; '{output}' was not written" in err
    frames = int(err.split("interrupted: the ")[1].split(" frames")[0])
    assert frames > 0 and read_video(partial).shape[0] == frames
    assert output.read_bytes() == finished
    assert not leftover.exists() and not list(tmp_path.glob(".*.tmp"))


def test_sigterm_raises_terminated_within_the_block_only():
    before, reached = signal.getsignal(signal.SIGTERM), []
    with pytest.raises(Terminated) as info:
        with sigterm_as_interrupt():
            signal.raise_signal(signal.SIGTERM)
            reached.append(True)
    assert not reached
    assert isinstance(info.value, KeyboardInterrupt) and exit_status(info.value) == 143
    assert exit_status(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupts_deferred_delivers_ctrl_c_after_the_block():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("the rest of the block")
        assert done == ["the rest of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
