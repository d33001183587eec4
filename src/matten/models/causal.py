"""A causal backbone for autoregressive long-video generation with diffusion forcing.

Every frame carries its own noise level t (B, F), so one network both denoises the newest frames
and reads the clean past. Frame f never sees frames after f, and what it sees of the past costs
the same at every f, so a video of any length is generated chunk by chunk at a constant cost per
frame. Each block is

    spatial attention within each frame (as Latte)
    -> hybrid memory layer: local  = sliding-window temporal attention (exact recent motion)
                            global = block-wise temporal SSM ("ssm") and/or a gated delta-rule
                                     memory written by the tokens evicted from the window ("delta")
                            fused  = local + ssm + gamma_t * delta       (gamma_t: PositionRouter)
    -> MLP

all adaLN-Zero modulated per frame. The local window is *same-position*: a token attends to the
tokens at its own spatial position in its frame and the ``window - 1`` previous frames (plus the
first ``sink`` frames, always visible). That keeps the KV cache at (window - 1 + sink) tokens per
position; spatial mixing happens in the spatial attention. The delta memory is routed by gamma_t
(VideoSSM: the memory holds little early on); the SSM, a separate scan over time as in the
block-wise SSM world model, is added as is. There is no absolute temporal position embedding:
time enters only through causality and the router's rho_t = (t + 1) / T_ref (T_ref, the training
context length).

Training runs a whole clip at once (block-causal masks); generation calls :meth:`step` on each
chunk of frames with a :class:`CausalState` holding the KV cache of the window, the SSM states and
the delta memory. ``step(..., commit=False)`` denoises without touching the state (a sampler calls
it at every denoising step); ``commit`` then writes the final clean chunk. The training pass is the
same computation as streaming the clip from an empty state, so both give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..ssm import TokenGrid
from ..ssm import scan_order as order
from .attention import Attention, Mlp
from .backbone import ClassConditioned, FinalLayer
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_1d, unpatchify
from .layers import AttentionLayer, Condition, gated, modulate
from .memory import BlockwiseTemporalSSM, GatedDeltaMemory, MambaState, PositionRouter

MEMORY_KINDS = ("none", "ssm", "delta", "both")


def spatial_pos_embed(dim: int, height: int, width: int, device=None,
                      dtype=torch.float32) -> Tensor:
    """Fixed 2-D sin-cos positions (1, h*w, dim), the same for every frame."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for the sin-cos embedding")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)
    return torch.from_numpy(table).to(device=device, dtype=dtype)[None]


def layer_block_sizes(spec, depth: int) -> list[tuple[int, int]]:
    """The block-wise SSM's block size (b_h, b_w) for each of ``depth`` layers, from one size
    for all (an int, or a pair of ints: always read as one (b_h, b_w)) or a list of ``depth``
    of them (coarser blocks deeper, say)."""
    def pair(size) -> tuple[int, int]:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(n, int) and n >= 1 for n in size):
            raise ValueError(f"an SSM block size must be an int or (b_h, b_w) >= 1, got {size!r}")
        return size

    if isinstance(spec, int) or (len(spec) == 2 and all(isinstance(n, int) for n in spec)):
        return [pair(spec)] * depth
    if len(spec) != depth:
        raise ValueError(f"ssm_block_size lists {len(spec)} sizes for {depth} layers")
    return [pair(size) for size in spec]


def window_mask(query_frames: Tensor, key_frames: Tensor, window: int, sink: int) -> Tensor:
    """Boolean (Lq, Lk): key frame j is visible to query frame i iff j <= i and j is one of the
    ``window`` most recent frames (i - window < j) or a sink frame (j < sink)."""
    q, k = query_frames[:, None], key_frames[None, :]
    return (k <= q) & ((k > q - window) | (k < sink))


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

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


