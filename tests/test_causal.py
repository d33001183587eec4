import pytest
import torch

from matten.models.causal import MEMORY_KINDS, CausalState, create_causal_model

FRAMES = 7


def tiny(memory="both", window=3, sink=1, perturb=True, seed=0, **kwargs):
    """A tiny model; ``perturb`` moves every weight off its (partly zero) init so every path
    counts."""
    torch.manual_seed(seed)
    model = create_causal_model(
        input_size=4,
        in_channels=4,
        depth=2,
        hidden_size=32,
        num_heads=2,
        window=window,
        sink=sink,
        memory=memory,
        context_length=FRAMES,
        **kwargs,
    ).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def clip(batch=2, frames=FRAMES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, frames, 4, 4, generator=g),
        torch.randint(0, 1000, (batch, frames), generator=g),
    )


def stream(model, x, t, chunk, **kwargs):
    state, outs = model.init_state(x.shape[0]), []
    for s in range(0, x.shape[2], chunk):
        out, state = model.step(x[:, :, s : s + chunk], t[:, s : s + chunk], state, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_frames_never_see_the_future(memory):
    model = tiny(memory)
    x, t = clip()
    with torch.no_grad():
        ref = model(x, t)
        for f in (2, 5):
            x2, t2 = x.clone(), t.clone()
            x2[:, :, f] += 1.0
            t2[:, f] = 3
            out = model(x2, t2)
            assert torch.equal(out[:, :, :f], ref[:, :, :f])
            assert not torch.allclose(out[:, :, f], ref[:, :, f])


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_memory_reaches_past_the_window_only_with_global_memory(memory):
    # window 2, no sink, 2 blocks: attention alone carries frame 0 at most to frame 2.
    model = tiny(memory, window=2, sink=0)
    x, t = clip()
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    with torch.no_grad():
        changed = not torch.allclose(model(x2, t)[:, :, 5:], model(x, t)[:, :, 5:], atol=1e-6)
    assert changed == (memory != "none")


@pytest.mark.parametrize("sink", [0, 1])
@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_streaming_matches_the_whole_clip(memory, sink):
    model = tiny(memory, window=3, sink=sink)
    x, t = clip()
    with torch.no_grad():
        full = model(x, t)
        for chunk in (1, 2, 4):
            out, state = stream(model, x, t, chunk)
            assert state.frames == FRAMES
            torch.testing.assert_close(out, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window, sink", [(1, 0), (1, 2), (FRAMES + 2, 0)])
def test_streaming_matches_at_extreme_windows(window, sink):
    model = tiny("both", window=window, sink=sink)
    x, t = clip()
    with torch.no_grad():
        full = model(x, t)
        for chunk in (1, 3):
            torch.testing.assert_close(stream(model, x, t, chunk)[0], full, atol=1e-4, rtol=0)


def test_ssm_block_size_per_layer():
    model = tiny("ssm", ssm_block_size=[1, [2, 1]])
    assert [b.memory.ssm.block_size for b in model.blocks] == [(1, 1), (2, 1)]
    assert model.config["ssm_block_size"] == [[1, 1], [2, 1]]
    again = create_causal_model(**model.config)
    assert [b.memory.ssm.block_size for b in again.blocks] == [(1, 1), (2, 1)]
    x, t = clip()
    with torch.no_grad():
        full = model(x, t)
        torch.testing.assert_close(stream(model, x, t, 2)[0], full, atol=1e-4, rtol=0)
        # a different block size changes the output (the size is used, not just stored)
        other = create_causal_model(**{**model.config, "ssm_block_size": 2})
        other.load_state_dict(model.state_dict())
        assert not torch.allclose(other(x, t), full, atol=1e-4)
    for bad in ([1, 2, 1], [[0, 1], 1], [1, (1, 2, 3)]):
        with pytest.raises(ValueError, match="block size|sizes for"):
            tiny("ssm", ssm_block_size=bad)


def test_streaming_matches_with_class_and_actions():
    model = tiny("both", num_classes=3, num_actions=5)
    x, t = clip()
    y, actions = torch.tensor([0, 2]), torch.randint(0, 5, (2, FRAMES))
    with torch.no_grad():
        full = model(x, t, y=y, actions=actions)
        state, outs = model.init_state(2), []
        for s in range(0, FRAMES, 2):
            out, state = model.step(
                x[:, :, s : s + 2], t[:, s : s + 2], state, y=y, actions=actions[:, s : s + 2]
            )
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-4, rtol=0)


def test_state_size_is_constant_in_video_length():
    model = tiny("both", window=3, sink=1)
    x, t = clip(batch=1, frames=40)
    sizes = {}
    with torch.no_grad():
        state = model.init_state(1)
        for f in range(40):
            _, state = model.step(x[:, :, f : f + 1], t[:, f : f + 1], state)
            sizes[f + 1] = state.num_elements()
    assert sizes[4] == sizes[40] > 0
    layer = state.layers[0]
    assert layer.k.shape[2] == 1 + 2  # the sink and window - 1 recent frames
    assert layer.pending.shape[1] == 2


def test_uncommitted_steps_leave_the_state_alone():
    model = tiny("both")
    x, t = clip()
    with torch.no_grad():
        _, state = stream(model, x[:, :, :4], t[:, :4], 2)
        before = [p.clone() for layer in state.layers for p in layer.tensors()]
        chunk, tc = x[:, :, 4:6], t[:, 4:6]
        out1, same = model.step(chunk, tc, state, commit=False)
        out2, _ = model.step(chunk, tc, state, commit=False)
        assert same is state and state.frames == 4
        assert torch.equal(out1, out2)
        after = [p for layer in state.layers for p in layer.tensors()]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        # a sampler denoises at other noise levels, then commits the clean chunk
        model.step(chunk, torch.full_like(tc, 999), state, commit=False)
        state = model.commit(chunk, torch.zeros_like(tc), state)
        assert state.frames == 6
        t_clean = t.clone()
        t_clean[:, 4:6] = 0
        last, _ = model.step(x[:, :, 6:], t[:, 6:], state)
        torch.testing.assert_close(last, model(x, t_clean)[:, :, 6:], atol=1e-4, rtol=0)


def test_fresh_model_predicts_zero_and_conditioning_matters_once_trained():
    model = tiny("both", perturb=False, num_classes=3, num_actions=4)
    x, t = clip()
    y, actions = torch.tensor([1, 3]), torch.randint(0, 4, (2, FRAMES))
    with torch.no_grad():
        out = model(x, t, y=y, actions=actions)
        assert out.shape == (2, 8, FRAMES, 4, 4) and torch.equal(out, torch.zeros_like(out))
        for p in model.final_layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ref = model(x, t, y=y, actions=actions)
        assert not torch.allclose(ref, model(x, t.flip(1), y=y, actions=actions))
        assert not torch.allclose(
            ref, model(x, t, y=torch.full_like(y, model.null_class), actions=actions)
        )
        assert not torch.allclose(ref, model(x, t, y=y, actions=(actions + 1) % 4))
        # one timestep per clip is the per-frame case with equal levels
        torch.testing.assert_close(
            model(x, t[:, 0], y=y, actions=actions),
            model(x, t[:, :1].expand(-1, FRAMES), y=y, actions=actions),
        )


def test_continuous_actions_and_gradients():
    model = tiny("both", action_dim=3, learn_sigma=False).train()
    x, t = clip()
    actions = torch.randn(2, FRAMES, 3)
    out = model(x, t, actions=actions)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert model.blocks[0].memory.delta.q_proj.weight.grad is not None
    assert model.blocks[0].memory.ssm.mamba.in_proj.weight.grad is not None
    assert model.action_embedder.embed[0].weight.grad.abs().sum() > 0


def test_config_rebuilds_the_model():
    model = tiny("delta", num_classes=2, ssm_block_size=2)
    again = create_causal_model(**model.config)
    again.load_state_dict(model.state_dict())
    assert again.config == model.config and again.window == 3 and again.sink == 1


def test_bad_inputs_raise_clear_errors():
    model = tiny("both", num_classes=3, num_actions=4)
    x, t = clip()
    y, actions = torch.tensor([0, 1]), torch.zeros(2, FRAMES, dtype=torch.long)
    bad = [
        lambda: model(x[:, :, 0], t, y=y, actions=actions),  # 4-D input
        lambda: model(x[:, :3], t, y=y, actions=actions),  # wrong channels
        lambda: model(x, t[:, :3], y=y, actions=actions),  # timesteps per frame
        lambda: model(x, t, actions=actions),  # missing label
        lambda: model(x, t, y=y),  # missing actions
        lambda: model(x, t, y=y, actions=actions[:, :3]),  # actions per frame
        lambda: model(x, t, y=y, actions=actions.float()),  # continuous for discrete
        lambda: model(x, t, y=torch.tensor([0, 9]), actions=actions),  # label out of range
        lambda: model.step(x, t, model.init_state(3), y=y, actions=actions),  # state batch
        lambda: model(x[..., :3], t, y=y, actions=actions),  # not divisible by patch
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
    for kwargs in (dict(memory="lstm"), dict(window=0), dict(num_actions=2, action_dim=2)):
        with pytest.raises(ValueError):
            create_causal_model(input_size=4, depth=1, hidden_size=32, num_heads=2, **kwargs)
    assert isinstance(model.init_state(2), CausalState)
