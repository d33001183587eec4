"""Mamba and bidirectional (Vision Mamba) blocks on top of :func:`selective_scan`.

A Mamba mixer maps (batch, L, d_model) -> (batch, L, d_model):

    x, z = in_proj(u)                        # 2 * E * d_model channels
    x    = silu(causal depthwise conv1d(x))  # kernel d_conv = 4
    dt, B, C = x_proj(x)                     # dt_rank + 2N
    y    = selective_scan(x, dt_proj(dt), A = -exp(A_log), B, C, D, z)   # gated by silu(z)
    out  = out_proj(y)

:class:`SelectiveSSM` is the part between in_proj and out_proj (conv1d, x_proj, dt_proj, A_log, D);
:class:`Mamba` wraps one of them, :class:`BiMamba` two, one per scan direction.

A causal scan can also be streamed: given a :class:`MambaState` (the conv's last inputs and the
scan's hidden state), :class:`SelectiveSSM` and :class:`Mamba` continue a sequence where the
previous piece stopped, so a sequence run in pieces gives the output of one run over all of it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise_conv import depthwise_conv1d
from .selective_scan import selective_scan


class MambaState(NamedTuple):
    """What a causal scan needs to continue a sequence: the conv1d's last (d_conv - 1) inputs
    (batch, d_inner, d_conv - 1) and the scan's hidden state (batch, d_inner, d_state)."""

    conv: torch.Tensor
    ssm: torch.Tensor


class SelectiveSSM(nn.Module):
    """One scan direction: causal conv, input-dependent (dt, B, C), and the selective scan."""

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int = 24,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
    ):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # S4D-real initialisation A_n = -(n + 1), stored as log(-A) to keep A negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_dt()

    @torch.no_grad()
    def reset_dt(self):
        """Mamba's dt initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
        if self.dt_proj.weight.is_meta:
            return
        dt_min, dt_max, floor = self._dt_init
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(
            torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    @property
    def conv_width(self) -> int:
        """How many past inputs the causal conv sees besides the current one (d_conv - 1)."""
        return self.conv1d.kernel_size[0] - 1

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> MambaState:
        """The state before the first input: no past conv inputs, a zero hidden state."""
        d_inner = self.conv1d.in_channels
        return MambaState(
            torch.zeros(batch, d_inner, self.conv_width, device=device, dtype=dtype),
            torch.zeros(batch, d_inner, self.d_state, device=device, dtype=dtype),
        )

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        state: MambaState | None = None,
        return_state: bool = False,
        reverse: bool = False,
    ):
        """x, z: (batch, d_inner, L) -> gated scan output (batch, d_inner, L) [, new MambaState].

        Without ``state`` the sequence starts from nothing (zero conv padding, zero hidden
        state); with one it continues the sequence that state ended. ``reverse`` runs the whole
        sequence from its end to its start (conv and scan), as this module applied to the flipped
        sequence and flipped back, without the flips; it does not stream.
        """
        if reverse:
            if state is not None or return_state:
                raise ValueError("a reverse scan runs whole sequences only (no state)")
            # The causal conv of the flipped sequence, flipped back, is the anti-causal conv with
            # the kernel reversed: output t sees inputs t .. t + d_conv - 1.
            conv = depthwise_conv1d(
                x,
                self.conv1d.weight.flip(-1),
                self.conv1d.bias,
                padding=(self.conv_width, self.conv_width),
                crop=(self.conv_width, None),
            )
            return self._scan(F.silu(conv), z, reverse=True)
        if state is None and not return_state:
            # A whole sequence, as Mamba has always run it: the conv's own zero padding (at both
            # ends), cut back to L. The streaming path below pads the left only; the two agree to
            # rounding, not bit for bit, so each keeps the call its past outputs were made with.
            conv = depthwise_conv1d(
                x,
                self.conv1d.weight,
                self.conv1d.bias,
                padding=(self.conv_width, self.conv_width),
                crop=(0, x.shape[-1]),
            )
            return self._scan(F.silu(conv), z)
        # The carried inputs take the place of the zero padding on the left. A fresh start
        # passes no initial state, so that backends which take none (mamba_ssm) still run it.
        if state is None:
            conv_in, h0 = F.pad(x, (self.conv_width, 0)), None
        else:
            if state.ssm.shape[0] != x.shape[0]:
                raise ValueError(f"state is for batch {state.ssm.shape[0]}, input has {x.shape[0]}")
            conv_in, h0 = torch.cat([state.conv.to(x.dtype), x], dim=-1), state.ssm
        conv_out = depthwise_conv1d(conv_in, self.conv1d.weight, self.conv1d.bias)
        y, h_last = self._scan(F.silu(conv_out), z, return_last_state=True, initial_state=h0)
        if not return_state:
            return y
        return y, MambaState(conv_in[..., conv_in.shape[-1] - self.conv_width :], h_last)

    def _scan(self, x: torch.Tensor, z: torch.Tensor, **scan_kwargs):
        """The conv's activated output x -> (dt, B, C) -> selective_scan gated by silu(z)."""
        dt, B, C = channels_first_linear(self.x_proj.weight, None, x).split(
            [self.dt_rank, self.d_state, self.d_state], dim=1
        )
        delta = channels_first_linear(self.dt_proj.weight, None, dt)
        return selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D.float(),
            z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            **scan_kwargs,
        )


