"""Gaussian helpers for the variational bound: KL between diagonal Gaussians and a discretised
Gaussian likelihood for data in [-1, 1] quantised to 256 levels (the DDPM decoder)."""

from __future__ import annotations

import math

import torch

# Half the width of one of the 256 bins that split [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Data within this distance of -1 or 1 belongs to an edge bin, which extends to -inf or +inf.
_EDGE = 0.999


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast; plain numbers are allowed as long as one argument is a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl: at least one argument must be a tensor")
    # Numbers become tensors so that torch.exp accepts them.
    logvar1, logvar2 = (
        a if isinstance(a, torch.Tensor) else torch.tensor(a).to(ref) for a in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF by its tanh approximation (the one DDPM's decoder uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability, in nats, of the bin of width 2/255 centred on x under
    N(means, exp(log_scales)^2).

    x holds values of [-1, 1] quantised to 256 levels; the two edge bins extend to -inf and +inf so
    that the 256 probabilities sum to one.
    """
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(
            "discretized_gaussian_log_likelihood: x, means and log_scales must have "
            f"the same shape, got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    # The floor keeps the log finite where the approximated CDF rounds a tiny mass to zero.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -_EDGE, log_cdf_plus, torch.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta)
    )
