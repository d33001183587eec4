"""Checkpoint folders: an incomplete latest checkpoint is reported, failed writes say what is
kept, file modes; written with tiny state dicts (no training) except the one command test."""

import errno
import logging
import shutil
import stat

import pytest
import torch
from safetensors import SafetensorError

from matten import cli
from matten.checkpoint import files as ckpt_module
from matten.checkpoint.files import (
    FILES,
    CheckpointError,
    CheckpointWriteError,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)


def save(run_dir, step, **kw):
    weights = {"w": torch.full((2,), float(step))}
    return save_checkpoint(run_dir, step, weights, weights, {"step": step}, {}, **kw)


@pytest.fixture
def run(tmp_path):
    """A run folder with checkpoints at steps 1 and 2."""
    save(tmp_path / "run", 1)
    save(tmp_path / "run", 2)
    return tmp_path / "run"


def test_an_incomplete_latest_checkpoint_is_an_error_naming_the_previous_one(run):
    (run / "checkpoints" / "step_0000002" / "checkpoint.json").unlink()
    for path in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError) as info:
            resolve_checkpoint(path)
        message = str(info.value)
        assert "step_0000002' is incomplete (missing checkpoint.json)" in message
        assert f"give '{run / 'checkpoints' / 'step_0000001'}' instead" in message
    # the previous one is still there for whoever asks for it by name
    assert resolve_checkpoint(run / "checkpoints" / "step_0000001").name == "step_0000001"
    # the same without a `latest` pointer: the newest folder is the one checked
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match="step_0000002' is incomplete"):
        latest_checkpoint(run)
    # only incomplete checkpoints: nothing earlier to offer
    shutil.rmtree(run / "checkpoints" / "step_0000001")
    with pytest.raises(CheckpointError, match="has no earlier complete checkpoint"):
        latest_checkpoint(run)
    # an empty step folder given directly is incomplete too, not "no checkpoint found"
    (run / "checkpoints" / "step_0000003").mkdir()
    with pytest.raises(CheckpointError, match=r"step_0000003' is incomplete: missing model"):
        resolve_checkpoint(run / "checkpoints" / "step_0000003")


def test_sampling_an_incomplete_latest_checkpoint_is_a_message(run, tmp_path, capsys):
    (run / "checkpoints" / "step_0000002" / "ema.safetensors").unlink()
    for command in (["sample", "--output", str(tmp_path / "s.gif")], ["eval"]):
        with pytest.raises(SystemExit) as info:
            cli.main([command[0], "--checkpoint", str(run), *command[1:], "--no-progress"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "step_0000002' is incomplete (missing ema.safetensors)" in err, command
        assert "step_0000001" in err


def test_a_deleted_latest_folder_and_a_newer_incomplete_one_are_warned_about(run, caplog):
    shutil.rmtree(run / "checkpoints" / "step_0000002")  # `latest` names a folder that is gone
    with caplog.at_level(logging.WARNING, logger=ckpt_module.__name__):
        assert latest_checkpoint(run).name == "step_0000001"
    assert "names step_0000002, which does not exist" in caplog.text
    caplog.clear()
    # a resume from step 1 rewrote `latest`; a damaged step 3 of the old trajectory remains
    (run / "checkpoints" / "step_0000003").mkdir()
    (run / "checkpoints" / "latest").write_text("step_0000001\n")
    with caplog.at_level(logging.WARNING, logger=ckpt_module.__name__):
        assert latest_checkpoint(run).name == "step_0000001"
    assert "step_0000003' is incomplete" in caplog.text and "ignored" in caplog.text


def test_hidden_temporary_folders_are_not_checkpoints(run):
    root = run / "checkpoints"
    for name in (".tmp-step_0000009-x1", ".tmp-old-step_0000009-7", ".tmp-pruned-step_0000009-7"):
        shutil.copytree(root / "step_0000002", root / name)  # complete, but hidden
    (root / "latest").unlink()
    assert [step for step, _ in list_checkpoints(run)] == [1, 2]
    assert latest_checkpoint(run).name == "step_0000002"
    save(run, 3)  # the next save clears them
    assert not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("failure", ["safetensors", "torch"])
def test_a_full_disk_while_checkpointing_says_the_previous_checkpoint_is_kept(
    run, monkeypatch, failure
):
    def full_disk(*args, **kwargs):
        if failure == "safetensors":  # how safetensors reports ENOSPC
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        raise OSError(errno.ENOSPC, "No space left on device")

    if failure == "safetensors":
        monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    else:  # the training state
        monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save(run, 3)
    message = str(info.value)
    assert f"cannot write checkpoint step_0000003 of run '{run}'" in message
    assert "No space left on device" in message
    assert (
        f"the last complete checkpoint, '{run / 'checkpoints' / 'step_0000002'}', is kept"
        in message
    )
    assert isinstance(info.value, OSError)  # still an OSError for code that catches those
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]
    assert latest_checkpoint(run).name == "step_0000002"


def test_a_failed_checkpoint_in_matten_train_is_a_message(tmp_path, monkeypatch, capsys):
    real_save, calls = ckpt_module.save_file, []

    def full_on_second_checkpoint(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the model weights of the step-2 checkpoint
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", full_on_second_checkpoint)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(
            [
                "train",
                "--config",
                "demo",
                "--output",
                str(out),
                "--no-progress",
                "model.depth=1",
                "model.hidden_size=32",
                "model.num_heads=2",
                "data.resolution=8",
                "data.num_frames=4",
                "data.num_videos=8",
                "train.batch_size=4",
                "train.max_steps=2",
                "train.checkpoint_every=1",
                "train.sample_every=0",
                "sample.num_samples=2",
                "sample.steps=2",
                "train.cpu=true",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert f"'{out / 'checkpoints' / 'step_0000001'}', is kept unchanged" in err


def test_checkpoint_files_are_readable_by_all_like_every_other_output(tmp_path):
    folder = save(tmp_path / "run", 1)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for name in FILES:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((folder.parent / "latest").stat().st_mode) == 0o644
