"""Mamba and bidirectional (Vision Mamba) blocks on top of :func:`selective_scan`.

A Mamba mixer maps (batch, L, d_model) -> (batch, L, d_model):

    x, z = in_proj(u)                        # 2 * E * d_model channels
    x    = silu(causal depthwise conv1d(x))  # kernel d_conv = 4
    dt, B, C = x_proj(x)                     # dt_rank + 2N
    y    = selective_scan(x, dt_proj(dt), A = -exp(A_log), B, C, D, z)   # gated by silu(z)
    out  = out_proj(y)

:class:`SelectiveSSM` is the part between in_proj and out_proj (conv1d, x_proj, dt_proj, A_log, D);
:class:`Mamba` wraps one of them, :class:`BiMamba` two, one per scan direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .selective_scan import selective_scan


class SelectiveSSM(nn.Module):
    """One scan direction: causal conv, input-dependent (dt, B, C), and the selective scan."""

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 24,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias)
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
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (batch, d_inner, L) -> gated scan output (batch, d_inner, L)."""
        length = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :length])
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        return selective_scan(x, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2),
                              C.transpose(1, 2), self.D.float(), z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)


class _MambaMixer(nn.Module):
    """in_proj -> the scan directions -> mean -> out_proj."""

    def __init__(self, d_model: int, directions: int, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | None = None, bias: bool = False, **ssm_kwargs):
        super().__init__()
        self.d_model, self.d_inner = d_model, expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.ssms = nn.ModuleList(
            SelectiveSSM(self.d_inner, d_state, d_conv, self.dt_rank, **ssm_kwargs)
            for _ in range(directions))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def scan_directions(self, x: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        outputs = self.scan_directions(x, z)
        y = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)
        return self.out_proj(y.transpose(1, 2))


class Mamba(_MambaMixer):
    """The original, causal Mamba mixer (one forward scan)."""

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, directions=1, **kwargs)

    def scan_directions(self, x, z):
        return [self.ssms[0](x, z)]


class BiMamba(_MambaMixer):
    """Bidirectional Mamba (Vision Mamba "v2"), the mixer every Matten Mamba layer uses.

    The forward direction scans the sequence as given; the backward direction scans it reversed
    and its output is flipped back; the two are averaged before out_proj. Shared by the two
    directions: in_proj (so x and z) and out_proj. Separate per direction: conv1d, x_proj,
    dt_proj, A_log and D.
    """

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, directions=2, **kwargs)

    @property
    def forward_ssm(self) -> SelectiveSSM:
        return self.ssms[0]

    @property
    def backward_ssm(self) -> SelectiveSSM:
        return self.ssms[1]

    def scan_directions(self, x, z):
        backward = self.backward_ssm(x.flip(-1), z.flip(-1)).flip(-1)
        return [self.forward_ssm(x, z), backward]
