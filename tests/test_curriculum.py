"""The curriculum from short to long clips (train.curriculum): stages switch clip length and batch
at the configured steps, a run resumed inside a stage continues bitwise, bad curricula are
refused."""

import logging

import pytest
import torch

from matten.checkpoint import load_checkpoint_files
from matten.config import ConfigError, load_config
from matten.training import loop as loop_module
from matten.training import train
from matten.training.curriculum import curriculum_stages, scaled_batch, stage_at

# A tiny causal model on the panning-map set: 4-frame clips at 16x16, batches of 2.
TINY = [
    "model.depth=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.causal.window=2",
    "data.num_frames=4",
    "data.num_videos=6",
    "data.options.blackout=0",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "sample.steps=1",
    "sample.num_samples=1",
    "train.cpu=true",
]


def tiny_config(*overrides):
    return load_config("long", TINY + list(overrides))


def record_batches(monkeypatch):
    """The (batch, frames) of every batch the loop hands to a step."""
    shapes, real_step = [], loop_module.train_step

    def step(run, batch, index):
        shapes.append((batch["video"].shape[0], batch["video"].shape[2]))
        assert batch["actions"].shape == (shapes[-1][0], shapes[-1][1])
        return real_step(run, batch, index)

    monkeypatch.setattr(loop_module, "train_step", step)
    return shapes


def test_stages_switch_clip_length_and_batch_at_the_configured_steps(tmp_path, monkeypatch, caplog):
    shapes = record_batches(monkeypatch)
    # stage 2 has no batch size: 2 x 4 frames kept -> 1 clip of 8; the last runs on to step 7
    cfg = tiny_config("train.curriculum=[[2, 4], [2, 8], [2, 6, 3]]", "train.max_steps=7")
    with caplog.at_level(logging.INFO, logger="matten.training.curriculum"):
        result = train(cfg, output=tmp_path / "run", progress=False)
    assert result.step == 7
    assert shapes == [(2, 4)] * 2 + [(1, 8)] * 2 + [(3, 6)] * 3
    starts = [r.getMessage() for r in caplog.records if "curriculum stage" in r.getMessage()]
    assert len(starts) == 3
    assert starts[1].startswith("curriculum stage 2/3 starts (step 3): 8 frames, batch 1")
    assert "until step 7" in starts[2]
    position = load_checkpoint_files(tmp_path / "run").state["data"]
    assert position["stage"] == 2 and position["stage_step"] == 3
    assert position["samples_seen"] == 9


def test_a_run_resumed_inside_a_stage_continues_bitwise(tmp_path, monkeypatch, caplog):
    curriculum = "train.curriculum=[[2, 4], [4, 8, 2]]"
    full = train(
        tiny_config(curriculum, "train.max_steps=6"), output=tmp_path / "full", progress=False
    )
    half = train(
        tiny_config(curriculum, "train.max_steps=4"), output=tmp_path / "half", progress=False
    )
    assert half.step == 4  # two steps into stage 2
    shapes = record_batches(monkeypatch)
    with caplog.at_level(logging.INFO, logger="matten.training.curriculum"):
        resumed = train(
            tiny_config(curriculum, "train.max_steps=6"),
            output=tmp_path / "half",
            resume="auto",
            progress=False,
        )
    assert shapes == [(2, 8)] * 2
    assert any(
        "stage 2/2 continues at its step 3 (step 5)" in r.getMessage() for r in caplog.records
    )
    assert full.losses[4:] == resumed.losses
    a, b = load_checkpoint_files(tmp_path / "full"), load_checkpoint_files(tmp_path / "half")
    assert a.step == b.step == 6 and a.state["data"] == b.state["data"]
    for name in ("model", "ema"):
        for key, value in getattr(a, name).items():
            assert torch.equal(value, getattr(b, name)[key]), (name, key)


def test_a_one_stage_curriculum_of_the_run_s_own_clips_reads_the_same_batches(tmp_path):
    plain = train(tiny_config("train.max_steps=3"), output=tmp_path / "plain", progress=False)
    staged = train(
        tiny_config("train.max_steps=3", "train.curriculum=[[3, 4, 2]]"),
        output=tmp_path / "staged",
        progress=False,
    )
    assert plain.losses == staged.losses


def test_stage_batch_sizes_and_lookup():
    cfg = tiny_config(
        "train.batch_size=8", "train.curriculum=[[5, 8], [5, 16], [5, 64], [5, 16, 3]]"
    )
    stages = curriculum_stages(cfg)
    assert [(s.start, s.num_frames, s.batch_size) for s in stages] == [
        (0, 8, 4),
        (5, 16, 2),
        (10, 64, 1),
        (15, 16, 3),
    ]  # 8 x 4 frames kept, at least 1
    assert scaled_batch(cfg, 12, world=1) == 2 and scaled_batch(cfg, 12, world=4) == 4
    assert [stage_at(stages, s).index for s in (0, 4, 5, 14, 15, 99)] == [0, 0, 1, 2, 3, 3]
    assert curriculum_stages(tiny_config()) == []  # the default: no curriculum


@pytest.mark.parametrize(
    "bad, message",
    [
        ("[[0, 4]]", r"curriculum\[0\] = \[0, 4\]: steps and batch_size must be >= 1"),
        ("[[5, 4], [5, 1]]", r"curriculum\[1\] = \[5, 1\]: .*num_frames >= 2"),
        ("[[5, 4, 0]]", r"curriculum\[0\] = \[5, 4, 0\]"),
        ("[[5]]", r"curriculum\[0\] must be \[steps, num_frames\]"),
        ("[[5, 4.5]]", r"curriculum\[0\] must be .*integers"),
        ("16", "train.curriculum must be a list of stages"),
    ],
)
def test_bad_curricula_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(f"train.curriculum={bad}")
