"""A causal backbone for autoregressive long-video generation with diffusion forcing.

Every frame carries its own noise level t (B, F), so one network both denoises the newest frames
and reads the clean past. Frame f never sees frames after f, and what it sees of the past costs
the same at every f, so a video of any length is generated chunk by chunk at a constant cost per
frame. Each block is

    spatial attention within each frame (as Latte)
    -> hybrid memory layer: local  = sliding-window temporal attention (exact recent motion)
                            global = block-wise temporal SSM ("ssm") and/or a gated delta-rule
                                     memory written by the tokens evicted from the window ("delta")
                                     and/or MALT's M memory vectors, written once per segment of
                                     frames and read by cross-attention ("malt")
                            fused  = local + ssm + gamma_t * delta + malt (gamma_t: PositionRouter)
    -> MLP                                       (the layer: :mod:`matten.models.hybrid`)

all adaLN-Zero modulated per frame. By default the local window is *same-position*: a token
attends to the tokens at its own spatial position in its frame and the ``window - 1`` previous
frames (plus the first ``sink`` frames, always visible); spatial mixing happens in the spatial
attention. ``window_kind="frame_local"`` lets it attend to every token of those frames instead.
Either way the KV cache holds (window - 1 + sink) frames. The delta memory is routed by gamma_t
(VideoSSM: the memory holds little early on); the SSM, a separate scan over time as in the
block-wise SSM world model, is added as is. There is no absolute temporal position embedding:
time enters only through causality and the router's rho_t = (t + 1) / T_ref (T_ref, the training
context length).

Training runs a whole clip at once (block-causal masks); generation calls :meth:`step` on each
chunk of frames with a :class:`CausalState` holding the KV cache of the window, the SSM states,
the delta memory and MALT's memory. ``step(..., commit=False)`` denoises without touching the
state (a sampler calls it at every denoising step); ``commit`` then writes the final clean chunk.
The training pass is the same computation as streaming the clip from an empty state, so both give
the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from ..ssm import TokenGrid
from .denoiser import Denoiser
from .embeddings import spatial_pos_embed
from .hybrid import MEMORY_KINDS, WINDOW_KINDS, HybridMemoryLayer, LayerState, window_mask
from .layers import AttentionLayer, Condition

__all__ = [
    "CAUSAL_NAME",
    "MEMORY_KINDS",
    "WINDOW_KINDS",
    "CausalBlock",
    "CausalState",
    "CausalVideoBackbone",
    "HybridMemoryLayer",
    "LayerState",
    "create_causal_model",
    "layer_block_sizes",
    "window_mask",
]

CAUSAL_NAME = "Matten-Causal"  # the model name (model.config["name"]) of this backbone


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


@dataclass
class CausalState:
    """Everything generation carries from one chunk to the next: its size stops growing once
    ``frames`` passes the window, whatever the video length."""

    batch: int
    frames: int = 0  # frames committed so far
    layers: list[LayerState] = field(default_factory=list)

    def num_elements(self) -> int:
        return sum(t.numel() for layer in self.layers for t in layer.tensors())


class CausalBlock(nn.Module):
    """Spatial attention within each frame, then the hybrid memory layer."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, **memory_kwargs):
        super().__init__()
        self.spatial = AttentionLayer(dim, num_heads, "spatial", "adan", mlp_ratio)
        self.memory = HybridMemoryLayer(dim, num_heads, mlp_ratio=mlp_ratio, **memory_kwargs)

    def forward(self, x, cond, grid, start, state, commit):
        return self.memory(self.spatial(x, cond, grid), cond, grid, start, state, commit)


