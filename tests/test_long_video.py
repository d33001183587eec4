import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from matten.data import StreamingVideoWriter, read_video, remove_stale_temp_files
from matten.diffusion import create_diffusion
from matten.interrupts import Terminated, sigterm_as_interrupt
from matten.models.causal import create_causal_model
from matten.pipelines import LongVideoInterrupted, generate_long, iter_long, write_long_video

LATENT = (4, 4, 4)


def tiny(num_classes=3, seed=0, **kwargs):
    """A tiny causal model moved off its adaLN-Zero init (which predicts exactly zero)."""
    torch.manual_seed(seed)
    model = create_causal_model(
        input_size=4,
        in_channels=4,
        depth=1,
        hidden_size=32,
        num_heads=2,
        patch_size=2,
        window=3,
        sink=1,
        memory="both",
        context_length=8,
        num_classes=num_classes,
        **kwargs,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion("4", prediction="eps")


def reference(model, diffusion, num_frames, chunk, y, seed, batch=1, actions=None, teacher=None):
    """Each chunk denoised by the full-history ``forward`` over [clean past (t = 0); chunk]; the
    past is the generated chunks, or the frames of ``teacher``."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    history = torch.zeros(batch, LATENT[0], 0, *LATENT[1:], dtype=dtype)
    chunks = []
    for start in range(0, num_frames, chunk):
        k = min(chunk, num_frames - start)
        acts = None if actions is None else actions[:, : start + k]

        def full(x, t, start=start, k=k, history=history, acts=acts):  # this chunk's
            t_full = torch.cat(
                [torch.zeros(batch, start, dtype=torch.long), t[:, None].expand(-1, k)], dim=1
            )
            out = model(torch.cat([history, x], dim=2), t_full, y=y, actions=acts)
            return out[:, :, start:]

        x = torch.randn(batch, LATENT[0], k, *LATENT[1:], generator=g, dtype=dtype)
        with torch.no_grad():
            for i in range(diffusion.num_timesteps - 1, -1, -1):
                t = torch.full((batch,), i, dtype=torch.long)
                x = diffusion.ddim_sample(full, x, t, eta=0.0, generator=g)["sample"]
        history = torch.cat([history, x], dim=2)
        chunks.append(x)
        if teacher is not None:
            history = teacher[:, :, : start + k]
    return torch.cat(chunks, dim=2)


def test_streaming_matches_full_history_recomputation(diffusion):
    # float64 so that 12 frames of float32 rounding do not blur a 1e-5 comparison
    model = tiny().double()
    y = torch.tensor([1, 2])
    got = generate_long(
        model, diffusion, 12, 2, LATENT, batch=2, y=y, generator=torch.Generator().manual_seed(3)
    )
    want = reference(model, diffusion, 12, 2, y, seed=3, batch=2)
    assert got.shape == (2, 4, 12, 4, 4)
    assert got.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_uneven_last_chunk_and_actions():
    model = tiny(num_classes=0, num_actions=3).double()
    diffusion = create_diffusion("4", prediction="eps")
    actions = torch.randint(0, 3, (1, 7), generator=torch.Generator().manual_seed(0))
    got = generate_long(
        model, diffusion, 7, 3, LATENT, actions=actions, generator=torch.Generator().manual_seed(5)
    )
    want = reference(model, diffusion, 7, 3, None, seed=5, actions=actions)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The same actions given frame by frame as a callable.
    again = generate_long(
        model,
        diffusion,
        7,
        3,
        LATENT,
        actions=lambda f: actions[:, f],
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_state_size_is_constant_and_chunks_are_streamed(model, diffusion):
    sizes, starts = {}, []

    def on_chunk(chunk):
        starts.append(chunk.start)
        assert chunk.frames.shape == (1, 4, 2, 4, 4)
        sizes[chunk.start // 2 + 1] = chunk.state.num_elements()

    total = generate_long(
        model,
        diffusion,
        20,
        2,
        LATENT,
        y=0,
        on_chunk=on_chunk,
        generator=torch.Generator().manual_seed(0),
    )
    assert total == 20 and starts == list(range(0, 20, 2))
    assert sizes[3] == sizes[10] > 0


def test_class_switch_changes_later_chunks_only_and_is_deterministic(model, diffusion):
    def run(y):
        return generate_long(
            model, diffusion, 8, 2, LATENT, y=y, generator=torch.Generator().manual_seed(7)
        )

    fixed = run(torch.tensor([0]))
    switched = run(lambda frame: torch.tensor([0 if frame < 4 else 2]))
    assert torch.equal(switched[:, :, :4], fixed[:, :, :4])
    assert not torch.allclose(switched[:, :, 4:], fixed[:, :, 4:], atol=1e-4)
    assert torch.equal(run(torch.tensor([0])), fixed)


def test_guidance_keeps_a_state_per_branch(diffusion):
    model = tiny().double()
    y = torch.tensor([1])
    plain = generate_long(
        model, diffusion, 4, 2, LATENT, y=y, generator=torch.Generator().manual_seed(1)
    )
    same = generate_long(
        model,
        diffusion,
        4,
        2,
        LATENT,
        y=y,
        cfg_scale=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(plain, same)
    # Scale 0 is the unconditional branch alone: full-history recomputation with the null label.
    uncond = generate_long(
        model,
        diffusion,
        4,
        2,
        LATENT,
        y=y,
        cfg_scale=0.0,
        generator=torch.Generator().manual_seed(1),
    )
    want = reference(model, diffusion, 4, 2, torch.tensor([model.null_class]), seed=1)
    torch.testing.assert_close(uncond, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        next(iter_long(tiny(num_classes=0), diffusion, 4, 2, LATENT, cfg_scale=2.0))


def frames(n, h=10, w=14, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_streaming_writer_writes_a_readable_mp4(tmp_path):
    path = tmp_path / "out" / "long.mp4"
    with StreamingVideoWriter(path, fps=8) as writer:
        for i in range(4):
            writer.write(frames(3, seed=i))
        assert not path.exists()  # only moved into place on close
    video = read_video(path)
    assert video.shape == (12, 10, 14, 3)
    assert [p.name for p in path.parent.iterdir()] == ["long.mp4"]


def test_streaming_writer_failure_leaves_no_file(tmp_path):
    path = tmp_path / "long.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingVideoWriter(path) as writer:
            writer.write(frames(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # An existing file survives a failed rewrite; keep_partial keeps what was written.
    with StreamingVideoWriter(path) as writer:
        writer.write(frames(2))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with StreamingVideoWriter(path, keep_partial=True) as writer:
            writer.write(frames(5))
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert writer.partial_path == tmp_path / "long.partial.mp4"  # still ends in .mp4: playable
    assert read_video(writer.partial_path).shape[0] == 5
    assert writer.partial_path.stat().st_mode & 0o777 == 0o644
    # A second partial video does not replace the first.
    with pytest.raises(RuntimeError):
        with StreamingVideoWriter(path, keep_partial=True) as writer:
            writer.write(frames(3))
            raise RuntimeError("boom")
    assert writer.partial_path == tmp_path / "long.partial-2.mp4"
    assert read_video(tmp_path / "long.partial.mp4").shape[0] == 5
    assert read_video(writer.partial_path).shape[0] == 3
    with pytest.raises(ValueError, match="size"):
        with StreamingVideoWriter(tmp_path / "b.mp4") as writer:
            writer.write(frames(2))
            writer.write(frames(2, h=12))
    assert not (tmp_path / "b.mp4").exists()


class Pixels:  # stands in for an autoencoder: latent channels 0..2 as RGB
    def decode(self, z):
        return z[:, :3].tanh()


def test_write_long_video_end_to_end(tmp_path, model, diffusion):
    path = write_long_video(
        model,
        diffusion,
        Pixels(),
        tmp_path / "v.mp4",
        6,
        2,
        LATENT,
        batch=2,
        y=torch.tensor([0, 1]),
        generator=torch.Generator().manual_seed(0),
    )
    video = read_video(path)
    assert video.shape[0] == 6


class KilledAtChunk(Pixels):
    """Gets SIGTERM (as from `kill`) while decoding the chunk number ``at`` (from 1)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def decode(self, z):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGTERM)
        return super().decode(z)


