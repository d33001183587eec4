"""The hybrid memory layer of the causal backbone (:mod:`matten.models.causal`).

Sliding-window temporal attention keeps the recent frames exactly; optional global memories carry
what left the window: a block-wise temporal SSM ("ssm") and/or a gated delta-rule memory written
by the evicted tokens ("delta"), fused as local + ssm + gamma_t * delta (gamma_t from a
:class:`~matten.models.memory.PositionRouter`), and/or MALT's segment-recurrent memory of M
vectors ("malt", :mod:`matten.models.malt`, added as is), then an MLP; adaLN-Zero per frame.

The window covers a frame, the ``window - 1`` previous frames and the first ``sink`` frames
(always visible). Within them a token attends to

* ``same_position`` (the default): the tokens at its own spatial position;
* ``frame_local``: every token of those frames, its own frame included (dense within the window,
  causal across frames), so content that moves across the frame reaches it directly.

Both cache the same keys and values (the window's frames, every position), only the mask differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from ..ssm import TokenGrid
from ..ssm import scan_order as order
from .attention import Attention, Mlp
from .layers import Condition, ConditionedLayer, gated, modulate, zero_modulation
from .malt import MaltState, SegmentMemory
from .memory import BlockwiseTemporalSSM, GatedDeltaMemory, MambaState, PositionRouter

_GLOBAL = {"none": (), "ssm": ("ssm",), "delta": ("delta",), "both": ("ssm", "delta")}
# each global memory alone, or with MALT's segment memory: "malt", "malt+ssm", ...
MEMORY_KINDS = tuple(_GLOBAL) + tuple("malt" if k == "none" else f"malt+{k}" for k in _GLOBAL)
WINDOW_KINDS = ("same_position", "frame_local")


def memory_parts(memory: str) -> set[str]:
    """A memory kind -> the memories it combines, e.g. "malt+both" -> {"malt", "ssm", "delta"}."""
    if memory not in MEMORY_KINDS:
        raise ValueError(f"unknown memory {memory!r}; expected one of {MEMORY_KINDS}")
    base = memory.removeprefix("malt").removeprefix("+") or "none"
    return set(_GLOBAL[base]) | ({"malt"} if memory.startswith("malt") else set())


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
    they leave the window; ssm: the block-wise SSM's state; memory: the delta-rule state;
    malt: MALT's memory and its write in progress.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    pending: Tensor | None = None
    ssm: MambaState | None = None
    memory: Tensor | None = None
    malt: MaltState | None = None

    def tensors(self) -> list[Tensor]:
        out = [self.k, self.v, self.pending, self.memory]
        out += list(self.ssm) if self.ssm is not None else []
        out += list(self.malt) if self.malt is not None else []
        return [t for t in out if t is not None]


class HybridMemoryLayer(ConditionedLayer):
    """Sliding-window temporal attention fused with optional SSM / delta-rule / MALT memory,
    then an MLP; adaLN-Zero per frame (6 modulation vectors, as a DiT layer)."""

    num_modulations = 6

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        sink: int,
        memory: str,
        context_length: int,
        mlp_ratio: float = 4.0,
        d_state: int = 16,
        expand: int = 2,
        ssm_block_size: tuple[int, int] = (2, 2),
        window_kind: str = "same_position",
        malt_slots: int = 16,
        malt_segment: int = 4,
    ):
        super().__init__(dim, "temporal", "adan", build_modulation=False)
        parts = memory_parts(memory)
        if window_kind not in WINDOW_KINDS:
            raise ValueError(f"unknown window kind {window_kind!r}; expected one of {WINDOW_KINDS}")
        self.window, self.sink, self.context_length = window, sink, context_length
        self.window_kind = window_kind
        self.norm1 = nn.LayerNorm(dim, **self.norm_kwargs)
        self.attn = Attention(dim, num_heads)
        self.ssm = (
            BlockwiseTemporalSSM(dim, ssm_block_size, d_state=d_state, expand=expand)
            if "ssm" in parts
            else None
        )
        self.delta = GatedDeltaMemory(dim, num_heads) if "delta" in parts else None
        self.router = PositionRouter() if self.delta is not None else None
        self.norm2 = nn.LayerNorm(dim, **self.norm_kwargs)
        self.mlp = Mlp(dim, mlp_ratio)
        # built last, as it always was, so that a seed draws the same weights
        self.modulation = zero_modulation(dim, self.num_modulations)
        # after everything else, so "malt+delta" draws the same other weights as "delta"
        self.malt = (
            SegmentMemory(dim, num_heads, malt_slots, malt_segment) if "malt" in parts else None
        )

    # Frames held by the KV cache after ``n`` committed frames: the sinks, then the recent ones.
    def _sink_frames(self, n: int) -> list[int]:
        return list(range(min(self.sink, n)))

    def _recent_frames(self, n: int) -> list[int]:
        return list(range(max(self.sink, n - self.window + 1), n))

    def forward(
        self,
        x: Tensor,
        cond: Condition,
        grid: TokenGrid,
        start: int,
        state: LayerState,
        commit: bool,
    ) -> tuple[Tensor, LayerState | None]:
        """x: (B, n*h*w, D) tokens of frames start .. start + n - 1 -> (x, new state or None)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulations(cond)
        h = modulate(self.norm1(x), shift_a, scale_a, grid)
        frames = torch.arange(start, start + grid.frames, device=x.device)
        local, kv = self._local(h, grid, frames, start, state)
        mixed = local
        new_ssm = new_memory = rows = new_malt = None
        if self.ssm is not None:
            ssm_out, new_ssm = self.ssm(h, grid, state.ssm, return_state=True)
            mixed = mixed + ssm_out
        if self.delta is not None and self.router is not None:  # built together
            delta_out, new_memory, rows = self._delta(self.delta, h, grid, start, state, commit)
            per_frame = (x.shape[0], grid.frames, -1)  # the router's gamma is one per frame
            mixed = self.router.fuse(
                mixed.reshape(per_frame),
                delta_out.reshape(per_frame),
                frames[None],
                self.context_length,
            ).view_as(x)
        if self.malt is not None:
            frame_tokens = h.view(x.shape[0], grid.frames, grid.tokens_per_frame, -1)
            malt_out, new_malt = self.malt(frame_tokens, start, state.malt)
            mixed = mixed + malt_out
        x = x + gated(mixed, gate_a, grid)
        x = self.mlp_residual(x, shift_m, scale_m, gate_m, grid)
        if not commit:
            return x, None
        state = self._next_state(grid, start, kv, new_ssm, new_memory, rows)
        return x, replace(state, malt=new_malt)

    def _local(self, h: Tensor, grid: TokenGrid, frames: Tensor, start: int, state: LayerState):
        """Windowed attention of the chunk against the cache and itself."""
        q, k, v = self.attn.project(order.global_to_temporal(h, grid))  # (B*hw, heads, n, d)
        key_frames = frames
        if state.k is not None and state.v is not None:
            cached = self._sink_frames(start) + self._recent_frames(start)
            key_frames = torch.cat(
                [torch.tensor(cached, device=h.device, dtype=frames.dtype), frames]
            )
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        mask = window_mask(frames, key_frames, self.window, self.sink)
        if self.window_kind == "same_position":
            out = self.attn.attend(q, k, v, attn_mask=mask)
            return order.temporal_to_global(out, grid), (k, v, key_frames)
        # frame_local: one sequence per sample, frame-major (the global token order), and each
        # frame's entry of the mask widened to all of its h*w tokens
        p = grid.tokens_per_frame
        dq, dk, dv = (rearrange(a, "(b p) heads f d -> b heads (f p) d", p=p) for a in (q, k, v))
        mask = mask.repeat_interleave(p, dim=0).repeat_interleave(p, dim=1)
        return self.attn.attend(dq, dk, dv, attn_mask=mask), (k, v, key_frames)

    def _delta(
        self,
        delta: GatedDeltaMemory,
        h: Tensor,
        grid: TokenGrid,
        start: int,
        state: LayerState,
        commit: bool,
    ):
        """Frame f reads the memory after every non-sink frame <= f - window has been written.

        The frames are written oldest first, one delta-rule chunk each, from the pending recent
        frames of the cache and then the chunk itself; all of the chunk's reads run at once.
        Returns (read-out, memory, the inputs of the pending frames and the chunk, oldest first).
        """
        batch, n = h.shape[0], grid.frames
        chunk = h.view(batch, n, grid.tokens_per_frame, -1)
        pending = (
            chunk if state.pending is None else torch.cat([state.pending.to(h.dtype), chunk], dim=1)
        )
        first = start - (0 if state.pending is None else state.pending.shape[1])
        memory = state.memory if state.memory is not None else delta.init_state(batch, h.device)
        written = max(self.sink, start - self.window + 1)  # frames below are already in memory
        # frames below `stop` are written: what the chunk's last frame reads, and when committing
        # one more, so the memory is ready for the next chunk's first frame
        stop = start + n - self.window + (1 if commit else 0)
        after = [memory] + delta.write_frames(
            memory, pending[:, written - first : max(written, stop) - first]
        )
        # frame f reads the state after frames < f - window + 1: after[f - window + 1 - written]
        index = [
            min(max(f - self.window + 1 - written, 0), len(after) - 1)
            for f in range(start, start + n)
        ]
        states = torch.stack([after[i] for i in index], dim=1)  # (B, n, H, dk, dv)
        reads = delta.read(states.flatten(0, 1), chunk.flatten(0, 1))
        return reads.view(batch, n * grid.tokens_per_frame, -1), after[-1], pending

    def _next_state(
        self, grid: TokenGrid, start: int, kv, ssm, memory, rows: Tensor | None
    ) -> LayerState:
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
