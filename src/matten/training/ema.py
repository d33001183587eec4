"""Exponential moving average of the model weights: a separate copy updated after every step."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["create_ema", "update_ema", "ema_decay_at"]


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen float32 copy of ``model`` in eval mode."""
    ema = copy.deepcopy(model).float()
    ema.requires_grad_(False)
    return ema.eval()


def ema_decay_at(
    step: int, decay: float, early_decay: float | None = None, early_steps: int = 0
) -> float:
    """The decay used at ``step`` (0-based): ``early_decay`` for the first ``early_steps``
    steps when given (the paper uses 0.99 early in training), ``decay`` after."""
    if early_decay is not None and step < early_steps:
        return float(early_decay)
    return float(decay)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    if ema_params.keys() != model_params.keys():
        raise ValueError("the EMA copy and the model have different parameters")
    targets = [ema_params[k] for k in model_params]
    sources = [
        p.detach().to(dtype=t.dtype) for p, t in zip(model_params.values(), targets, strict=True)
    ]
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - decay)
    model_buffers = dict(model.named_buffers())
    for name, buf in ema.named_buffers():
        if name in model_buffers:
            buf.copy_(model_buffers[name])
