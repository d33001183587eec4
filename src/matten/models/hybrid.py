"""The hybrid memory layer of the causal backbone (:mod:`matten.models.causal`).

Sliding-window temporal attention keeps the recent frames exactly; optional global memories carry
what left the window: a block-wise temporal SSM ("ssm") and/or a gated delta-rule memory written
by the evicted tokens ("delta"), fused as local + ssm + gamma_t * delta (gamma_t from a
:class:`~matten.models.memory.PositionRouter`), then an MLP; adaLN-Zero per frame. The window is
*same-position*: a token attends to the tokens at its own spatial position in its frame and the
``window - 1`` previous frames, plus the first ``sink`` frames (always visible).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ssm import TokenGrid
from ..ssm import scan_order as order
from .attention import Attention, Mlp
from .layers import Condition, ConditionedLayer, gated, modulate, zero_modulation
from .memory import BlockwiseTemporalSSM, GatedDeltaMemory, MambaState, PositionRouter

MEMORY_KINDS = ("none", "ssm", "delta", "both")


def window_mask(query_frames: Tensor, key_frames: Tensor, window: int, sink: int) -> Tensor:
    """Boolean (Lq, Lk): key frame j is visible to query frame i iff j <= i and j is one of the
    ``window`` most recent frames (i - window < j) or a sink frame (j < sink)."""
    q, k = query_frames[:, None], key_frames[None, :]
    return (k <= q) & ((k > q - window) | (k < sink))


@dataclass
class LayerState:
    """One hybrid memory layer's carried state; None until the first commit.

    k, v: (B*h*w, heads, cached frames, head_dim) for the sink frames then the recent ones;
    pending: (B, recent frames, h*w, D) the recent frames' inputs, written into ``memory`` when
    they leave the window; ssm: the block-wise SSM's state; memory: the delta-rule state.
    """
    k: Tensor | None = None
    v: Tensor | None = None
    pending: Tensor | None = None
    ssm: MambaState | None = None
    memory: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        out = [self.k, self.v, self.pending, self.memory]
        out += list(self.ssm) if self.ssm is not None else []
        return [t for t in out if t is not None]


class HybridMemoryLayer(ConditionedLayer):
    """Sliding-window temporal attention fused with optional SSM / delta-rule global memory,
    then an MLP; adaLN-Zero per frame (6 modulation vectors, as a DiT layer)."""

    num_modulations = 6

    def __init__(self, dim: int, num_heads: int, window: int, sink: int, memory: str,
                 context_length: int, mlp_ratio: float = 4.0, d_state: int = 16, expand: int = 2,
                 ssm_block_size: tuple[int, int] = (2, 2)):
        super().__init__(dim, "temporal", "adan", build_modulation=False)
        if memory not in MEMORY_KINDS:
            raise ValueError(f"unknown memory {memory!r}; expected one of {MEMORY_KINDS}")
        self.window, self.sink, self.context_length = window, sink, context_length
        self.norm1 = nn.LayerNorm(dim, **self.norm_kwargs)
        self.attn = Attention(dim, num_heads)
        self.ssm = (BlockwiseTemporalSSM(dim, ssm_block_size, d_state=d_state, expand=expand)
                    if memory in ("ssm", "both") else None)
        self.delta = GatedDeltaMemory(dim, num_heads) if memory in ("delta", "both") else None
        self.router = PositionRouter() if self.delta is not None else None
        self.norm2 = nn.LayerNorm(dim, **self.norm_kwargs)
        self.mlp = Mlp(dim, mlp_ratio)
        # built last, as it always was, so that a seed draws the same weights
        self.modulation = zero_modulation(dim, self.num_modulations)

    # Frames held by the KV cache after ``n`` committed frames: the sinks, then the recent ones.
    def _sink_frames(self, n: int) -> list[int]:
        return list(range(min(self.sink, n)))

    def _recent_frames(self, n: int) -> list[int]:
        return list(range(max(self.sink, n - self.window + 1), n))

    def forward(self, x: Tensor, cond: Condition, grid: TokenGrid, start: int,
                state: LayerState, commit: bool) -> tuple[Tensor, LayerState | None]:
        """x: (B, n*h*w, D) tokens of frames start .. start + n - 1 -> (x, new state or None)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulations(cond)
        h = modulate(self.norm1(x), shift_a, scale_a, grid)
        frames = torch.arange(start, start + grid.frames, device=x.device)
        local, kv = self._local(h, grid, frames, start, state)
        mixed = local
        new_ssm = new_memory = rows = None
        if self.ssm is not None:
            ssm_out, new_ssm = self.ssm(h, grid, state.ssm, return_state=True)
            mixed = mixed + ssm_out
        if self.delta is not None:
            delta_out, new_memory, rows = self._delta(h, grid, start, state, commit)
            per_frame = (x.shape[0], grid.frames, -1)   # the router's gamma is one per frame
            mixed = self.router.fuse(mixed.reshape(per_frame), delta_out.reshape(per_frame),
                                     frames[None], self.context_length).view_as(x)
        x = x + gated(mixed, gate_a, grid)
        x = self.mlp_residual(x, shift_m, scale_m, gate_m, grid)
        if not commit:
            return x, None
        return x, self._next_state(grid, start, kv, new_ssm, new_memory, rows)

    def _local(self, h: Tensor, grid: TokenGrid, frames: Tensor, start: int, state: LayerState):
        """Same-position windowed attention of the chunk against the cache and itself."""
        q, k, v = self.attn.project(order.global_to_temporal(h, grid))  # (B*hw, heads, n, d)
        key_frames = frames
        if state.k is not None:
            cached = self._sink_frames(start) + self._recent_frames(start)
            key_frames = torch.cat([torch.tensor(cached, device=h.device, dtype=frames.dtype),
                                    frames])
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        mask = window_mask(frames, key_frames, self.window, self.sink)
        out = self.attn.attend(q, k, v, attn_mask=mask)
        return order.temporal_to_global(out, grid), (k, v, key_frames)

    def _delta(self, h: Tensor, grid: TokenGrid, start: int, state: LayerState, commit: bool):
        """Frame f reads the memory after every non-sink frame <= f - window has been written.

        The frames are written oldest first, one delta-rule chunk each, from the pending recent
        frames of the cache and then the chunk itself; all of the chunk's reads run at once.
        Returns (read-out, memory, the inputs of the pending frames and the chunk, oldest first).
        """
        batch, n = h.shape[0], grid.frames
        chunk = h.view(batch, n, grid.tokens_per_frame, -1)
        pending = chunk if state.pending is None else torch.cat([state.pending.to(h.dtype),
                                                                 chunk], dim=1)
        first = start - (0 if state.pending is None else state.pending.shape[1])
        memory = state.memory if state.memory is not None else self.delta.init_state(
            batch, h.device)
        written = max(self.sink, start - self.window + 1)   # frames below are already in memory
        # frames below `stop` are written: what the chunk's last frame reads, and when committing
        # one more, so the memory is ready for the next chunk's first frame
        stop = start + n - self.window + (1 if commit else 0)
        after = [memory] + self.delta.write_frames(
            memory, pending[:, written - first:max(written, stop) - first])
        # frame f reads the state after frames < f - window + 1: after[f - window + 1 - written]
        index = [min(max(f - self.window + 1 - written, 0), len(after) - 1)
                 for f in range(start, start + n)]
        states = torch.stack([after[i] for i in index], dim=1)      # (B, n, H, dk, dv)
        reads = self.delta.read(states.flatten(0, 1), chunk.flatten(0, 1))
        return reads.view(batch, n * grid.tokens_per_frame, -1), after[-1], pending

    def _next_state(self, grid: TokenGrid, start: int, kv, ssm, memory,
                     rows: Tensor | None) -> LayerState:
        """Keep the sinks' and the last ``window - 1`` frames' keys and values (and, from
        ``rows``, the inputs of frames end - rows .. end - 1, those to be written into the delta
        memory when they leave the window); drop the rest."""
        k, v, key_frames = kv
        end = start + grid.frames
        position = {f: i for i, f in enumerate(key_frames.tolist())}
        keep = self._sink_frames(end) + self._recent_frames(end)
        index = torch.tensor([position[f] for f in keep], device=k.device, dtype=torch.long)
        pending = None
        if rows is not None:
            recent = torch.tensor(self._recent_frames(end), device=k.device, dtype=torch.long)
            pending = rows.index_select(1, recent - (end - rows.shape[1]))
        return LayerState(k.index_select(2, index), v.index_select(2, index), pending, ssm, memory)