def test_an_interrupted_long_video_keeps_the_frames_made_so_far(tmp_path, model, diffusion):
    path = tmp_path / "v.mp4"
    with pytest.raises(LongVideoInterrupted) as info, sigterm_as_interrupt():
        write_long_video(
            model,
            diffusion,
            KilledAtChunk(3),
            path,
            100,
            2,
            LATENT,
            y=1,
            keep_partial=True,
            generator=torch.Generator().manual_seed(0),
        )
    stop = info.value
    assert isinstance(stop.interrupt, Terminated)
    assert stop.frames == 4 and stop.partial == tmp_path / "v.partial.mp4"
    assert read_video(stop.partial).shape[0] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["v.partial.mp4"]  # no v.mp4, no temp file
    # Without keep_partial the interrupt passes through unchanged and nothing is kept.
    with pytest.raises(Terminated), sigterm_as_interrupt():
        write_long_video(model, diffusion, KilledAtChunk(2), path, 100, 2, LATENT, y=1)
    assert [p.name for p in tmp_path.iterdir()] == ["v.partial.mp4"]


def test_only_temp_files_that_no_running_process_writes_are_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()  # its process id is now no running process
    names = {
        "dead": f".v.mp4.{finished.pid}-abcd1234.tmp",
        "this process": f".v.mp4.{os.getpid()}-abcd1234.tmp",
        "another live process": f".v.mp4.{os.getppid()}-abcd1234.tmp",
        "old naming, before this process": ".v.mp4.abcd1234.tmp",
        "old naming, since": ".v.mp4.efgh5678.tmp",
        "another file's": f".v.mp4.png.{finished.pid}-abcd1234.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half a video")
    long_ago = time.time() - 3600
    os.utime(tmp_path / names["old naming, before this process"], (long_ago, long_ago))
    removed = remove_stale_temp_files(tmp_path / "v.mp4")
    stale = [names["dead"], names["old naming, before this process"]]
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names.values()) - set(stale))
    # The writer cleans up on open, and names its own file after its process.
    (tmp_path / names["dead"]).write_bytes(b"half a video")
    with StreamingVideoWriter(tmp_path / "v.mp4") as writer:
        assert not (tmp_path / names["dead"]).exists()
        assert writer._tmp.name.startswith(f".v.mp4.{os.getpid()}-")
        writer.write(frames(2))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_follow_the_generator(model, diffusion, sampler, eta):
    def run(seed):
        return generate_long(
            model,
            diffusion,
            4,
            2,
            LATENT,
            y=1,
            sampler=sampler,
            eta=eta,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))