@dataclass
class CausalState:
    """Everything generation carries from one chunk to the next: its size stops growing once
    ``frames`` passes the window, whatever the video length."""
    batch: int
    frames: int = 0                      # frames committed so far
    layers: list[LayerState] = field(default_factory=list)

    def num_elements(self) -> int:
        return sum(t.numel() for layer in self.layers for t in layer.tensors())


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class HybridMemoryLayer(nn.Module):
    """Sliding-window temporal attention fused with optional SSM / delta-rule global memory,
    then an MLP; adaLN-Zero per frame (6 modulation vectors, as a DiT layer)."""

    def __init__(self, dim: int, num_heads: int, window: int, sink: int, memory: str,
                 context_length: int, mlp_ratio: float = 4.0, d_state: int = 16, expand: int = 2,
                 ssm_block_size: tuple[int, int] = (2, 2)):
        super().__init__()
        if memory not in MEMORY_KINDS:
            raise ValueError(f"unknown memory {memory!r}; expected one of {MEMORY_KINDS}")
        self.window, self.sink, self.context_length = window, sink, context_length
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ssm = (BlockwiseTemporalSSM(dim, ssm_block_size, d_state=d_state, expand=expand)
                    if memory in ("ssm", "both") else None)
        self.delta = GatedDeltaMemory(dim, num_heads) if memory in ("delta", "both") else None
        self.router = PositionRouter() if self.delta is not None else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    # Frames held by the KV cache after ``n`` committed frames: the sinks, then the recent ones.
    def _sink_frames(self, n: int) -> list[int]:
        return list(range(min(self.sink, n)))

    def _recent_frames(self, n: int) -> list[int]:
        return list(range(max(self.sink, n - self.window + 1), n))

    def forward(self, x: Tensor, cond: Condition, grid: TokenGrid, start: int,
                state: LayerState, commit: bool) -> tuple[Tensor, LayerState | None]:
        """x: (B, n*h*w, D) tokens of frames start .. start + n - 1 -> (x, new state or None)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(
            cond.vector).chunk(6, dim=-1)
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
            gamma = self.router(frames[None], self.context_length)          # (1, n, 1)
            delta_out = delta_out.view(x.shape[0], grid.frames, grid.tokens_per_frame, -1)
            mixed = mixed + (gamma[..., None].to(delta_out.dtype) * delta_out).flatten(1, 2)
        x = x + gated(mixed, gate_a, grid)
        x = x + gated(self.mlp(modulate(self.norm2(x), shift_m, scale_m, grid)), gate_m, grid)
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


class CausalBlock(nn.Module):
    """Spatial attention within each frame, then the hybrid memory layer."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, **memory_kwargs):
        super().__init__()
        self.spatial = AttentionLayer(dim, num_heads, "spatial", "adan", mlp_ratio)
        self.memory = HybridMemoryLayer(dim, num_heads, mlp_ratio=mlp_ratio, **memory_kwargs)

    def forward(self, x, cond, grid, start, state, commit):
        return self.memory(self.spatial(x, cond, grid), cond, grid, start, state, commit)
# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class ActionEmbedder(nn.Module):
    """Per-frame actions -> (B, F, D), added to the noise-level embedding: discrete actions
    (B, F) through a table, continuous ones (B, F, action_dim) through an MLP."""

    def __init__(self, hidden_size: int, num_actions: int = 0, action_dim: int = 0):
        super().__init__()
        if (num_actions > 0) == (action_dim > 0):
            raise ValueError("give either num_actions (discrete) or action_dim (continuous)")
        self.num_actions, self.action_dim = num_actions, action_dim
        if num_actions:
            self.embed = nn.Embedding(num_actions, hidden_size)
        else:
            self.embed = nn.Sequential(nn.Linear(action_dim, hidden_size), nn.SiLU(),
                                       nn.Linear(hidden_size, hidden_size))

    def forward(self, actions: Tensor, batch: int, frames: int) -> Tensor:
        if self.num_actions:
            if actions.shape != (batch, frames) or actions.is_floating_point():
                raise ValueError(f"expected integer actions of shape ({batch}, {frames}), got "
                                 f"{actions.dtype} {tuple(actions.shape)}")
            if actions.min() < 0 or actions.max() >= self.num_actions:
                raise ValueError(f"actions must be in [0, {self.num_actions})")
            return self.embed(actions)
        if actions.shape != (batch, frames, self.action_dim):
            raise ValueError(f"expected actions of shape ({batch}, {frames}, {self.action_dim}), "
                             f"got {tuple(actions.shape)}")
        return self.embed(actions.to(self.embed[0].weight.dtype))


