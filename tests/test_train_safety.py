"""Training that never silently does the wrong thing and never loses work: resume refusals and
warnings, Ctrl-C, the loss record across resumes, your own folder of videos, clear errors."""

import csv
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train import TINY, tiny_config  # the tiny run the training tests share

from matten import cli
from matten.checkpoint import latest_checkpoint, load_checkpoint_files
from matten.config import load_config
from matten.data import write_video
from matten.interrupts import GracefulStop
from matten.training import SetupError, callbacks, train
from matten.training import step as step_module


def loss_steps(run: Path) -> list[int]:
    with open(run / "loss.csv", newline="") as f:
        return [int(row[0]) for row in list(csv.reader(f))[1:]]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config("train.max_steps=2"), output=out, progress=False)
    return out


# ----------------------------------------------------------------------------------------------
# resume: what it refuses, what it warns about, and when there is nothing to do


def test_resume_refuses_changes_to_what_the_weights_mean(two_step_run):
    for change in (
        "diffusion.prediction=eps",
        "diffusion.steps=500",
        "diffusion.schedule=linear",
        "model.learn_sigma=false",
        "autoencoder.kind=sd-vae",
    ):
        key = change.split("=")[0]
        with pytest.raises(SetupError, match=re.escape(key)):
            train(
                tiny_config("train.max_steps=3", change),
                output=two_step_run,
                resume="auto",
                progress=False,
            )
    assert latest_checkpoint(two_step_run).name == "step_0000002"


