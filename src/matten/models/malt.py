"""MALT's segment-recurrent memory (Memory-Augmented Latent Transformers, arXiv 2502.12632).

Each layer keeps M memory vectors (``slots``) that summarise everything before the current
segment of ``segment`` frames; M is fixed, so the memory never grows with the video.

* read ("memory query"): the tokens of a frame attend to the M vectors (cross-attention); the
  output projection starts at zero, so a fresh memory adds nothing to its layer;
* write ("memory update"): when a segment ends, every slot attends to the segment's tokens and
  the slot's new value is a gated mix of the old one and what it read,
  ``m' = (1 - z) * m + z * u`` with ``z = sigmoid(W_z [norm(m), u])`` per channel, so a slot can
  keep its content or overwrite it. A convex mix of bounded vectors stays bounded: no drift in
  scale, however long the video.

Frames of segment s read the memory written from segments 0 .. s-1 only, so the whole-clip
(training) pass is causal and equals streaming. Streaming may commit a segment in pieces (chunks
of any size, not aligned to segments): the write's attention over the segment's tokens is then
accumulated piece by piece with an online softmax (running max, sum of exponentials and weighted
values, as flash attention does), so the state is the same size after every frame and a segment
written a frame at a time equals one written at once.

Training may regularise the memory (the review's "memory regularisation",
:func:`memory_regularizer`): inside :func:`recording_writes` every layer keeps the memory after
each write, and :func:`memory_penalty` turns them into one number to add to the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MaltState",
    "SegmentMemory",
    "memory_redundancy",
    "memory_diversity",
    "memory_regularizer",
    "recording_writes",
    "memory_penalty",
    "DIVERSITY_WEIGHT",
]

# The review's weight of the diversity reward against the redundancy penalty.
DIVERSITY_WEIGHT = 0.1


class MaltState(NamedTuple):
    """One layer's memory and the segment's write in progress (its online-softmax sums).

    memory: (B, M, D); top: (B, H, M) the largest logit so far; total: (B, H, M) the sum of
    exp(logit - top); weighted: (B, H, M, d) the sum of exp(logit - top) * value.
    """

    memory: Tensor
    top: Tensor
    total: Tensor
    weighted: Tensor


class SegmentMemory(nn.Module):
    """M memory vectors per layer, read by every token and written once per segment."""

    def __init__(self, dim: int, num_heads: int, slots: int = 16, segment: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        if slots < 1 or segment < 1:
            raise ValueError(f"need malt slots and segment >= 1, got {slots}, {segment}")
        self.num_heads, self.slots, self.segment = num_heads, slots, segment
        # distinct random slots, so that each starts out reading something different
        self.initial = nn.Parameter(torch.randn(slots, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.read_q = nn.Linear(dim, dim, bias=False)
        self.read_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.read_out = nn.Linear(dim, dim)
        self.write_q = nn.Linear(dim, dim, bias=False)
        self.write_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.write_out = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.read_out.weight)
        nn.init.zeros_(self.read_out.bias)
        self.recorded: list[Tensor] | None = None  # the memory after each write, when recording

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, L, D / H)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> MaltState:
        """The learned initial memory and an empty write, in the module's dtype (the memory is
        a convex mix of bounded vectors, so it does not pile up rounding the way a sum would)."""
        dtype = dtype or self.initial.dtype
        memory = self.initial.to(device=device, dtype=dtype).expand(batch, -1, -1)
        sums = (batch, self.num_heads, self.slots)
        head_dim = self.initial.shape[1] // self.num_heads
        return MaltState(
            memory,
            torch.full(sums, -torch.inf, device=device, dtype=dtype),
            torch.zeros(sums, device=device, dtype=dtype),
            torch.zeros(*sums, head_dim, device=device, dtype=dtype),
        )

    def read(self, memory: Tensor, tokens: Tensor) -> Tensor:
        """Tokens (B, L, D) attend to the memory (B, M, D) -> (B, L, D)."""
        k, v = self.read_kv(self.norm(memory).to(tokens.dtype)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            self._heads(self.read_q(tokens)), self._heads(k), self._heads(v)
        )
        return self.read_out(out.transpose(1, 2).flatten(2))

    def accumulate(self, state: MaltState, tokens: Tensor) -> MaltState:
        """Add tokens (B, L, D) of the current segment to the slots' running attention."""
        memory = state.memory
        q = self._heads(self.write_q(self.norm(memory)))  # (B, H, M, d)
        k, v = (self._heads(t) for t in self.write_kv(tokens).chunk(2, dim=-1))
        logits = (q @ k.transpose(-1, -2)).to(memory.dtype) * q.shape[-1] ** -0.5  # (B,H,M,L)
        top = torch.maximum(state.top, logits.amax(-1))
        rescale = (state.top - top).exp()  # the old sums, re-expressed against the new max
        weights = (logits - top[..., None]).exp()
        return MaltState(
            memory,
            top,
            state.total * rescale + weights.sum(-1),
            state.weighted * rescale[..., None] + (weights @ v.to(memory.dtype)),
        )

    def write(self, state: MaltState) -> MaltState:
        """End of a segment: the gated update of every slot, then an empty write."""
        memory = state.memory
        read = (state.weighted / state.total[..., None]).transpose(1, 2).flatten(2)  # (B, M, D)
        update = self.write_out(read).to(memory.dtype)
        z = torch.sigmoid(self.gate(torch.cat([self.norm(memory), update], dim=-1)))
        memory = (1 - z) * memory + z * update
        if self.recorded is not None:
            self.recorded.append(memory)
        return MaltState(
            memory,
            torch.full_like(state.top, -torch.inf),
            torch.zeros_like(state.total),
            torch.zeros_like(state.weighted),
        )

    def forward(
        self, frames: Tensor, start: int, state: MaltState | None
    ) -> tuple[Tensor, MaltState]:
        """frames (B, n, h*w, D): the inputs of frames start .. start + n - 1 -> (read-out
        (B, n*h*w, D), the state after them). Each run of frames inside one segment reads the
        same memory, then joins that segment's write; the memory changes at segment ends."""
        batch, n = frames.shape[:2]
        if state is None:
            state = self.init_state(batch, frames.device)
        outs, f = [], 0
        while f < n:
            end = min(n, f + self.segment - (start + f) % self.segment)  # this segment's end
            piece = frames[:, f:end].flatten(1, 2)
            outs.append(self.read(state.memory, piece))
            state = self.accumulate(state, piece)
            if (start + end) % self.segment == 0:
                state = self.write(state)
            f = end
        return torch.cat(outs, dim=1), state


