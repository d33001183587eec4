"""Training: config loading, the loop, EMA, exact resume, atomic checkpoints, two processes."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from matten import cli
from matten.checkpoint import files as ckpt_module
from matten.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint_files
from matten.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_differences,
    config_from_dict,
    config_to_dict,
    load_config,
    packaged_configs,
    resolve_mixed_precision,
)
from matten.config import loader as config_loader
from matten.training import SetupError, create_ema, ema_decay_at, train, update_ema
from matten.training.data import StreamSampler

TINY = [
    "model.depth=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "data.resolution=8",
    "data.num_frames=4",
    "data.num_videos=32",
    "train.batch_size=4",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "sample.num_samples=2",
    "sample.steps=2",
    "train.cpu=true",
]


def tiny_config(*overrides):
    return load_config("demo", TINY + list(overrides))


def weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# config


def test_packaged_configs_and_the_paper_settings():
    assert {"demo", "ffs", "sky", "ucf101", "taichi", "long", "play"} <= set(packaged_configs())
    demo = load_config("demo")
    assert demo.model.variant == 3 and demo.model.conditioning == "adan"
    assert demo.autoencoder.kind == "pixel" and demo.data.name == "synthetic"
    for name, dataset in [
        ("ffs", "faceforensics"),
        ("sky", "sky_timelapse"),
        ("ucf101", "ucf101"),
        ("taichi", "taichi_hd"),
    ]:
        cfg = load_config(name)
        assert cfg.data.name == dataset
        assert (cfg.data.num_frames, cfg.data.resolution, cfg.data.frame_stride) == (16, 256, 3)
        assert cfg.model.name == "Matten-XL/2" and cfg.model.variant == 3
        assert cfg.model.conditioning == "adan"
        assert cfg.autoencoder.kind == "sd-vae" and cfg.autoencoder.path is None
        assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.0
        assert cfg.train.ema_decay == 0.9999
        assert cfg.model.num_classes == (101 if name == "ucf101" else 0)


def test_a_config_extends_its_base(tmp_path):
    play = load_config("play")  # the long config with what differs
    expected = load_config(
        "long",
        [
            "model.causal.window_kind=frame_local",
            "model.causal.memory=none",
            "model.causal.action_dropout_prob=0.15",
            "data.options.trajectory=wander",
            "data.options.blackout=0",
            "diffusion.history_prob=0.9",
            "train.max_steps=8000",
            "train.checkpoint_every=1000",
            "train.keep_last=0",
            "sample.action_cfg_scale=3.0",
        ],
    )
    assert config_to_dict(play) == config_to_dict(expected)
    (tmp_path / "mine.yaml").write_text("base: demo\ntrain:\n  lr: 0.5\n")
    mine = load_config(str(tmp_path / "mine.yaml"))
    assert mine.train.lr == 0.5 and mine.model == load_config("demo").model
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="each other as base"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "bad.yaml").write_text("base: [demo]\n")
    with pytest.raises(ConfigError, match="base must name a config"):
        load_config(str(tmp_path / "bad.yaml"))


def test_config_overrides_types_and_bad_keys(tmp_path):
    assert load_config("demo", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'train.cpu' must be true or false"):
        load_config("demo", ["train.cpu=on"])
    cfg = load_config(
        "demo",
        [
            "train.batch_size=4",
            "train.lr=2e-4",
            "model.depth=3",
            "data.root=null",
            "train.grad_clip=null",
            "train.adam_betas=[0.8, 0.99]",
        ],
    )
    assert cfg.train.batch_size == 4 and cfg.train.lr == 2e-4 and cfg.model.depth == 3
    assert cfg.train.grad_clip is None and cfg.train.adam_betas == (0.8, 0.99)
    with pytest.raises(ConfigError, match="'train.batchsize'"):
        load_config("demo", ["train.batchsize=4"])
    with pytest.raises(ConfigError, match="'optim'"):
        load_config("demo", ["optim.lr=1"])
    with pytest.raises(ConfigError, match="'train.batch_size' must be an integer"):
        load_config("demo", ["train.batch_size=four"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config("demo", ["batch_size=4"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config("demo", ["train.mixed_precision=fp8"])
    options = load_config("long", ["data.options.step=3", "data.options.new=x"]).data.options
    assert options["step"] == 3 and options["new"] == "x" and options["map_size"] == 48
    with pytest.raises(ConfigError, match="section.key"):
        load_config("long", ["train.lr.x=1"])
    blocks = load_config("long", ["model.causal.ssm_block_size=[[2, 2], 4]"]).model.causal
    assert blocks.ssm_block_size == [[2, 2], 4]
    with pytest.raises(ConfigError, match="ssm_block_size"):
        load_config("long", ["model.causal.ssm_block_size=x"])
    with pytest.raises(ConfigError, match="history_prob needs diffusion.forcing"):
        load_config("demo", ["diffusion.history_prob=0.5"])
    with pytest.raises(ConfigError, match=r"history_prob must be in \[0, 1\]"):
        load_config("long", ["diffusion.history_prob=2"])
    with pytest.raises(FileNotFoundError, match="no packaged config 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: Matten-S/2\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'model.widht'"):
        load_config(str(bad))
    # A YAML file round-trips through config_to_dict.
    good = tmp_path / "good.yaml"
    import yaml

    good.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(str(good)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert apply_overrides(RunConfig(), {"sample.steps": 7}).sample.steps == 7
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"


def test_the_long_video_options_live_in_model_causal_and_old_spellings_still_read(
    tmp_path, caplog, monkeypatch
):
    """``model.causal.*`` in YAML and overrides; the flat spelling of run folders and
    checkpoints written before the options moved reads as the new one, with a note."""
    cfg = load_config("long", ["model.causal.window=3", "model.causal.memory=malt"])
    assert (cfg.model.causal.window, cfg.model.causal.memory) == (3, "malt")
    assert cfg.model.causal.num_actions == 6  # the rest of long.yaml's group is kept
    assert RunConfig().model.causal.window == 8
    with pytest.raises(ConfigError, match="'model.causal.windwo'"):
        load_config("long", ["model.causal.windwo=3"])
    with pytest.raises(ConfigError, match="model.causal.memory must be one of"):
        load_config("long", ["model.causal.memory=lstm"])
    old = tmp_path / "old.yaml"  # a run folder's config.yaml from before the move
    old.write_text(
        "model:\n  name: Matten-Causal\n  window: 2\n  memory: none\n  causal:\n    sink: 0\n"
    )
    monkeypatch.setattr(config_loader, "_noted_moves", set())  # the note is once per process
    with caplog.at_level("WARNING"):
        flat = load_config(str(old), ["model.num_actions=3"])
    assert (flat.model.causal.window, flat.model.causal.memory) == (2, "none")
    assert (flat.model.causal.sink, flat.model.causal.num_actions) == (0, 3)
    assert "'model.window' is now 'model.causal.window'" in caplog.text
    assert (
        config_from_dict({"model": {"window": 5, "causal": {"window": 6}}}).model.causal.window == 6
    )  # both spellings in one file: the new one wins
    # overrides apply in order, whichever spelling each uses
    assert (
        apply_overrides(cfg, ["model.causal.window=7", "model.window=5"]).model.causal.window == 5
    )
    assert (
        apply_overrides(cfg, ["model.window=5", "model.causal.window=7"]).model.causal.window == 7
    )
    # a derived config shares nothing with its base
    derived = apply_overrides(cfg, ["train.lr=0.5"])
    assert derived.model is not cfg.model and derived.model.causal is not cfg.model.causal
    derived.model.causal.window = 99
    derived.data.options["step"] = 99
    assert cfg.model.causal.window == 3 and cfg.data.options.get("step") != 99
    changed = config_differences(cfg, load_config("long", ["model.causal.window=5"]))
    assert changed == {"model.causal.window": (3, 5), "model.causal.memory": ("malt", "both")}
    assert config_from_dict(config_to_dict(cfg)) == cfg


# ----------------------------------------------------------------------------------------------
# pieces


def test_stream_sampler_splits_batches_and_resumes():
    full = StreamSampler(10, 4, rank=0, world_size=1, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(24)]
    # every epoch is a permutation of the dataset, and epochs differ
    for e in range(2):
        assert sorted(i for ep, i in stream if ep == e) == list(range(10))
    assert [i for ep, i in stream if ep == 0] != [i for ep, i in stream if ep == 1]
    # two ranks take the two halves of each global batch
    r0, r1 = iter(StreamSampler(10, 4, 0, 2, seed=3)), iter(StreamSampler(10, 4, 1, 2, seed=3))
    for step in range(6):
        assert [next(r0) for _ in range(2)] + [next(r1) for _ in range(2)] == stream[
            4 * step : 4 * step + 4
        ]
    # starting at step 3 continues the stream exactly
    resumed = iter(StreamSampler(10, 4, 0, 1, seed=3, start=12))
    assert [next(resumed) for _ in range(12)] == stream[12:24]
    assert full.position(3) == {"samples_seen": 12, "epoch": 1, "index_in_epoch": 2}
    with pytest.raises(ValueError, match="not divisible"):
        StreamSampler(10, 5, 0, 2)


def test_ema_update_and_schedule():
    model = torch.nn.Linear(3, 2)
    ema = create_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    before = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    assert ema_decay_at(10, 0.9999, 0.99, 50) == 0.99
    assert ema_decay_at(50, 0.9999, 0.99, 50) == 0.9999
    assert ema_decay_at(0, 0.9999) == 0.9999


# ----------------------------------------------------------------------------------------------
# the loop


def test_training_loss_decreases_on_the_synthetic_set(tmp_path):
    cfg = tiny_config(
        "model.depth=1",
        "model.hidden_size=64",
        "data.resolution=16",
        "data.num_frames=4",
        "train.batch_size=8",
        "train.max_steps=200",
        "train.lr=2e-3",
        "train.log_every=10",
    )
    result = train(cfg, output=tmp_path / "run", progress=False)
    losses = np.array(result.losses)
    assert len(losses) == 200 and np.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.5 * first, (first, last)
    # the run folder has what people look at
    assert Image.open(tmp_path / "run" / "loss.png").size == (800, 450)
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step_0000200.gif", "step_0000200.png"]
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [200]


def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path):
    cfg = tiny_config("train.max_steps=6", "data.num_videos=6")  # 6 videos: crosses epochs
    full = train(cfg, output=tmp_path / "full", progress=False)
    half = train(
        tiny_config("train.max_steps=3", "data.num_videos=6"),
        output=tmp_path / "half",
        progress=False,
    )
    assert half.step == 3
    resumed = train(cfg, output=tmp_path / "half", resume="auto", progress=False)
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert full.losses[3:] == resumed.losses
    a = load_checkpoint_files(tmp_path / "full")
    b = load_checkpoint_files(tmp_path / "half")
    assert a.step == b.step == 6
    for name in ("model", "ema"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    assert weights_digest(a.model) != weights_digest(
        load_checkpoint_files(tmp_path / "half" / "checkpoints" / "step_0000003").model
    )
    opt_a, opt_b = a.state["optimizer"]["state"], b.state["optimizer"]["state"]
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[k][name], opt_b[k][name])
    assert (
        a.state["data"] == b.state["data"] == {"samples_seen": 24, "epoch": 4, "index_in_epoch": 0}
    )
    # the loss record continues where it stopped
    rows = (tmp_path / "half" / "loss.csv").read_text().split()
    assert rows[0] == "step,loss" and [r.split(",")[0] for r in rows[1:]] == [
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config("train.max_steps=2"), output=out, progress=False)
    good = latest_checkpoint(out)
    assert good.name == "step_0000002"

    real_save = ckpt_module.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the EMA file of the next checkpoint: the "power cut"
            Path(filename).write_bytes(b"half written")
            raise OSError("simulated crash while writing")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_config("train.max_steps=4"), output=out, resume="auto", progress=False)
    monkeypatch.setattr(ckpt_module, "save_file", real_save)

    assert latest_checkpoint(out) == good
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")] == [
        "step_0000002"
    ]
    ckpt = load_checkpoint_files(out)
    assert ckpt.step == 2 and ckpt.state["step"] == 2
    # and training resumes from it
    again = train(tiny_config("train.max_steps=4"), output=out, resume="auto", progress=False)
    assert again.step == 4 and latest_checkpoint(out).name == "step_0000004"
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_keep_last_k_checkpoints(tmp_path):
    out = tmp_path / "run"
    train(
        tiny_config("train.max_steps=5", "train.checkpoint_every=1", "train.keep_last=2"),
        output=out,
        progress=False,
    )
    assert [s for s, _ in list_checkpoints(out)] == [4, 5]
    assert latest_checkpoint(out).name == "step_0000005"
    ckpt = load_checkpoint_files(out)
    assert set(os.listdir(ckpt.folder)) == {
        "model.safetensors",
        "ema.safetensors",
        "training_state.pt",
        "checkpoint.json",
    }
    meta = json.loads((ckpt.folder / "checkpoint.json").read_text())
    assert meta["model_config"]["depth"] == 1 and meta["class_names"] == [
        "left_right",
        "up_down",
        "diagonal",
        "orbit",
    ]
    # the training state holds only plain data: it loads with weights_only=True
    state = torch.load(ckpt.folder / "training_state.pt", weights_only=True)
    assert set(state) >= {"step", "optimizer", "rng", "data", "config"}
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}


def test_resume_reads_one_ssm_block_size_as_every_layer_s():
    from matten.training.resume import SetupError, check_same_model

    old = {"name": "Matten-Causal", "depth": 2, "ssm_block_size": [2, 2]}
    check_same_model(old, {**old, "ssm_block_size": [[2, 2], [2, 2]]}, Path("ckpt"))
    with pytest.raises(SetupError, match="ssm_block_size"):
        check_same_model(old, {**old, "ssm_block_size": [[2, 2], [4, 4]]}, Path("ckpt"))


def test_refuses_to_overwrite_a_run_and_to_resume_a_different_model(tmp_path):
    out = tmp_path / "run"
    train(tiny_config("train.max_steps=1"), output=out, progress=False)
    with pytest.raises(SetupError, match="already holds checkpoints"):
        train(tiny_config("train.max_steps=2"), output=out, progress=False)
    with pytest.raises(SetupError, match="hidden_size"):
        train(
            tiny_config("train.max_steps=2", "model.hidden_size=16"),
            output=out,
            resume="auto",
            progress=False,
        )
    with pytest.raises(SetupError, match="data.root is required"):
        train(tiny_config("data.name=ucf101"), output=tmp_path / "x", progress=False)


def test_train_command(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--config",
            "demo",
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--no-progress",
            "--set",
            "train.log_every=1",
            *TINY,
        ]
    )
    assert code == 0
    assert latest_checkpoint(out).name == "step_0000002"
    assert "checkpoint" in capsys.readouterr().out
    # resume without --config: the checkpoint's config, extended by --max-steps
    assert (
        cli.main(["train", "--output", str(out), "--max-steps", "3", "--no-progress", "--resume"])
        == 0
    )
    assert latest_checkpoint(out).name == "step_0000003"
    # a bare --resume followed by an override
    assert (
        cli.main(["train", "--output", str(out), "--no-progress", "--resume", "train.max_steps=4"])
        == 0
    )
    assert latest_checkpoint(out).name == "step_0000004"
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", "demo", "--output", str(tmp_path / "b"), "train.bogus=1"])
    assert info.value.code == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--output", str(tmp_path / "c")])
    assert "--config is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# two processes

DRIVER = """
import hashlib, json, os, sys
import torch
from matten.config import load_config
from matten.training import train

