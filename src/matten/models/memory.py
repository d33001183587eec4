"""Hybrid memory for long, streamed video generation.

A sliding attention window keeps recent tokens exactly; what falls out of it is compressed here:

* :class:`GatedDeltaMemory` — a fixed-size global memory written by the evicted tokens with the
  gated delta rule and read by the current queries (VideoSSM's "global memory");
* :class:`PositionRouter` — how much of that memory to add, as a function of how far into the
  video we are (little at the start, when the memory is still empty of useful content);
* :class:`BlockwiseTemporalSSM` — a causal scan over time, one state per spatial block of tokens
  (the block-wise SSM of the long-context world model), a causal :class:`~matten.ssm.mamba.Mamba`
  that carries its conv and scan state (:class:`~matten.ssm.mamba.MambaState`) from one chunk of
  frames to the next.

Every state is a plain tensor (or a named tuple of them), so it can be carried across generation
steps, detached, moved or saved with ``torch.save``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..ssm.mamba import Mamba, MambaState
from ..ssm.scan_order import TokenGrid

# --------------------------------------------------------------------------------------------
# Gated delta rule
# --------------------------------------------------------------------------------------------


def _delta_write_loop(M: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor) -> Tensor:
    """Token-by-token recurrence; n Python steps, kept as the plain statement of the rule."""
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]  # (B, H, dk), (B, H, dv)
        M = M * log_decay[:, t, :, None, None].exp()
        pred = torch.einsum("bhkv,bhk->bhv", M, kt)  # (exp(a) M_{t-1})^T k_t
        M = M + beta[:, t, :, None, None] * kt[..., :, None] * (vt - pred)[..., None, :]
    return M


def _delta_write_chunk(M: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    """One chunk in closed form. k: (B, H, C, dk), v: (B, H, C, dv), beta, g: (B, H, C).

    With gamma_i = exp(g_i) (g the cumulative log decay inside the chunk) the recurrence unrolls
    to M_C = gamma_C M_0 + sum_i (gamma_C / gamma_i) k_i d_i^T, where the written values
    d_i = beta_i (v_i - (exp(a_i) M_{i-1})^T k_i) solve the unit lower-triangular system
    d_i + beta_i sum_{j<i} (gamma_i / gamma_j) (k_i . k_j) d_j = beta_i (v_i - gamma_i M_0^T k_i).
    Every ratio of decays that appears is <= 1, so nothing overflows.
    """
    C = k.shape[2]
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    ratio = (g[..., :, None] - g[..., None, :]).masked_fill(~lower, -math.inf).exp()
    system = (beta[..., None] * (k @ k.transpose(-1, -2))) * ratio
    system = system + torch.eye(C, dtype=k.dtype, device=k.device)
    rhs = beta[..., None] * (v - g.exp()[..., None] * (k @ M))
    d = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    tail = (g[..., -1:] - g).exp()[..., None]  # gamma_C / gamma_i
    return g[..., -1, None, None].exp() * M + (k * tail).transpose(-1, -2) @ d


def gated_delta_write(
    M: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor, chunk_size: int | None = 64
) -> Tensor:
    """Write n (key, value) pairs into the memories M with the gated delta rule.

    M: (B, H, dk, dv) maps keys to values (retrieval is M^T q); k: (B, n, H, dk), unit norm;
    v: (B, n, H, dv); beta (write strength, in [0, 1]) and log_decay (alpha <= 0): (B, n, H).
    Per token, in order:

        M_t = exp(alpha_t) M_{t-1} + beta_t k_t (v_t - (exp(alpha_t) M_{t-1})^T k_t)^T
            = exp(alpha_t) (I - beta_t k_t k_t^T) M_{t-1} + beta_t k_t v_t^T

    ``chunk_size=None`` runs that loop (n steps); otherwise chunks of ``chunk_size`` tokens are
    written at once by a triangular solve (:func:`_delta_write_chunk`), n / chunk_size steps.
    Both are differentiable and agree to rounding.
    """
    n = k.shape[1]
    if n == 0:
        return M
    if chunk_size is None:
        return _delta_write_loop(M, k, v, beta, log_decay)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, n, d)
    beta, log_decay = beta.transpose(1, 2), log_decay.transpose(1, 2)
    for s in range(0, n, chunk_size):
        part = slice(s, s + chunk_size)
        M = _delta_write_chunk(
            M, k[:, :, part], v[:, :, part], beta[:, :, part], log_decay[:, :, part].cumsum(-1)
        )
    return M


class _RMSNorm(nn.Module):
    """RMSNorm over the last axis (``nn.RMSNorm`` needs torch >= 2.4; the package allows 2.1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedDeltaMemory(nn.Module):
    """Global memory fed by the tokens evicted from a sliding attention window (Gated DeltaNet,
    Yang et al. 2024, as used by VideoSSM).

    Per head, from a token h: k = normalize(W_k h), v = W_v h, beta = sigmoid(W_beta h),
    alpha = -exp(A) softplus(W_alpha h + B) (one scalar gate each), written into a
    (head_dim x head_dim) state by :func:`gated_delta_write`. The delta rule stores only what the
    memory cannot already predict, so repeated content does not pile up, and the decay lets stale
    content fade. A query token reads o = W_o(Swish(W_g h) * RMSNorm(M^T q)), q = normalize(W_q h).

    A starts small (exp(A) log-uniform in ``decay_init``), so the per-token decays start near 1:
    about 0.993 to 0.99993, i.e. with 256 evicted tokens per frame a half-life from under one
    frame to about 40 frames across the heads. W_o starts at zero, so a fresh memory adds nothing
    to the layer it sits in.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        chunk_size: int | None = 64,
        decay_init: tuple[float, float] = (1e-4, 1e-2),
    ):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.chunk_size = chunk_size
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.g_proj = nn.Linear(dim, inner, bias=False)
        self.beta_proj = nn.Linear(dim, num_heads, bias=True)
        self.alpha_proj = nn.Linear(dim, num_heads, bias=False)
        lo, hi = decay_init
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(math.log(lo), math.log(hi)))
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))  # the B of the decay gate
        self.norm = _RMSNorm(head_dim)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        nn.init.zeros_(self.out_proj.weight)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def write_inputs(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """tokens (B, n, D) -> k, v (B, n, H, d), beta, log_decay (B, n, H)."""
        k = F.normalize(self._heads(self.k_proj(tokens)), dim=-1, eps=1e-6)
        v = self._heads(self.v_proj(tokens))
        beta = torch.sigmoid(self.beta_proj(tokens))
        log_decay = -self.A_log.exp() * F.softplus(self.alpha_proj(tokens) + self.dt_bias)
        return k, v, beta, log_decay

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> Tensor:
        """An empty memory (B, H, dk, dv); float32 unless the module is in float64."""
        dtype = dtype or torch.promote_types(self.q_proj.weight.dtype, torch.float32)
        return torch.zeros(
            batch, self.num_heads, self.head_dim, self.head_dim, device=device, dtype=dtype
        )

    def write(self, state: Tensor, tokens: Tensor) -> Tensor:
        """Write evicted tokens (B, n, D), oldest first; returns the new state (state's dtype).

        The update runs in at least float32 whatever the tokens' dtype, since the state
        accumulates over the whole video.
        """
        return self.write_frames(state, tokens[:, None])[0]

    def write_frames(self, state: Tensor, frames: Tensor) -> list[Tensor]:
        """Write frames (B, n, m, D) one after another (m tokens each, oldest frame first) ->
        the n states after each frame. The projections run once for all frames; only the
        recurrence steps frame by frame."""
        n, m = frames.shape[1:3]
        if n == 0:
            return []
        compute = torch.promote_types(state.dtype, torch.float32)
        inputs = [
            t.to(compute).unflatten(1, (n, m)) for t in self.write_inputs(frames.flatten(1, 2))
        ]
        M, states = state.to(compute), []
        for f in range(n):
            k, v, beta, log_decay = (t[:, f] for t in inputs)
            M = gated_delta_write(M, k, v, beta, log_decay, self.chunk_size)
            states.append(M.to(state.dtype))
        return states

    @staticmethod
    def retrieve_raw(state: Tensor, q: Tensor) -> Tensor:
        """M^T q per head: state (B, H, dk, dv), q (B, m, H, dk) -> (B, m, H, dv), in the wider of
        the two dtypes (a float32 state read by bfloat16 queries is read in float32)."""
        dtype = torch.promote_types(state.dtype, q.dtype)
        return torch.einsum("bhkv,bmhk->bmhv", state.to(dtype), q.to(dtype))

    def read(self, state: Tensor, queries: Tensor) -> Tensor:
        """Query tokens (B, m, D) -> memory read-out (B, m, D). Frames that read different
        states go in the batch: states (B*n, H, dk, dv), queries (B*n, m, D)."""
        q = F.normalize(self._heads(self.q_proj(queries)), dim=-1, eps=1e-6)
        o = self.norm(self.retrieve_raw(state, q))
        o = F.silu(self._heads(self.g_proj(queries))) * o
        return self.out_proj(o.flatten(-2).to(queries.dtype))

    def forward(
        self, tokens_to_write: Tensor | None, queries: Tensor, state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Write the evicted tokens, then read with the queries: (out (B, m, D), new state)."""
        if state is None:
            state = self.init_state(queries.shape[0], queries.device)
        if tokens_to_write is not None:
            state = self.write(state, tokens_to_write)
        return self.read(state, queries), state


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


class PositionRouter(nn.Module):
    """gamma_t = sigmoid(w log(rho_t) + b), rho_t = (t + 1) / T_ref; fused = local + gamma global.

    Early in a video (t + 1 << T_ref) the memory holds little, so for w > 0 gamma is small; it
    grows with t and passes sigmoid(b) at the reference (training context) length.
    """

    def __init__(self, w: float = 1.0, b: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, frame_index: Tensor | int, ref_length: float) -> Tensor:
        """frame_index: int or (B,) -> gamma (B, 1, 1) ((1, 1, 1) for an int).

        A (B, n) index (one frame per token) gives (B, n, 1).
        """
        t = torch.as_tensor(frame_index, device=self.w.device)
        t = t.reshape(1) if t.dim() == 0 else t
        rho = (t.to(self.w.dtype) + 1) / float(ref_length)
        gamma = torch.sigmoid(self.w * torch.log(rho) + self.b)
        return gamma.reshape(t.shape[0], -1, 1)

    def fuse(
        self, local: Tensor, global_: Tensor, frame_index: Tensor | int, ref_length: float
    ) -> Tensor:
        return local + self(frame_index, ref_length).to(global_.dtype) * global_


# --------------------------------------------------------------------------------------------
# Block-wise temporal SSM
# --------------------------------------------------------------------------------------------


class BlockwiseTemporalSSM(nn.Module):
    """Causal scan over time, one sequence per spatial block of b_h x b_w tokens.

    One state for a whole frame would have to remember every place in the scene; one state per
    block gives each region its own memory (more state in total, at the same cost per token),
    while the b_h x b_w tokens inside a block still mix. A block's sequence is time-major: its
    tokens of frame 0 in raster order, then of frame 1, ... so the scan is causal in time and the
    state after a chunk of frames continues into the next chunk (``return_state``).

    Input and output tokens are in the global spatial-first order of :mod:`matten.ssm.scan_order`.
    """

    def __init__(
        self,
        dim: int,
        block_size: tuple[int, int] = (4, 4),
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
    ):
        super().__init__()
        self.block_size = tuple(block_size)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)

    def _block_counts(self, grid: TokenGrid) -> tuple[int, int]:
        bh, bw = self.block_size
        if grid.height % bh or grid.width % bw:
            raise ValueError(
                f"token grid {grid.height}x{grid.width} is not divisible into {bh}x{bw} blocks"
            )
        return grid.height // bh, grid.width // bw

    def to_blocks(self, x: Tensor, grid: TokenGrid) -> Tensor:
        """(B, F*h*w, D) -> (B * blocks, F*b_h*b_w, D), one time-major sequence per block."""
        grid.check(x)
        nh, nw = self._block_counts(grid)
        bh, bw = self.block_size
        return rearrange(
            x,
            "b (f nh bh nw bw) d -> (b nh nw) (f bh bw) d",
            f=grid.frames,
            nh=nh,
            bh=bh,
            nw=nw,
            bw=bw,
        )

    def from_blocks(self, x: Tensor, grid: TokenGrid) -> Tensor:
        """Inverse of :meth:`to_blocks`."""
        nh, nw = self._block_counts(grid)
        bh, bw = self.block_size
        return rearrange(
            x,
            "(b nh nw) (f bh bw) d -> b (f nh bh nw bw) d",
            f=grid.frames,
            nh=nh,
            bh=bh,
            nw=nw,
            bw=bw,
        )

    def forward(
        self,
        x: Tensor,
        grid: TokenGrid,
        state: MambaState | None = None,
        return_state: bool = False,
    ):
        """x (B, F*h*w, D) for the next F frames -> (B, F*h*w, D) [, state after them]."""
        # Always the streaming path, even for a whole clip, so every call runs the same conv.
        y, new_state = self.mamba(self.to_blocks(x, grid), state, return_state=True)
        y = self.from_blocks(y, grid)
        return (y, new_state) if return_state else y