def test_resume_warns_about_other_changes(tmp_path, two_step_run, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    with caplog.at_level(logging.WARNING, logger="matten.training.resume"):
        result = train(
            tiny_config("train.max_steps=3", "train.lr=5e-4"),
            output=run,
            resume="auto",
            progress=False,
        )
    assert result.step == 3
    warned = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(warned) == 1 and "train.lr 0.001 -> 0.0005" in warned[0]
    assert "max_steps" not in warned[0]


def test_resume_says_when_there_is_nothing_left_to_train(two_step_run, capsys):
    before = (two_step_run / "config.yaml").stat().st_mtime_ns
    with pytest.raises(SetupError, match="already at step 2, past train.max_steps=1"):
        train(tiny_config("train.max_steps=1"), output=two_step_run, resume="auto", progress=False)
    result = train(
        tiny_config("train.max_steps=2"), output=two_step_run, resume="auto", progress=False
    )
    assert result.nothing_to_do and result.step == 2 and result.losses == []
    assert (two_step_run / "config.yaml").stat().st_mtime_ns == before  # nothing rewritten
    assert cli.main(["train", "--output", str(two_step_run), "--resume", "--no-progress"]) == 0
    assert "nothing left to train" in capsys.readouterr().out


def test_edits_to_the_run_config_take_effect_on_resume(tmp_path, two_step_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["lr"] = 2.5e-4
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert (
        cli.main(["train", "--output", str(run), "--resume", "--max-steps", "3", "--no-progress"])
        == 0
    )
    saved = load_checkpoint_files(run)
    assert saved.step == 3 and saved.meta["run_config"]["train"]["lr"] == 2.5e-4
    # an edit that changes what the weights mean is refused, naming it
    config["diffusion"]["prediction"] = "eps"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--output", str(run), "--resume", "--max-steps", "4", "--no-progress"])
    assert info.value.code == 2


# ----------------------------------------------------------------------------------------------
# the loss record and stopping


def test_loss_record_has_no_gap_after_a_crash_and_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real_update = step_module.update_ema

    def crash_at_step_7(*args, **kwargs):  # dies two steps after the checkpoint at 5
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("power cut")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(step_module, "update_ema", crash_at_step_7)
    cfg = tiny_config("train.max_steps=9", "train.checkpoint_every=5", "train.log_every=4")
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg, output=run, progress=False)
    assert latest_checkpoint(run).name == "step_0000005"
    monkeypatch.setattr(step_module, "update_ema", real_update)
    train(cfg, output=run, resume="auto", progress=False)
    assert loss_steps(run) == list(range(1, 10))


def test_graceful_stop_waits_once_then_stops_at_once():
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"  # first signal: noted, not raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_request_finishes_the_step_and_writes_a_checkpoint(tmp_path, monkeypatch):
    real_update = step_module.update_ema
    calls = {"n": 0}

    def signal_during_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(step_module, "update_ema", signal_during_step_3)
    run = tmp_path / "run"
    result = train(
        tiny_config("train.max_steps=50", "train.log_every=10"), output=run, progress=False
    )
    assert result.stopped_by == "SIGTERM" and result.step == 3
    assert latest_checkpoint(run).name == "step_0000003"
    assert loss_steps(run) == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.setattr(step_module, "update_ema", real_update)
    assert (
        train(tiny_config("train.max_steps=4"), output=run, resume="auto", progress=False).step == 4
    )


def _read_stderr(proc, buffer: list[str]):
    while True:
        chunk = proc.stderr.read(1)
        if not chunk:
            return
        buffer.append(chunk)


def test_ctrl_c_during_matten_train_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "matten.cli",
        "train",
        "--config",
        "demo",
        "--output",
        str(run),
        "--max-steps",
        "100000",
        *TINY,
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    err: list[str] = []
    reader = threading.Thread(target=_read_stderr, args=(proc, err), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not re.search(r"\b([3-9]|\d\d+)/100000", "".join(err)):  # a few steps done
        assert proc.poll() is None, "".join(err)
        assert time.monotonic() < deadline, "".join(err)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    reader.join(timeout=5)
    assert proc.returncode == 130, "".join(err)
    match = re.search(
        r"stopped by SIGINT at step (\d+): checkpoint (\S+); continue with: "
        r"matten train --output (\S+) --resume",
        out,
    )
    assert match, out
    step = int(match.group(1))
    assert step >= 3 and Path(match.group(2)) == run / "checkpoints" / f"step_{step:07d}"
    assert latest_checkpoint(run).name == f"step_{step:07d}"
    assert loss_steps(run) == list(range(1, step + 1))
    assert "Traceback" not in "".join(err)


# ----------------------------------------------------------------------------------------------
# your own folder of videos, and the videos it skips


def write_moving_square(path, frames=14, size=24, seed=0):
    rng = np.random.default_rng(seed)
    video = np.full((frames, size, size, 3), 40, dtype=np.uint8)
    colour = rng.integers(80, 255, 3)
    for t in range(frames):
        x = t % (size - 6)
        video[t, 8:14, x : x + 6] = colour
    write_video(path, video, fps=8)


def test_the_demo_config_trains_on_a_folder_of_videos(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_moving_square(videos / f"clip{i}.mp4", seed=i)
    (videos / "broken.mp4").write_bytes(os.urandom(2000))
    write_moving_square(videos / "short.mp4", frames=3)
    run = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--config",
            "demo",
            "--output",
            str(run),
            "--max-steps",
            "2",
            "--no-progress",
            "data.name=folder",
            f"data.root={videos}",
            "data.frame_stride=2",
            *[o for o in TINY if "num_videos" not in o],
        ]
    )
    assert code == 0
    assert latest_checkpoint(run).name == "step_0000002"
    assert load_checkpoint_files(run).meta["run_config"]["data"]["options"] == {}
    with open(run / callbacks.SKIPPED_FILE, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["reason", "path"]
    assert sorted(rows[1:]) == [
        ["corrupt", str(videos / "broken.mp4")],
        ["too_short", str(videos / "short.mp4")],
    ]


def test_the_skip_warning_keeps_reasons_and_requirements_apart(tmp_path, caplog):
    from matten.data import VideoClipDataset

    for i in range(2):
        write_moving_square(tmp_path / f"ok{i}.mp4", seed=i)
    write_moving_square(tmp_path / "short.mp4", frames=3)
    (tmp_path / "bad.mp4").write_bytes(os.urandom(2000))
    with caplog.at_level(logging.WARNING):
        ds = VideoClipDataset(tmp_path, 16, num_frames=4, frame_stride=3)
    message = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "corrupt: 1, too short: 1 (a clip of 4 frames at stride 3 needs 10 frames)" in message
    assert sorted(ds.skipped_rows()) == [
        ("corrupt", str(tmp_path / "bad.mp4")),
        ("too_short", str(tmp_path / "short.mp4")),
    ]


def test_switching_the_dataset_drops_the_old_dataset_s_options(caplog):
    with caplog.at_level(logging.WARNING, logger="matten.config"):
        cfg = load_config("demo", ["data.name=folder", "data.root=/x"])
    assert cfg.data.options == {}
    assert "dropping the options of 'synthetic'" in caplog.text
    assert load_config(
        "demo", ["data.name=folder", "data.options.labels_from_folders=true"]
    ).data.options == {"labels_from_folders": True}
    assert load_config("demo", ["data.options=null"]).data.options == {}
    assert load_config("demo", ["data.name=synthetic"]).data.options["max_objects"] == 1


# ----------------------------------------------------------------------------------------------
# bad input: a message, before anything is written


def test_bad_data_settings_are_named_before_anything_is_written(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not videos")
    run = tmp_path / "run"
    with pytest.raises(SetupError, match="'.*notes.txt' is not a folder"):
        train(tiny_config("data.name=folder", f"data.root={a_file}"), output=run, progress=False)
    with pytest.raises(SetupError, match=r"data.resolution=15 gives a 15x15 latent.*multiple of 2"):
        train(tiny_config("data.resolution=15"), output=run, progress=False)
    with pytest.raises(SetupError, match="unknown dataset data.name='moving_shapes'"):
        train(tiny_config("data.name=moving_shapes"), output=run, progress=False)
    assert not run.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["flops", "--model", "Foo/2"], "--model: unknown model 'Foo/2'"),
        (["flops", "--frames", "0"], "--frames and --thop-batch must be >= 1"),
        (["flops", "--resolution", "100"], "--resolution 100 must be a positive multiple of 16"),
    ],
)
def test_flops_command_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_ctrl_c_in_any_command_is_a_message_and_status_130(monkeypatch, capsys):
    from matten.commands import flops

    def interrupted(args, parser):
        raise KeyboardInterrupt

    monkeypatch.setattr(flops, "run", interrupted)
    assert cli.main(["flops"]) == 130
    assert "matten flops: interrupted" in capsys.readouterr().err


def test_resume_reads_options_an_older_checkpoint_lacked_as_their_defaults():
    from matten.training.resume import check_same_model

    old = {"name": "Matten-Causal", "depth": 1, "window": 2, "memory": "both"}
    now = {**old, "window_kind": "same_position", "malt_slots": 16, "malt_segment": 4}
    check_same_model(old, now, Path("ckpt"))
    with pytest.raises(SetupError, match="window_kind"):
        check_same_model(old, {**now, "window_kind": "frame_local"}, Path("ckpt"))