# --------------------------------------------------------------------------------------------
# The memory regulariser (training only)
# --------------------------------------------------------------------------------------------


def memory_redundancy(memory: Tensor) -> Tensor:
    """Mean squared cosine similarity between distinct slots of memory (B, M, D): 0 when the
    slots are orthogonal, 1 when they all point the same way (M = 1: 0)."""
    unit = F.normalize(memory, dim=-1)
    cos = unit @ unit.transpose(-1, -2)  # (B, M, M)
    slots = memory.shape[-2]
    if slots < 2:
        return memory.new_zeros(())
    off_diagonal = ~torch.eye(slots, dtype=torch.bool, device=memory.device)
    return cos[:, off_diagonal].square().mean()


def memory_diversity(memory: Tensor) -> Tensor:
    """The review's diversity: each slot's spread over its channels (std), averaged; a slot
    that has collapsed to a constant vector carries no information. Measured on unit-length
    slots, so the reward cannot grow by scaling the memory up."""
    return F.normalize(memory, dim=-1).std(dim=-1).mean()


def memory_regularizer(memory: Tensor) -> Tensor:
    """Redundancy penalty minus the diversity reward (the review's memory_regularization_loss,
    both on unit-length slots, so the loss does not depend on the slots' scale and is bounded)."""
    return memory_redundancy(memory) - DIVERSITY_WEIGHT * memory_diversity(memory)


@contextmanager
def recording_writes(model: nn.Module) -> Iterator[list[SegmentMemory]]:
    """While inside, every :class:`SegmentMemory` of ``model`` keeps its memory after each
    write (with the graph, for the loss); yields those layers (none: the model has no MALT)."""
    layers = [m for m in model.modules() if isinstance(m, SegmentMemory)]
    for layer in layers:
        layer.recorded = []
    try:
        yield layers
    finally:
        for layer in layers:
            layer.recorded = None


def memory_penalty(layers: list[SegmentMemory]) -> Tensor | None:
    """The regulariser averaged over every write of every layer recorded (None: no write, e.g.
    clips shorter than a segment)."""
    writes = [memory for layer in layers for memory in (layer.recorded or [])]
    if not writes:
        return None
    return torch.stack([memory_regularizer(memory) for memory in writes]).mean()