def test_sample_command_streams_a_long_video_from_a_trained_causal_model(tmp_path, capsys):
    from matten import cli
    from matten.config import load_config
    from matten.training import train

    run = tmp_path / "run"
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
                "sample.steps=2",
                "sample.num_samples=1",
                "train.cpu=true",
            ],
        ),
        output=run,
        progress=False,
    )
    out = tmp_path / "long.mp4"
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--output",
                str(out),
                "-n",
                "1",
                "--steps",
                "2",
                "--frames",
                "9",
                "--chunk-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "9 frames x 1" in capsys.readouterr().out
    assert read_video(out).shape[0] == 9  # longer than the 4-frame training clips


def test_frames_option_needs_a_causal_model(tmp_path, capsys):
    from matten import cli
    from matten.config import load_config
    from matten.training import train

    run = tmp_path / "clip"
    train(
        load_config(
            "demo",
            [
                "model.depth=1",
                "model.hidden_size=32",
                "model.num_heads=2",
                "data.resolution=8",
                "data.num_frames=4",
                "data.num_videos=4",
                "train.batch_size=2",
                "train.max_steps=1",
                "sample.steps=2",
                "sample.num_samples=1",
                "train.cpu=true",
            ],
        ),
        output=run,
        progress=False,
    )
    with pytest.raises(SystemExit):
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--output",
                str(tmp_path / "x.mp4"),
                "--frames",
                "9",
            ]
        )
    assert "--frames needs a long-video model" in capsys.readouterr().err


