"""MALT's segment memory and the frame-local window of the causal backbone: causal, streaming
equal to the whole clip, a constant state, a fresh memory that changes nothing, a run that
trains and samples."""

import pytest
import torch

from matten.models.causal import create_causal_model
from matten.models.hybrid import HybridMemoryLayer, LayerState
from matten.models.layers import Condition
from matten.models.malt import SegmentMemory
from matten.ssm import TokenGrid

FRAMES = 7
# (memory, window kind): MALT alone and with the others, the frame-local window with and without
SETUPS = [
    ("malt", "same_position"),
    ("malt+both", "same_position"),
    ("none", "frame_local"),
    ("malt+delta", "frame_local"),
]


def perturb(module, scale=0.1):
    """Move every weight off its (partly zero) init, so every path counts."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def tiny(
    memory="malt", window_kind="same_position", window=3, sink=1, seed=0, fresh=False, **kwargs
):
    """A tiny float64 model; ``fresh`` leaves it at its init."""
    torch.manual_seed(seed)
    model = (
        create_causal_model(
            input_size=4,
            in_channels=4,
            depth=2,
            hidden_size=32,
            num_heads=2,
            window=window,
            sink=sink,
            memory=memory,
            context_length=FRAMES,
            window_kind=window_kind,
            **kwargs,
        )
        .eval()
        .double()
    )
    return model if fresh else perturb(model)


def clip(batch=2, frames=FRAMES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, frames, 4, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 1000, (batch, frames), generator=g),
    )


def stream(model, x, t, chunk):
    state, outs = model.init_state(x.shape[0]), []
    for s in range(0, x.shape[2], chunk):
        out, state = model.step(x[:, :, s : s + chunk], t[:, s : s + chunk], state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("memory, window_kind", SETUPS)
def test_frames_never_see_the_future(memory, window_kind):
    model = tiny(memory, window_kind, malt_segment=2)
    x, t = clip()
    with torch.no_grad():
        ref = model(x, t)
        for f in (1, 2, 5):  # inside a segment, at its start, and later
            x2 = x.clone()
            x2[:, :, f] += 1.0
            out = model(x2, t)
            assert torch.equal(out[:, :, :f], ref[:, :, :f])
            assert not torch.allclose(out[:, :, f], ref[:, :, f])


@pytest.mark.parametrize(
    "memory, window_kind, sink, segment",
    [
        ("malt", "same_position", 1, 2),
        ("malt", "same_position", 0, 3),
        ("malt+both", "same_position", 1, 3),
        ("none", "frame_local", 1, 4),
        ("none", "frame_local", 0, 4),
        ("malt+delta", "frame_local", 0, 3),
    ],
)
def test_streaming_matches_the_whole_clip(memory, window_kind, sink, segment):
    # segment 3 is aligned with none of the chunks 2 and 4: segments are written in pieces
    model = tiny(memory, window_kind, sink=sink, malt_segment=segment)
    x, t = clip()
    with torch.no_grad():
        full = model(x, t)
        for chunk in (1, 2, 4):
            out, state = stream(model, x, t, chunk)
            assert state.frames == FRAMES
            torch.testing.assert_close(out, full, atol=1e-10, rtol=0)


def test_a_segment_reads_only_the_memory_of_earlier_segments():
    # one block, a window of one frame: beyond its own frame, a frame sees only the memory
    model = tiny("malt", window=1, sink=0, malt_segment=2)
    model.blocks = model.blocks[:1]
    x, t = clip()
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    with torch.no_grad():
        ref, out = model(x, t), model(x2, t)
    assert torch.equal(out[:, :, 1], ref[:, :, 1])  # same segment: not yet written
    assert not torch.allclose(out[:, :, 2:], ref[:, :, 2:])  # written at the segment's end
    # and it reaches far past the window: the last frame still differs
    assert not torch.allclose(out[:, :, -1], ref[:, :, -1])


def test_generation_matches_recomputing_the_whole_history():
    # chunks of 3 frames across segments of 2: every denoising step (uncommitted) reads the
    # memory that the chunk's own earlier segment writes, as the whole-clip pass does
    from matten.diffusion import create_diffusion
    from matten.pipelines import generate_long

    model = tiny("malt+delta", "frame_local", malt_segment=2)
    diffusion = create_diffusion("3", prediction="eps")
    got = generate_long(
        model, diffusion, 7, 3, (4, 4, 4), batch=1, generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    history = torch.zeros(1, 4, 0, 4, 4, dtype=torch.float64)
    for start in range(0, 7, 3):
        k = min(3, 7 - start)

        def full(x, t, start=start, k=k, history=history):
            # the chunk denoised by the whole-clip pass over [clean past; chunk]
            levels = torch.cat(
                [torch.zeros(1, start, dtype=torch.long), t[:, None].expand(-1, k)], dim=1
            )
            return model(torch.cat([history, x], dim=2), levels)[:, :, start:]

        x = torch.randn(1, 4, k, 4, 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            for i in range(diffusion.num_timesteps - 1, -1, -1):
                t = torch.full((1,), i, dtype=torch.long)
                x = diffusion.ddim_sample(full, x, t, eta=0.0, generator=g)["sample"]
        history = torch.cat([history, x], dim=2)
    torch.testing.assert_close(got, history, atol=1e-10, rtol=0)


def test_memory_state_has_a_constant_size():
    model = tiny("malt", window=3, sink=1, malt_slots=5, malt_segment=4)
    x, t = clip(batch=1, frames=40)
    malt_sizes, sizes = {}, {}
    with torch.no_grad():
        state = model.init_state(1)
        for start, stop in [(f, f + 1) for f in range(6)] + [(6, 40)]:
            _, state = model.step(x[:, :, start:stop], t[:, start:stop], state)
            malt_sizes[stop] = sum(t.numel() for layer in state.layers for t in layer.malt)
            sizes[stop] = state.num_elements()
    assert len(set(malt_sizes.values())) == 1  # the same after every frame, mid-segment too
    assert sizes[4] == sizes[40] > 0
    assert state.layers[0].malt.memory.shape == (1, 5, 32)


@pytest.mark.parametrize(
    "memory, base", [("malt", "none"), ("malt+delta", "delta"), ("malt+both", "both")]
)
def test_a_fresh_malt_memory_is_the_identity(memory, base):
    without = tiny(base)
    with_malt = tiny(memory, fresh=True)
    missing = with_malt.load_state_dict(without.state_dict(), strict=False).missing_keys
    assert missing and all(".malt." in key for key in missing)
    # the memory itself away from its init, but for the zero output projection of its read
    for block in with_malt.blocks:
        perturb(block.memory.malt)
        torch.nn.init.zeros_(block.memory.malt.read_out.weight)
        torch.nn.init.zeros_(block.memory.malt.read_out.bias)
    x, t = clip()
    with torch.no_grad():
        assert torch.equal(with_malt(x, t), without(x, t))
        perturb(with_malt.blocks[0].memory.malt.read_out)
        assert not torch.allclose(with_malt(x, t), without(x, t))


def test_the_write_is_a_gated_attention_over_the_segment():
    torch.manual_seed(0)
    mem = perturb(SegmentMemory(8, num_heads=2, slots=3, segment=4).double())
    tokens = torch.randn(2, 10, 8, dtype=torch.float64)
    state = mem.init_state(2)
    for piece in (tokens[:, :1], tokens[:, 1:7], tokens[:, 7:]):  # in pieces, as streaming does
        state = mem.accumulate(state, piece)
    got = mem.write(state).memory
    # by hand: softmax(q k^T / sqrt(d)) v per head, the output projection, the gate
    m = state.memory
    q = mem.write_q(mem.norm(m)).view(2, 3, 2, 4).transpose(1, 2)
    k, v = (a.view(2, 10, 2, 4).transpose(1, 2) for a in mem.write_kv(tokens).chunk(2, dim=-1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    u = mem.write_out(attn.transpose(1, 2).reshape(2, 3, 8))
    z = torch.sigmoid(mem.gate(torch.cat([mem.norm(m), u], dim=-1)))
    torch.testing.assert_close(got, (1 - z) * m + z * u, atol=1e-12, rtol=0)
    # the gate keeps (z -> 0) or overwrites (z -> 1)
    with torch.no_grad():
        mem.gate.weight.zero_()
        mem.gate.bias.fill_(-50.0)
        torch.testing.assert_close(mem.write(state).memory, m, atol=1e-12, rtol=0)
        mem.gate.bias.fill_(50.0)
        torch.testing.assert_close(mem.write(state).memory, u, atol=1e-12, rtol=0)


@pytest.mark.parametrize("window_kind", ["same_position", "frame_local"])
def test_which_tokens_the_window_sees(window_kind):
    # frames of 2x2 tokens, a window of 2 frames, no sink; one token of frame 0 changes
    torch.manual_seed(0)
    layer = perturb(
        HybridMemoryLayer(
            16, 2, window=2, sink=0, memory="none", context_length=4, window_kind=window_kind
        ).double()
    )
    grid = TokenGrid(4, 2, 2)
    x = torch.randn(1, 16, 16, dtype=torch.float64)
    cond = Condition(vector=torch.randn(1, 4, 16, dtype=torch.float64))
    x2 = x.clone()
    x2[0, 0] += torch.randn(16, dtype=torch.float64)  # not a constant: the norm would drop it
    with torch.no_grad():
        ref, out = (
            layer(a, cond, grid, 0, LayerState(), commit=False)[0].view(4, 4, 16) for a in (x, x2)
        )
    changed = [[not torch.allclose(out[f, p], ref[f, p]) for p in range(4)] for f in range(4)]
    frame_local = window_kind == "frame_local"
    # its own frame (the other tokens only frame-locally), the next frame, nothing further
    assert changed[0] == [True] + [frame_local] * 3
    assert changed[1] == [True] + [frame_local] * 3
    assert changed[2] == changed[3] == [False] * 4


def test_options_reach_the_model_and_are_checked():
    from matten.config import ConfigError, config_to_dict, load_config
    from matten.models import model_kwargs_for_run

    cfg = load_config(
        "long",
        [
            "model.causal.memory=malt+delta",
            "model.causal.window_kind=frame_local",
            "model.causal.malt_slots=3",
            "model.causal.malt_segment=2",
        ],
    )
    kwargs = model_kwargs_for_run(
        config_to_dict(cfg)["model"], in_channels=3, latent_hw=(8, 8), num_classes=0, num_frames=8
    )
    model = create_causal_model(**kwargs)
    layer = model.blocks[0].memory
    assert layer.window_kind == "frame_local" and layer.delta is not None
    assert layer.malt.slots == 3 and layer.malt.segment == 2
    assert create_causal_model(**model.config).config == model.config
    for bad in (
        "model.causal.memory=malt+malt",
        "model.causal.window_kind=dense",
        "model.causal.malt_slots=0",
        "model.causal.malt_segment=0",
    ):
        with pytest.raises(ConfigError):
            load_config("long", [bad])


@pytest.mark.parametrize(
    "override", ["model.causal.memory=malt", "model.causal.window_kind=frame_local"]
)
def test_a_long_run_trains_and_samples(tmp_path, override):
    from matten import cli
    from matten.config import load_config
    from matten.data import read_video
    from matten.training import train

    run = tmp_path / "run"
    result = train(
        load_config(
            "long",
            [
                "model.depth=1",
                "model.hidden_size=32",
                "model.num_heads=2",
                "model.causal.window=2",
                "model.causal.malt_segment=2",
                "data.num_frames=4",
                "data.num_videos=4",
                "train.batch_size=2",
                "data.options.blackout=0",
                "train.max_steps=2",
                "sample.steps=2",
                "sample.num_samples=1",
                "train.cpu=true",
                override,
            ],
        ),
        output=run,
        progress=False,
    )
    assert result.step == 2 and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    out = str(tmp_path / "long.mp4")
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--output",
                out,
                "-n",
                "1",
                "--steps",
                "2",
                "--frames",
                "8",
                "--chunk-size",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_video(out).shape[0] == 8


# ----------------------------------------------------------------------------------------------
# the memory regulariser (train.memory_reg_weight)


def test_the_memory_regulariser_equals_a_hand_computation():
    from matten.models import malt

    memory = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    # cosines: slots 1,2 -> 0; 1,3 and 2,3 -> 1/sqrt(2); squared over the 6 ordered pairs
    assert malt.memory_redundancy(memory).item() == pytest.approx((0 + 0.5 + 0.5) * 2 / 6)
    # per-slot std over 2 channels (unbiased) of the unit slots [1, 0], [0, 1], [1, 1]/sqrt(2):
    # |a - b| / sqrt(2) = 1/sqrt(2), 1/sqrt(2), 0
    assert malt.memory_diversity(memory).item() == pytest.approx((1 + 1 + 0) / 2**0.5 / 3)
    expected = 1 / 3 - malt.DIVERSITY_WEIGHT * 2 / 2**0.5 / 3
    assert malt.memory_regularizer(memory).item() == pytest.approx(expected)
    # scaling the memory up changes nothing: the loss cannot be lowered that way
    assert malt.memory_regularizer(memory * 100).item() == pytest.approx(expected)
    assert malt.memory_redundancy(memory[:, :1]).item() == 0.0  # one slot: nothing to compare
    # orthogonal slots of equal spread: no redundancy
    assert malt.memory_redundancy(torch.eye(4)[None] * 3).item() == pytest.approx(0.0)


def test_the_penalty_averages_the_memory_after_every_write():
    from matten.models.malt import memory_penalty, memory_regularizer, recording_writes

    torch.manual_seed(0)
    layer = perturb(SegmentMemory(8, 2, slots=3, segment=2)).double()
    frames = torch.randn(2, 5, 4, 8, dtype=torch.float64)  # 5 frames: writes after 2 and 4
    state, written = None, []
    for f in range(5):  # by hand: the state after writes
        _, state = layer(frames[:, f : f + 1], f, state)
        if (f + 1) % 2 == 0:
            written.append(state.memory)
    with recording_writes(torch.nn.Sequential(layer)) as layers:
        layer(frames, 0, None)
        penalty = memory_penalty(layers)
        assert len(layer.recorded) == 2
    expected = (memory_regularizer(written[0]) + memory_regularizer(written[1])) / 2
    torch.testing.assert_close(penalty, expected)
    assert layer.recorded is None  # recording ends with the block
    with recording_writes(torch.nn.Sequential(layer)) as layers:
        layer(frames[:, :1], 0, None)  # no segment ended: no penalty
        assert memory_penalty(layers) is None
    assert memory_penalty([]) is None


def test_memory_reg_weight_trains_and_is_untouched_at_zero(tmp_path, monkeypatch):
    from matten.config import ConfigError, load_config
    from matten.training import step as step_module
    from matten.training import train

    def run(name, *extra):
        return train(
            load_config(
                "long",
                [
                    "model.depth=1",
                    "model.hidden_size=32",
                    "model.num_heads=2",
                    "model.causal.window=2",
                    "model.causal.memory=malt",
                    "model.causal.malt_segment=2",
                    "data.num_frames=4",
                    "data.num_videos=4",
                    "train.batch_size=2",
                    "data.options.blackout=0",
                    "train.max_steps=2",
                    "sample.steps=2",
                    "sample.num_samples=1",
                    "train.cpu=true",
                    *extra,
                ],
            ),
            output=tmp_path / name,
            progress=False,
        ).losses

    def never(model):
        raise AssertionError("the regulariser ran at weight 0")

    with monkeypatch.context() as patch:  # at weight 0 the regulariser's code is not entered
        patch.setattr(step_module, "recording_writes", never)
        off = run("off")
    on = run("on", "train.memory_reg_weight=0.5")
    assert all(torch.isfinite(torch.tensor(on)))
    assert on[0] != off[0]  # same weights and batch at step 1: the penalty is in the loss
    with pytest.raises(ConfigError, match="memory_reg_weight must be >= 0"):
        load_config("long", ["model.causal.memory=malt", "train.memory_reg_weight=-1"])
    with pytest.raises(ConfigError, match="regularises the MALT memory"):
        load_config("long", ["train.memory_reg_weight=0.1"])  # memory: both has no MALT