class CausalVideoBackbone(Denoiser):
    """eps_theta(x, t, y, actions) with per-frame noise levels, causal in time; see the module
    docstring. ``forward`` runs a whole clip; ``init_state`` / ``step`` / ``commit`` stream one."""

    streams = True

    def __init__(
        self,
        depth: int,
        hidden_size: int,
        num_heads: int,
        patch_size: int = 2,
        in_channels: int = 4,
        learn_sigma: bool = True,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        num_actions: int = 0,
        action_dim: int = 0,
        action_dropout_prob: float = 0.0,
        window: int = 8,
        sink: int = 1,
        memory: str = "both",
        context_length: int = 16,
        mlp_ratio: float = 4.0,
        d_state: int = 16,
        expand: int = 2,
        ssm_block_size=(2, 2),
        window_kind: str = "same_position",
        malt_slots: int = 16,
        malt_segment: int = 4,
    ):
        if window < 1 or sink < 0:
            raise ValueError(f"need window >= 1 and sink >= 0, got window={window}, sink={sink}")

        def make_blocks():
            return (
                CausalBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio,
                    window=window,
                    sink=sink,
                    memory=memory,
                    context_length=context_length,
                    d_state=d_state,
                    expand=expand,
                    ssm_block_size=block,
                    window_kind=window_kind,
                    malt_slots=malt_slots,
                    malt_segment=malt_segment,
                )
                for block in layer_block_sizes(ssm_block_size, depth)
            )

        super().__init__(
            make_blocks,
            hidden_size,
            patch_size=patch_size,
            in_channels=in_channels,
            learn_sigma=learn_sigma,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            conditioning="adan",
            num_actions=num_actions,
            action_dim=action_dim,
            action_dropout_prob=action_dropout_prob,
        )
        self.window, self.sink, self.memory = window, sink, memory
        self.window_kind = window_kind

    def positions(self, grid: TokenGrid, device, dtype) -> Tensor:
        # Spatial only, the same for every frame: time enters through causality and the router.
        pos = spatial_pos_embed(self.hidden_size, grid.height, grid.width, device, dtype)
        return pos.repeat(1, grid.frames, 1)

    def run_blocks(
        self,
        tokens: Tensor,
        cond: Condition,
        grid: TokenGrid,
        state: CausalState | None = None,
        commit: bool = False,
    ):
        """The blocks after the frames in ``state`` (none: the clip starts at frame 0) ->
        (tokens, each layer's next state, None unless committing)."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        if state.batch != tokens.shape[0] or len(state.layers) != len(self.blocks):
            raise ValueError(
                f"state is for batch {state.batch} and {len(state.layers)} blocks; "
                f"got batch {tokens.shape[0]} and a model of {len(self.blocks)} "
                "blocks"
            )
        layers = []
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            tokens, new_layer = block(tokens, cond, grid, state.frames, layer_state, commit)
            layers.append(new_layer)
        return tokens, layers

    def init_state(self, batch: int) -> CausalState:
        """An empty state: nothing generated yet."""
        return CausalState(batch, 0, [LayerState() for _ in self.blocks])

    def step(
        self,
        x: Tensor,
        t: Tensor,
        state: CausalState,
        y: Tensor | None = None,
        actions: Tensor | None = None,
        commit: bool = True,
    ) -> tuple[Tensor, CausalState]:
        """The next chunk of frames (1 or more) after those in ``state`` -> (output, state).

        With ``commit=False`` the state is returned unchanged (the same object): use it for every
        denoising step of a chunk, then :meth:`commit` the clean chunk."""
        out, layers = self.denoise(x, t, y, actions, state=state, commit=commit)
        if not commit:
            return out, state
        return out, replace(state, frames=state.frames + x.shape[2], layers=layers)

    def commit(
        self,
        x: Tensor,
        t: Tensor,
        state: CausalState,
        y: Tensor | None = None,
        actions: Tensor | None = None,
    ) -> CausalState:
        """Write a (clean) chunk into the cache and memories; returns the advanced state."""
        return self.step(x, t, state, y, actions, commit=True)[1]


def create_causal_model(
    name: str = CAUSAL_NAME,
    input_size: int | tuple[int, int] = 32,
    in_channels: int = 4,
    depth: int = 6,
    hidden_size: int = 384,
    num_heads: int = 6,
    patch_size: int = 2,
    learn_sigma: bool = True,
    num_classes: int = 0,
    class_dropout_prob: float = 0.1,
    num_actions: int = 0,
    action_dim: int = 0,
    action_dropout_prob: float = 0.0,
    window: int = 8,
    sink: int = 1,
    memory: str = "both",
    context_length: int = 16,
    mlp_ratio: float = 4.0,
    d_state: int = 16,
    expand: int = 2,
    ssm_block_size=(2, 2),
    window_kind: str = "same_position",
    malt_slots: int = 16,
    malt_segment: int = 4,
) -> CausalVideoBackbone:
    """Build a causal backbone; ``model.config`` holds these arguments, enough to rebuild it.

    ``context_length`` is the training clip length (the router's T_ref); ``input_size`` (latent
    H, W) is recorded for samplers, the network accepts any size divisible by the patch (and,
    with SSM memory, by every layer's block of tokens). ``ssm_block_size``: one size for every
    layer (an int or (b_h, b_w)) or a list with one per layer. ``window_kind``: "same_position"
    or "frame_local" (see the module docstring). ``malt_slots`` / ``malt_segment``: with a
    "malt" memory, the memory vectors per layer and the frames written into them at a time
    (generation may use any chunk size: a segment is written when its last frame is committed).
    Checkpoints saved before these options existed rebuild with their defaults, as they ran."""
    if name != CAUSAL_NAME:
        raise ValueError(f"the causal backbone is called {CAUSAL_NAME!r}, not {name!r}")
    config = dict(locals())
    if isinstance(config["input_size"], tuple):
        config["input_size"] = list(config["input_size"])
    config["ssm_block_size"] = [list(b) for b in layer_block_sizes(ssm_block_size, depth)]
    model = CausalVideoBackbone(
        depth,
        hidden_size,
        num_heads,
        patch_size=patch_size,
        in_channels=in_channels,
        learn_sigma=learn_sigma,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
        num_actions=num_actions,
        action_dim=action_dim,
        action_dropout_prob=action_dropout_prob,
        window=window,
        sink=sink,
        memory=memory,
        context_length=context_length,
        mlp_ratio=mlp_ratio,
        d_state=d_state,
        expand=expand,
        ssm_block_size=ssm_block_size,
        window_kind=window_kind,
        malt_slots=malt_slots,
        malt_segment=malt_segment,
    )
    model.config = config
    return model
