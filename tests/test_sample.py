"""Sampling: `matten sample`, determinism, classifier-free guidance, outputs and errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from matten import cli
from matten.checkpoint import load_for_sampling
from matten.config import load_config
from matten.data import read_video, tile_videos
from matten.diffusion import create_diffusion
from matten.pipelines import SamplingError, resolve_labels, sample_latents
from matten.training import train

TINY = [
    "model.depth=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "data.resolution=8",
    "data.num_frames=4",
    "data.num_videos=16",
    "train.batch_size=4",
    "train.max_steps=3",
    "sample.num_samples=2",
    "sample.steps=2",
    "train.ema_early_decay=0.5",
    "train.cpu=true",
]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    train(load_config("demo", TINY), output=out, progress=False)
    return out


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uncond") / "run"
    train(load_config("demo", TINY + ["data.num_classes=0"]), output=out, progress=False)
    return out


def sample_cli(run, output, *extra):
    return cli.main(
        [
            "sample",
            "--checkpoint",
            str(run),
            "--output",
            str(output),
            "--no-progress",
            "--steps",
            "3",
            "--num-samples",
            "3",
            *extra,
        ]
    )


def grid(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_ddim_eta0_sampling_is_deterministic_for_a_seed(conditional_run, tmp_path):
    for name in ("a", "b"):
        assert (
            sample_cli(
                conditional_run,
                tmp_path / f"{name}.gif",
                "--seed",
                "5",
                "--sampler",
                "ddim",
                "--eta",
                "0",
            )
            == 0
        )
    assert sample_cli(conditional_run, tmp_path / "c.gif", "--seed", "6", "--sampler", "ddim") == 0
    a, b, c = (grid(tmp_path / f"{n}.gif.png") for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (tmp_path / "a.gif").read_bytes() == (tmp_path / "b.gif").read_bytes()


def test_sample_writes_gif_mp4_and_png(conditional_run, tmp_path, capsys):
    assert sample_cli(conditional_run, tmp_path / "s.mp4", "--sampler", "ddpm") == 0
    assert sample_cli(conditional_run, tmp_path / "s.gif") == 0
    printed = capsys.readouterr().out
    assert "s.gif" in printed and "s.gif.png" in printed
    for suffix in (".gif", ".mp4"):
        frames = read_video(tmp_path / f"s{suffix}")
        assert frames.shape[0] == 4 and frames.shape[-1] == 3  # 4 frames, samples tiled
    image = grid(tmp_path / "s.gif.png")
    # 3 rows (samples) x 4 columns (frames) of enlarged 8x8 frames with 2-pixel padding
    cell = (image.shape[1] - 2) // 4 - 2
    assert image.shape[0] == 2 + 3 * (cell + 2) and cell >= 8
    # Each video keeps its own grid: the GIF's (DDIM) did not replace the MP4's (DDPM).
    assert not np.array_equal(grid(tmp_path / "s.mp4.png"), image)


def test_num_samples_defaults_to_the_run_config(conditional_run, tmp_path, capsys):
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(conditional_run),
                "--output",
                str(tmp_path / "d.gif"),
                "--no-progress",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("2 samples from")  # TINY: sample.num_samples=2
    assert read_video(tmp_path / "d.gif").shape[0] == 4
    image = grid(tmp_path / "d.gif.png")
    cell = (image.shape[1] - 2) // 4 - 2
    assert image.shape[0] == 2 + 2 * (cell + 2)  # a row per sample


def test_a_device_this_machine_lacks_is_a_clear_error(
    conditional_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (
        ("cuda", "--device cuda: no CUDA GPU is usable"),
        ("gpu0", "--device 'gpu0' is not a device name"),
    ):
        with pytest.raises(SystemExit) as info:
            sample_cli(conditional_run, tmp_path / "o.gif", "--device", device)
        assert info.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1]


def test_checkpoint_paths_and_weights(conditional_run):
    by_run = load_for_sampling(conditional_run)
    by_dir = load_for_sampling(conditional_run / "checkpoints")
    by_step = load_for_sampling(conditional_run / "checkpoints" / "step_0000003")
    assert by_run.folder == by_dir.folder == by_step.folder
    assert by_run.num_classes == 4 and by_run.num_frames == 4 and by_run.latent_size == (8, 8)
    assert by_run.class_names[3] == "orbit"
    raw = load_for_sampling(conditional_run, weights="model")
    differs = [
        not torch.equal(p, q)
        for p, q in zip(by_run.model.parameters(), raw.model.parameters(), strict=True)
    ]
    assert any(differs)  # EMA weights are not the trained weights


def test_cfg_scale_one_is_the_conditional_model(conditional_run):
    loaded = load_for_sampling(conditional_run, weights="model")
    model = loaded.model
    shape = (3, 3, 4, 8, 8)
    labels = torch.tensor([0, 1, 3])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    direct = create_diffusion("3").ddim_sample_loop(
        model, shape, noise=noise.clone(), model_kwargs={"y": labels}
    )
    one = sample_latents(model, shape, labels=labels, steps=3, cfg_scale=1.0, noise=noise.clone())
    assert torch.equal(one, direct)
    guided = sample_latents(
        model, shape, labels=labels, steps=3, cfg_scale=4.0, noise=noise.clone()
    )
    assert not torch.allclose(guided, direct)
    # batching does not change DDIM samples
    split = sample_latents(
        model, shape, labels=labels, steps=3, cfg_scale=4.0, noise=noise.clone(), batch_size=1
    )
    assert torch.allclose(split, guided, atol=1e-5)


def test_unconditional_model(unconditional_run, tmp_path, capsys):
    loaded = load_for_sampling(unconditional_run)
    assert loaded.num_classes == 0 and loaded.model.null_class is None
    assert sample_cli(unconditional_run, tmp_path / "u.gif") == 0
    with pytest.raises(SystemExit) as info:
        sample_cli(unconditional_run, tmp_path / "v.gif", "--class", "1")
    assert info.value.code == 2
    assert "unconditional" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli(unconditional_run, tmp_path / "v.gif", "--cfg-scale", "3")
    assert "class-conditional" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(conditional_run, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--class", "4"], "out of range: the model has 4 classes"),
        (["--class", "spin"], "'spin' is not a class index"),
        (["--output", str(tmp_path / "x.jpg")], "must end in one of"),
        (["--eta", "2"], "--eta: eta must be a number in [0, 1]"),
        (["--steps", "0"], "--steps must be in [1, 1000]"),
        (["--fps", "0"], "--fps must be >= 1 (frames per second), got 0"),
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    ]
    for extra, message in cases:
        args = [
            "sample",
            "--checkpoint",
            str(conditional_run),
            "--output",
            str(tmp_path / "o.gif"),
            "--no-progress",
            *extra,
        ]
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, extra
    (tmp_path / "half" / "checkpoints" / "step_0000001").mkdir(parents=True)
    (tmp_path / "half" / "checkpoints" / "step_0000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "half" / "checkpoints" / "step_0000001"),
                "--output",
                str(tmp_path / "o.gif"),
            ]
        )
    assert "incomplete" in capsys.readouterr().err
    # class names work as well as indices
    assert (
        sample_cli(conditional_run, tmp_path / "named.gif", "--class", "orbit", "--class", "0") == 0
    )


def test_labels_and_tiling():
    assert resolve_labels(None, 5, 4).tolist() == [0, 1, 2, 3, 0]
    assert resolve_labels(["2"], 3, 4).tolist() == [2, 2, 2]
    assert resolve_labels(["Orbit", "1"], 3, 4, ["a", "b", "c", "orbit"]).tolist() == [3, 1, 3]
    assert resolve_labels(None, 3, 0) is None
    with pytest.raises(SamplingError):
        resolve_labels(["-1"], 3, 4)
    videos = np.arange(5 * 2 * 3 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3, 3)
    tiled = tile_videos(videos, padding=1)
    assert tiled.shape == (2, 1 + 2 * 4, 1 + 3 * 4, 3)
    assert np.array_equal(tiled[:, 1:4, 1:4], videos[0])
    assert np.array_equal(tiled[:, 5:8, 1:4], videos[3])