cfg = load_config("demo", json.loads(sys.argv[2]))
result = train(cfg, output=sys.argv[1], progress=False)
h = hashlib.sha256()
for name, module in (("model", result.model), ("ema", result.ema)):
    for k, v in sorted(module.state_dict().items()):
        h.update((name + k).encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"hash": h.hexdigest(), "world": int(os.environ.get("WORLD_SIZE", "1")),
               "losses": result.losses}, f)
"""


def test_two_processes_end_with_identical_weights(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    out = tmp_path / "run"
    overrides = TINY + ["train.max_steps=3", "train.cpu=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(driver),
        str(out),
        json.dumps(overrides),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    errors = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "Error" in line or "rank1" in line or "error" in line
    ]
    assert proc.returncode == 0, "\n".join(errors[:40]) + proc.stderr[-2000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
    # the weights moved away from the initial ones, and one checkpoint was written (by rank 0)
    ckpt = load_checkpoint_files(out)
    assert ckpt.step == 3 and ckpt.state["world_size"] == 2 and len(ckpt.state["rng"]) == 2
    assert not torch.equal(ckpt.state["rng"][0]["torch"], ckpt.state["rng"][1]["torch"])
    assert weights_digest(ckpt.model) != weights_digest(
        load_file(str(ckpt.folder / "ema.safetensors"))
    )


def test_bf16_training_resumes_exactly_with_deterministic_kernels(tmp_path):
    # On a GPU: CUDA bf16 with deterministic kernels; elsewhere the same path on the CPU's bf16
    # autocast, so the test runs everywhere and CI checks the mixed-precision resume too.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = [
        "train.cpu=false",
        "train.mixed_precision=auto" if device == "cuda" else "train.mixed_precision=bf16",
        "train.deterministic=true",
    ]
    full = train(tiny_config(*gpu, "train.max_steps=4"), output=tmp_path / "full", progress=False)
    assert next(full.model.parameters()).device.type == device
    train(tiny_config(*gpu, "train.max_steps=2"), output=tmp_path / "half", progress=False)
    resumed = train(
        tiny_config(*gpu, "train.max_steps=4"),
        output=tmp_path / "half",
        resume="auto",
        progress=False,
    )
    assert np.isfinite(full.losses).all() and full.losses[2:] == resumed.losses
    a, b = load_checkpoint_files(tmp_path / "full"), load_checkpoint_files(tmp_path / "half")
    assert a.state["config"]["train"]["mixed_precision"] == ("auto" if device == "cuda" else "bf16")
    assert weights_digest(a.model) == weights_digest(b.model)
    assert weights_digest(a.ema) == weights_digest(b.ema)


# ----------------------------------------------------------------------------------------------
# long video: the causal backbone with diffusion forcing


def test_causal_model_trains_with_a_noise_level_per_frame(tmp_path, monkeypatch):
    from matten.checkpoint import load_for_sampling
    from matten.diffusion import GaussianDiffusion
    from matten.models import CausalVideoBackbone

    seen, weights = [], []
    real_losses = GaussianDiffusion.training_losses

    def spy(self, model, x_start, t, model_kwargs=None, noise=None, frame_weight=None):
        seen.append((tuple(t.shape), sorted(model_kwargs or {})))
        if frame_weight is not None:  # clean history frames: t = 0 and left out of the loss
            assert (t[frame_weight == 0] == 0).all()
            weights.append(frame_weight)
        return real_losses(
            self,
            model,
            x_start,
            t,
            model_kwargs=model_kwargs,
            noise=noise,
            frame_weight=frame_weight,
        )

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    cfg = load_config(
        "long",
        [
            "model.depth=1",
            "model.hidden_size=32",
            "model.num_heads=2",
            "model.causal.window=2",
            "data.num_frames=5",
            "data.num_videos=8",
            "train.batch_size=2",
            "train.max_steps=3",
            "train.log_every=1",
            "sample.num_samples=2",
            "sample.steps=2",
            "train.cpu=true",
            "diffusion.history_prob=1.0",
            "data.options.blackout=1.0",
            "data.options.blackout_frames=[2, 2]",
        ],
    )
    result = train(cfg, output=tmp_path / "run", progress=False)
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    # every clip kept a clean prefix of history, and the last frame is always denoised
    assert len(weights) == 3 and all(
        (w[:, 0] == 0).all() and (w[:, -1] == 1).all() for w in weights
    )
    # diffusion forcing: t is (batch, frames), and the camera moves reach the model as actions
    assert seen == [((2, 5), ["actions"])] * 3
    loaded = load_for_sampling(tmp_path / "run")
    assert isinstance(loaded.model, CausalVideoBackbone)
    assert loaded.model.config["window"] == 2 and loaded.model.config["memory"] == "both"
    for a, b in zip(
        loaded.model.state_dict().values(), result.ema.state_dict().values(), strict=True
    ):
        assert torch.equal(a.cpu(), b.cpu())


def test_a_cosine_schedule_run_samples_with_the_cosine_schedule(tmp_path):
    """The schedule is recorded in the checkpoint and sampling reads it: the pipeline's frames
    equal sample_latents with the cosine chain and differ from the linear chain's."""
    from matten.pipelines import MattenPipeline
    from matten.pipelines.clip import sample_latents

    run = tmp_path / "run"
    train(
        tiny_config(
            "train.max_steps=2", "diffusion.schedule=cosine", "diffusion.loss_weighting=min_snr"
        ),
        output=run,
        progress=False,
    )
    pipe = MattenPipeline.from_pretrained(run)
    assert pipe.loaded.schedule == "cosine"
    videos = pipe(2, [0, 1], steps=3, seed=1, cfg_scale=1.0)
    shape = (2, 3, pipe.loaded.num_frames, *pipe.loaded.latent_size)
    kwargs = dict(
        labels=torch.tensor([0, 1]),
        steps=3,
        seed=1,
        learn_sigma=pipe.loaded.learn_sigma,
        prediction=pipe.loaded.prediction,
    )
    cosine = sample_latents(pipe.loaded.model, shape, schedule="cosine", **kwargs)
    linear = sample_latents(pipe.loaded.model, shape, schedule="linear", **kwargs)
    torch.testing.assert_close(videos, cosine.clamp(-1, 1), rtol=0, atol=1e-5)
    assert (cosine - linear).abs().max() > 1e-3