def channels_first_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """A linear layer along dim 1: ``x`` (batch, in, L), any strides -> (batch, out, L),
    contiguous. The scan, the conv and x_proj all work channels first; one batched matmul that
    reads ``x`` transposed in place (BLAS takes either order) writes that layout directly, where
    ``nn.Linear`` on a transposed view would first copy it and leave a transposed output."""
    return batched_matmul_plus(
        weight.expand(x.shape[0], -1, -1), x, None if bias is None else bias[:, None]
    )


def batched_matmul_plus(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``a @ b + bias`` for batched matrices (bias broadcast). baddbmm, not bmm + bias: under
    autocast it casts the bias with the product, as nn.Linear does, where a float32 bias added
    to a bfloat16 product would promote the output to float32."""
    return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)


class _MambaMixer(nn.Module):
    """in_proj -> the scan directions -> (their mean) -> out_proj; subclasses run the scans."""

    def __init__(
        self,
        d_model: int,
        directions: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bias: bool = False,
        **ssm_kwargs,
    ):
        super().__init__()
        self.d_model, self.d_inner = d_model, expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.ssms = nn.ModuleList(
            SelectiveSSM(self.d_inner, d_state, d_conv, self.dt_rank, **ssm_kwargs)
            for _ in range(directions)
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def direction(self, index: int) -> SelectiveSSM:
        """The scan of direction ``index`` (0: forward; 1: backward, in BiMamba)."""
        return cast(SelectiveSSM, self.ssms[index])

    def project_in(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, L, d_model) -> the scan input x and the gate z, each (batch, d_inner, L)."""
        # Two products (the weight's halves) rather than one split in two: each half is then a
        # contiguous tensor, which the conv and the scan would otherwise each copy.
        channels = hidden.transpose(1, 2)
        weights, bias = self.in_proj.weight.chunk(2), self.in_proj.bias
        biases = bias.chunk(2) if bias is not None else (None, None)
        x, z = (channels_first_linear(w, b, channels) for w, b in zip(weights, biases, strict=True))
        return x, z

    def project_out(self, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """(batch, d_inner, L) -> (batch, L, d_model), of ``scale * y``: the scale goes into a
        copy of the (d_model, d_inner) weight, not over the activations (a power of two such as
        the 1/2 of BiMamba's mean gives bit for bit the same product)."""
        weight = self.out_proj.weight if scale == 1.0 else self.out_proj.weight * scale
        weight = weight.t().expand(y.shape[0], -1, -1)
        return batched_matmul_plus(y.transpose(1, 2), weight, self.out_proj.bias)


class Mamba(_MambaMixer):
    """The original, causal Mamba mixer (one forward scan), which can also stream."""

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, directions=1, **kwargs)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> MambaState:
        return self.direction(0).init_state(batch, device, dtype)

    def forward(
        self, hidden: torch.Tensor, state: MambaState | None = None, return_state: bool = False
    ):
        """(batch, L, d_model) -> (batch, L, d_model) [, new MambaState]; ``state`` continues
        the sequence it ended (see :meth:`SelectiveSSM.forward`)."""
        x, z = self.project_in(hidden)
        if not return_state:
            return self.project_out(self.direction(0)(x, z, state))
        y, new_state = self.direction(0)(x, z, state, return_state=True)
        return self.project_out(y), new_state


class BiMamba(_MambaMixer):
    """Bidirectional Mamba (Vision Mamba "v2"), the mixer every Matten Mamba layer uses.

    The forward direction scans the sequence as given; the backward direction scans it from the
    end (the same as scanning the flipped sequence and flipping the output back, but without the
    copies: see ``SelectiveSSM.forward(reverse=True)``); the two are averaged before out_proj.
    Shared by the two
    directions: in_proj (so x and z) and out_proj. Separate per direction: conv1d, x_proj,
    dt_proj, A_log and D.
    """

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, directions=2, **kwargs)

    @property
    def forward_ssm(self) -> SelectiveSSM:
        return self.direction(0)

    @property
    def backward_ssm(self) -> SelectiveSSM:
        return self.direction(1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        x, z = self.project_in(hidden)
        backward = self.backward_ssm(x, z, reverse=True)
        return self.project_out(self.forward_ssm(x, z) + backward, scale=0.5)  # their mean