def test_context_frames_continue_like_generated_history(model, diffusion):
    """Frames given as context are committed exactly as if they had been generated: with the
    same noise for the later chunks (DDIM, eta 0) the continuation is the same."""
    full = generate_long(
        model, diffusion, 8, 2, LATENT, y=1, generator=torch.Generator().manual_seed(1)
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # the initial noise of the two chunks the context replaces
        torch.randn((1, *LATENT[:1], 2, *LATENT[1:]), generator=generator)
    rest = list(
        iter_long(model, diffusion, 8, 2, LATENT, y=1, context=full[:, :, :4], generator=generator)
    )
    assert [c.start for c in rest] == [4, 6]
    # float32: committing 4 frames at once rounds differently from 2 + 2
    torch.testing.assert_close(
        torch.cat([c.frames for c in rest], dim=2), full[:, :, 4:], rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="context"):
        next(iter_long(model, diffusion, 4, 2, LATENT, y=1, context=full[:, :, :4]))


def test_teacher_forcing_generates_each_chunk_from_the_real_past():
    model = tiny(num_classes=0).double()
    diffusion = create_diffusion("4", prediction="eps")
    real = torch.randn(
        1,
        *LATENT[:1],
        8,
        *LATENT[1:],
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    got = generate_long(
        model, diffusion, 8, 2, LATENT, teacher=real, generator=torch.Generator().manual_seed(4)
    )
    want = reference(model, diffusion, 8, 2, None, seed=4, teacher=real)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    free = generate_long(model, diffusion, 8, 2, LATENT, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got[:, :, :2], free[:, :, :2], atol=0, rtol=0)  # same first chunk
    assert (got[:, :, 2:] - free[:, :, 2:]).abs().max() > 1e-3  # then a different past
    with pytest.raises(ValueError, match="teacher"):
        generate_long(model, diffusion, 8, 2, LATENT, teacher=real[:, :, :6])


def test_action_schedules_and_class_switches_from_the_command_line(tmp_path, capsys):
    from matten import cli
    from matten.commands.options import parse_action_schedule, parse_class_switches
    from matten.pipelines import SamplingError

    names = ("stay", "left", "right")
    assert parse_action_schedule("right*3, stay,1*2", 3, names) == [2, 2, 2, 0, 1, 1]
    for bad in ("up", "right*0", "7", "right*x"):
        with pytest.raises(SamplingError, match="--actions"):
            parse_action_schedule(bad, 3, names)
    switches = parse_class_switches(["6:cat", "2:0"], 2, 2, ["dog", "cat"])
    assert [(f, y.tolist()) for f, y in switches] == [(2, [0, 0]), (6, [1, 1])]
    with pytest.raises(SamplingError, match="FRAME:CLASS"):
        parse_class_switches(["cat"], 2, 2, ["dog", "cat"])
    with pytest.raises(SamplingError, match="--class-at 9 is out of range"):
        parse_class_switches(["2:9"], 2, 2)

    # the CLI hands each chunk its class and actions, and switches class mid-stream
    import unittest.mock as mock

    import matten.pipelines.long as long_video
    from matten.config import load_config
    from matten.training import train

    seen = []
    real_iter = long_video.iter_long

    def spy(model, diffusion, num_frames, chunk_size, latent_shape, **kwargs):
        for chunk in real_iter(model, diffusion, num_frames, chunk_size, latent_shape, **kwargs):
            y, acts = kwargs["y"], kwargs["actions"]
            seen.append(
                (
                    chunk.start,
                    None if y is None else y(chunk.start).tolist(),
                    None if acts is None else acts(chunk.start).tolist(),
                )
            )
            yield chunk

    def tiny_run(name, *overrides):
        run = tmp_path / name
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
                    "train.batch_size=2",
                    "train.max_steps=1",
                    "sample.steps=2",
                    "sample.num_samples=1",
                    "train.cpu=true",
                    *overrides,
                ],
            ),
            output=run,
            progress=False,
        )
        return str(run)

    classes = tiny_run(
        "classes",
        "data.name=synthetic",
        "data.num_classes=2",
        "model.num_classes=2",
        "model.causal.num_actions=0",
        "data.options={}",
    )
    actions = tiny_run("actions", "data.options.blackout=0")
    out = str(tmp_path / "switch.mp4")
    with mock.patch.object(long_video, "iter_long", spy):
        assert (
            cli.main(
                [
                    "sample",
                    "--checkpoint",
                    classes,
                    "--output",
                    out,
                    "-n",
                    "1",
                    "--steps",
                    "2",
                    "--frames",
                    "6",
                    "--class",
                    "0",
                    "--class-at",
                    "4:1",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert seen == [(0, [0], None), (2, [0], None), (4, [1], None)]
        seen.clear()
        assert (
            cli.main(
                [
                    "sample",
                    "--checkpoint",
                    actions,
                    "--output",
                    out,
                    "-n",
                    "1",
                    "--steps",
                    "2",
                    "--frames",
                    "6",
                    "--chunk-size",
                    "1",
                    "--actions",
                    "right*2,left",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert seen == [(f, None, [a]) for f, a in zip(range(6), [2, 2, 1, 2, 2, 1], strict=True)]
    assert read_video(out).shape[0] == 6
    for bad, message in (
        (["--actions", "fly"], "--actions item 'fly'"),
        (
            ["--class-at", "2:1"],
            "unconditional (trained without class labels); --class-at cannot be used",
        ),
    ):
        with pytest.raises(SystemExit):
            cli.main(["sample", "--checkpoint", actions, "--output", out, "--frames", "4", *bad])
        assert message in capsys.readouterr().err.splitlines()[-1]  # the error, not the usage