class CausalVideoBackbone(ClassConditioned, nn.Module):
    """eps_theta(x, t, y, actions) with per-frame noise levels, causal in time; see the module
    docstring. ``forward`` runs a whole clip; ``init_state`` / ``step`` / ``commit`` stream one."""

    def __init__(self, depth: int, hidden_size: int, num_heads: int, patch_size: int = 2,
                 in_channels: int = 4, learn_sigma: bool = True, num_classes: int = 0,
                 class_dropout_prob: float = 0.1, num_actions: int = 0, action_dim: int = 0,
                 window: int = 8, sink: int = 1, memory: str = "both",
                 context_length: int = 16, mlp_ratio: float = 4.0, d_state: int = 16,
                 expand: int = 2, ssm_block_size=(2, 2)):
        super().__init__()
        if window < 1 or sink < 0:
            raise ValueError(f"need window >= 1 and sink >= 0, got window={window}, sink={sink}")
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.window, self.sink, self.memory = hidden_size, window, sink, memory
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
                           if num_classes > 0 else None)
        self.action_embedder = (ActionEmbedder(hidden_size, num_actions, action_dim)
                                if num_actions > 0 or action_dim > 0 else None)
        self.blocks = nn.ModuleList(
            CausalBlock(hidden_size, num_heads, mlp_ratio, window=window, sink=sink, memory=memory,
                        context_length=context_length, d_state=d_state, expand=expand,
                        ssm_block_size=block)
            for block in layer_block_sizes(ssm_block_size, depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, "adan")

    def condition(self, t: Tensor, y: Tensor | None, actions: Tensor | None, batch: int,
                  frames: int) -> Condition:
        """One conditioning vector per frame: noise level (+ action) (+ class)."""
        if t.dim() == 1:
            t = t[:, None].expand(-1, frames)
        if t.shape != (batch, frames):
            raise ValueError(f"expected timesteps of shape ({batch},) or ({batch}, {frames}), "
                             f"got {tuple(t.shape)}")
        vector = self.t_embedder(t)
        if (actions is None) != (self.action_embedder is None):
            raise ValueError("actions are required by an action-conditioned model and refused "
                             "by one without actions")
        if actions is not None:
            vector = vector + self.action_embedder(actions, batch, frames)
        if (y is None) != (self.y_embedder is None):
            raise ValueError("class labels y are required by a class-conditional model and "
                             "refused by an unconditional one")
        if y is not None:
            if y.shape != (batch,):
                raise ValueError(f"expected labels of shape ({batch},), got {tuple(y.shape)}")
            vector = vector + self.y_embedder(y)[:, None]
        return Condition(vector=vector)

    def _check(self, x: Tensor) -> TokenGrid:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, F, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[2] < 1:
            raise ValueError("x has no frames")
        p = self.patch_size
        return TokenGrid(x.shape[2], x.shape[3] // p, x.shape[4] // p)

    def init_state(self, batch: int) -> CausalState:
        """An empty state: nothing generated yet."""
        return CausalState(batch, 0, [LayerState() for _ in self.blocks])

    def _run(self, x: Tensor, t: Tensor, state: CausalState, y, actions, commit: bool):
        grid = self._check(x)
        batch = x.shape[0]
        if state.batch != batch or len(state.layers) != len(self.blocks):
            raise ValueError(f"state is for batch {state.batch} and {len(state.layers)} blocks; "
                             f"got batch {batch} and a model of {len(self.blocks)} blocks")
        tokens = self.patch_embed(x)
        pos = spatial_pos_embed(self.hidden_size, grid.height, grid.width, x.device, tokens.dtype)
        tokens = (tokens.view(batch, grid.frames, grid.tokens_per_frame, -1) + pos[:, None])
        tokens = tokens.flatten(1, 2)
        cond = self.condition(t, y, actions, batch, grid.frames)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            tokens, new_layer = block(tokens, cond, grid, state.frames, layer_state, commit)
            layers.append(new_layer)
        out = self.final_layer(tokens, cond, grid)
        out = unpatchify(out, grid.frames, grid.height, grid.width, self.patch_size,
                         self.out_channels)
        new_state = (replace(state, frames=state.frames + grid.frames, layers=layers) if commit
                     else state)
        return out, new_state

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None,
                actions: Tensor | None = None) -> Tensor:
        """A whole clip from its first frame: x (B, C, F, H, W), t (B,) or (B, F), y (B,),
        actions (B, F) or (B, F, action_dim) -> (B, out_channels, F, H, W), block-causal."""
        return self._run(x, t, self.init_state(x.shape[0]), y, actions, commit=False)[0]

    def step(self, x: Tensor, t: Tensor, state: CausalState, y: Tensor | None = None,
             actions: Tensor | None = None, commit: bool = True) -> tuple[Tensor, CausalState]:
        """The next chunk of frames (1 or more) after those in ``state`` -> (output, state).

        With ``commit=False`` the state is returned unchanged (the same object): use it for every
        denoising step of a chunk, then :meth:`commit` the clean chunk."""
        return self._run(x, t, state, y, actions, commit)

    def commit(self, x: Tensor, t: Tensor, state: CausalState, y: Tensor | None = None,
               actions: Tensor | None = None) -> CausalState:
        """Write a (clean) chunk into the cache and memories; returns the advanced state."""
        return self._run(x, t, state, y, actions, commit=True)[1]


def create_causal_model(input_size: int | tuple[int, int] = 32, in_channels: int = 4,
                        depth: int = 6, hidden_size: int = 384, num_heads: int = 6,
                        patch_size: int = 2, learn_sigma: bool = True, num_classes: int = 0,
                        class_dropout_prob: float = 0.1, num_actions: int = 0,
                        action_dim: int = 0, window: int = 8, sink: int = 1,
                        memory: str = "both", context_length: int = 16, mlp_ratio: float = 4.0,
                        d_state: int = 16, expand: int = 2,
                        ssm_block_size=(2, 2)) -> CausalVideoBackbone:
    """Build a causal backbone; ``model.config`` holds these arguments, enough to rebuild it.

    ``context_length`` is the training clip length (the router's T_ref); ``input_size`` (latent
    H, W) is recorded for samplers, the network accepts any size divisible by the patch (and,
    with SSM memory, by every layer's block of tokens). ``ssm_block_size``: one size for every
    layer (an int or (b_h, b_w)) or a list with one per layer."""
    config = dict(locals())
    if isinstance(config["input_size"], tuple):
        config["input_size"] = list(config["input_size"])
    config["ssm_block_size"] = [list(b) for b in layer_block_sizes(ssm_block_size, depth)]
    model = CausalVideoBackbone(
        depth, hidden_size, num_heads, patch_size=patch_size, in_channels=in_channels,
        learn_sigma=learn_sigma, num_classes=num_classes, class_dropout_prob=class_dropout_prob,
        num_actions=num_actions, action_dim=action_dim, window=window, sink=sink, memory=memory,
        context_length=context_length, mlp_ratio=mlp_ratio, d_state=d_state, expand=expand,
        ssm_block_size=ssm_block_size)
    model.config = config
    return model
