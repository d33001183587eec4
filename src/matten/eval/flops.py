"""Parameters and FLOPs of a backbone, three ways, all on the meta device (no memory, no time):

* ``counted``: torch's FlopCounterMode over a real forward pass: every matmul, convolution and
  attention product, plus the selective scan (3 multiply-adds per state element per step, see
  :func:`matten.ssm.selective_scan.scan_flops`). FLOPs = 2 x multiply-adds.
* ``thop-style``: multiply-adds of Linear / Conv / LayerNorm modules only, attention products and
  scans not counted: what the ``thop`` profiler reports, and what Latte's published figure uses.
* ``analytic``: the paper's Eq. 5-7, SA = 2 J^2 D, FFN = 4 J D^2, SSM = 3 J (2D) N + J (2D) N^2,
  summed over the layers (J = length of each sequence the layer sees; the SSM term counted once per
  scan direction).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import DEPTHS, LAYOUTS, SIZES, create_model, parse_name
from ..models.layers import AttentionLayer, MambaLayer

# The paper's Table 2 (XL, 16x256x256) and Table 3; Latte-XL's FLOPs as quoted in its Table 1.
PAPER_PARAMS_M: dict[tuple[str, int | str], int] = {
    ("S", 3): 35,
    ("B", 3): 164,
    ("L", 3): 579,
    ("XL", 3): 853,
    ("XL", 1): 814,
    ("XL", 2): 814,
    ("XL", 4): 846,
}
PAPER_FLOPS_G = {1: 1590, 2: 1660, 3: 4008, 4: 3660, "latte": 5572}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, variant: int = 3, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, variant=variant, **kwargs).eval()


def _inputs(model, batch: int, frames: int, latent_size: int):
    x = torch.empty(batch, model.in_channels, frames, latent_size, latent_size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta") if model.num_classes else None
    return x, t, y


def counted_flops(model, batch: int = 1, frames: int = 16, latent_size: int = 32) -> int:
    """FLOPs of one forward pass, counted op by op (2 x multiply-adds)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*_inputs(model, batch, frames, latent_size))
    return counter.get_total_flops()


def thop_style_macs(model, batch: int = 1, frames: int = 16, latent_size: int = 32) -> int:
    """Multiply-adds of Linear, Conv and LayerNorm modules (as thop counts them)."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kernel = module.in_channels // module.groups
            for k in module.kernel_size:
                kernel *= k
            total[0] += output.numel() * kernel
        elif isinstance(module, nn.LayerNorm):
            total[0] += output.numel() * (2 if module.elementwise_affine else 1)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*_inputs(model, batch, frames, latent_size))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def analytic_flops(model, frames: int = 16, latent_size: int = 32, d_state: int = 16) -> int:
    """The paper's Eq. 5-7 summed over the layers, for one video."""
    side = latent_size // model.patch_size
    tokens, dim = frames * side * side, model.hidden_size
    seq_len = {"global": tokens, "spatial": side * side, "temporal": frames}
    total = 0
    for layer in model.modules():
        if isinstance(layer, (AttentionLayer, MambaLayer)):
            length = seq_len[layer.view]
            sequences = tokens // length
        if isinstance(layer, AttentionLayer):
            total += sequences * 2 * length**2 * dim + 4 * tokens * dim**2
        elif isinstance(layer, MambaLayer):
            per_direction = 3 * length * (2 * dim) * d_state + length * (2 * dim) * d_state**2
            total += 2 * sequences * per_direction
    return total


def flops_report(
    name: str = "Matten-XL/2",
    variant: int = 3,
    frames: int = 16,
    resolution: int = 256,
    vae_factor: int = 8,
    thop_batch: int = 1,
) -> dict:
    """Parameters and FLOPs of one unconditional forward pass on a frames x resolution^2 video."""
    latent = resolution // vae_factor
    model = meta_model(name, variant)
    family, size, _ = parse_name(name)
    key = "latte" if family == "Latte" else variant
    macs = counted_flops(model, 1, frames, latent) // 2
    return {
        "model": name,
        "variant": None if family == "Latte" else variant,
        "depth": DEPTHS[size][key],
        "hidden_size": SIZES[size][1],
        "frames": frames,
        "resolution": resolution,
        "latent": [frames, latent, latent],
        "params": count_parameters(model),
        "flops": 2 * macs,
        "macs": macs,
        "thop_macs": thop_style_macs(model, thop_batch, frames, latent),
        "thop_batch": thop_batch,
        "analytic_flops": analytic_flops(model, frames, latent),
        "paper_params_m": PAPER_PARAMS_M.get((size, key)),
        "paper_flops_g": PAPER_FLOPS_G.get(key) if size == "XL" else None,
        "layout": [list(layer) for layer in LAYOUTS[key]],
    }
