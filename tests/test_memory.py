"""Hybrid memory: the gated delta rule against a float64 loop, the router, the block-wise SSM."""

import math

import pytest
import torch
import torch.nn.functional as F

from matten.models.memory import (
    BlockwiseTemporalSSM,
    GatedDeltaMemory,
    PositionRouter,
    gated_delta_write,
)
from matten.ssm import TokenGrid


def reference_write(mem: GatedDeltaMemory, M: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The gated delta rule, one token and one head at a time, straight from the formula."""
    H, d = mem.num_heads, mem.head_dim
    M = M.clone()
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            h = tokens[b, t]
            for i in range(H):
                rows = slice(i * d, (i + 1) * d)
                k = mem.k_proj.weight[rows] @ h
                k = k / k.norm()
                v = mem.v_proj.weight[rows] @ h
                beta = torch.sigmoid(mem.beta_proj.weight[i] @ h + mem.beta_proj.bias[i])
                alpha = -mem.A_log[i].exp() * F.softplus(
                    mem.alpha_proj.weight[i] @ h + mem.dt_bias[i]
                )
                decayed = alpha.exp() * M[b, i]
                M[b, i] = decayed + beta * torch.outer(k, v - decayed.T @ k)
    return M


def make_memory(chunk_size=64, seed=0, dim=12, heads=3):
    torch.manual_seed(seed)
    mem = GatedDeltaMemory(dim, heads, chunk_size=chunk_size).double()
    with torch.no_grad():  # livelier gates than the slow-forgetting initialisation
        mem.A_log.uniform_(-2.0, 0.0)
        mem.beta_proj.bias.normal_()
    return mem


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 64])
def test_write_matches_reference_loop(chunk_size):
    mem = make_memory(chunk_size)
    tokens = torch.randn(2, 11, 12, dtype=torch.float64)
    M0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_write(mem, M0, tokens)
        got = mem.write(M0, tokens)
    assert got.shape == (2, 3, 4, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_write_frames_returns_the_state_after_each_frame():
    mem = make_memory(chunk_size=4)
    frames = torch.randn(2, 3, 5, 12, dtype=torch.float64)  # 3 frames of 5 tokens
    M0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        states = mem.write_frames(M0, frames)
        assert len(states) == 3 and mem.write_frames(M0, frames[:, :0]) == []
        for f in range(3):
            expected = reference_write(mem, M0, frames[:, : f + 1].flatten(1, 2))
            torch.testing.assert_close(states[f], expected, atol=1e-6, rtol=0)


def test_write_in_two_chunks_equals_write_at_once():
    mem = make_memory(chunk_size=4)
    tokens = torch.randn(2, 13, 12, dtype=torch.float64)
    state = mem.init_state(2)
    whole = mem.write(state, tokens)
    parts = mem.write(mem.write(state, tokens[:, :6]), tokens[:, 6:])
    torch.testing.assert_close(parts, whole, atol=1e-10, rtol=0)
    assert torch.equal(mem.write(whole, tokens[:, :0]), whole)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_zero_gates_leave_state_unchanged(chunk_size):
    M0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    k = F.normalize(torch.randn(2, 7, 3, 4, dtype=torch.float64), dim=-1)
    v = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    zeros = torch.zeros(2, 7, 3, dtype=torch.float64)
    assert torch.allclose(gated_delta_write(M0, k, v, zeros, zeros, chunk_size), M0, atol=1e-14)
    # the same through the module: beta = sigmoid(-inf) = 0, alpha = -exp(-inf) * ... = 0
    mem = make_memory()
    with torch.no_grad():
        mem.beta_proj.bias.fill_(-math.inf)
        mem.A_log.fill_(-math.inf)
    assert torch.allclose(mem.write(M0, torch.randn(2, 7, 12, dtype=torch.float64)), M0, atol=1e-14)


def test_written_key_is_retrieved_exactly():
    mem = make_memory()
    token = torch.randn(2, 1, 12, dtype=torch.float64)
    k, v, _, _ = mem.write_inputs(token)
    ones = torch.ones(2, 1, 3, dtype=torch.float64)
    zeros = torch.zeros_like(ones)
    M = gated_delta_write(mem.init_state(2), k, v, ones, zeros)
    torch.testing.assert_close(mem.retrieve_raw(M, k), v, atol=1e-12, rtol=0)
    # through the module with beta -> 1 (sigmoid(40) = 1 - 4e-18)
    with torch.no_grad():
        mem.beta_proj.bias.fill_(40.0)
        mem.beta_proj.weight.zero_()
    M = mem.write(mem.init_state(2), token)  # the decay only scales the empty state: M = k v^T
    torch.testing.assert_close(mem.retrieve_raw(M, k), v, atol=1e-12, rtol=0)


def test_fresh_memory_reads_zero_and_gradients_flow():
    mem = GatedDeltaMemory(16, 2)
    x = torch.randn(2, 9, 16)
    out, state = mem(x, torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16) and state.shape == (2, 2, 8, 8)
    assert torch.count_nonzero(out) == 0
    decays = (-mem.A_log.exp() * math.log(2)).exp()
    assert decays.min() > 0.99
    with torch.no_grad():
        mem.out_proj.weight.normal_()
    out, state = mem(x, torch.randn(2, 5, 16), state)
    (out.square().mean() + state.square().mean()).backward()
    for name in ("k_proj", "v_proj", "q_proj", "g_proj", "beta_proj", "alpha_proj"):
        assert getattr(mem, name).weight.grad.abs().sum() > 0, name
    assert mem.A_log.grad.abs().sum() > 0 and mem.dt_bias.grad.abs().sum() > 0


def test_router():
    router = PositionRouter(w=1.5, b=0.3)
    T = 16
    gamma = router(torch.arange(40), T)
    assert gamma.shape == (40, 1, 1)
    assert (gamma.flatten().diff() > 0).all()
    torch.testing.assert_close(router(T - 1, T), torch.sigmoid(torch.tensor(0.3)).reshape(1, 1, 1))
    local, glob = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    t = torch.tensor([0, 7, 30])
    torch.testing.assert_close(router.fuse(local, glob, t, T), local + router(t, T) * glob)


# --------------------------------------------------------------------------------------------

GRID = TokenGrid(frames=5, height=4, width=6)


def make_ssm(block_size=(2, 3)):
    torch.manual_seed(0)
    return BlockwiseTemporalSSM(8, block_size=block_size, d_state=4, expand=2).eval()


def frames_of(x, grid, start, stop):
    return x.view(x.shape[0], grid.frames, -1, x.shape[-1])[:, start:stop].flatten(1, 2)


@pytest.mark.parametrize("block_size,split", [((2, 3), 2), ((1, 2), 1), ((4, 6), 3)])
def test_blockwise_streaming_equals_whole(block_size, split):
    ssm = make_ssm(block_size)
    x = torch.randn(2, GRID.num_tokens, 8)
    first = TokenGrid(split, GRID.height, GRID.width)
    rest = TokenGrid(GRID.frames - split, GRID.height, GRID.width)
    with torch.no_grad():
        whole = ssm(x, GRID)
        y1, state = ssm(frames_of(x, GRID, 0, split), first, return_state=True)
        y2 = ssm(frames_of(x, GRID, split, GRID.frames), rest, state=state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, atol=1e-5, rtol=1e-5)


def test_blockwise_is_causal_in_time():
    ssm = make_ssm()
    x = torch.randn(1, GRID.num_tokens, 8)
    x2 = x.clone().view(1, GRID.frames, -1, 8)
    x2[:, 3] += torch.randn_like(x2[:, 3])
    with torch.no_grad():
        y, y2 = ssm(x, GRID), ssm(x2.flatten(1, 2), GRID)
    torch.testing.assert_close(
        frames_of(y2, GRID, 0, 3), frames_of(y, GRID, 0, 3), atol=1e-6, rtol=0
    )
    assert not torch.allclose(frames_of(y2, GRID, 3, 4), frames_of(y, GRID, 3, 4))


def test_blocks_are_independent():
    ssm = make_ssm((2, 3))
    x = torch.randn(1, GRID.frames, GRID.height, GRID.width, 8)
    x2 = x.clone()
    x2[0, 1, 0, 1] += 1.0  # frame 1, a token in block (0, 0)
    with torch.no_grad():
        y = ssm(x.flatten(1, 3), GRID).view_as(x)
        y2 = ssm(x2.flatten(1, 3), GRID).view_as(x)
    changed = (y2 - y).abs().amax(dim=(0, 1, 4)) > 1e-6  # (h, w): which positions moved
    expected = torch.zeros(GRID.height, GRID.width, dtype=torch.bool)
    expected[:2, :3] = True
    assert torch.equal(changed, expected)
    torch.testing.assert_close(y2[:, 0], y[:, 0], atol=1e-6, rtol=0)  # nor the earlier frame


def test_blockwise_rejects_bad_grid():
    ssm = make_ssm((3, 3))
    with pytest.raises(ValueError):
        ssm(torch.randn(1, GRID.num_tokens, 8), GRID)
