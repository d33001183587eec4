"""Timestep respacing: sample (or train) with a subset of a diffusion's timesteps.

Keeping steps S = {s_0 < s_1 < ...} of a chain with cumulative products abar gives a shorter chain
with the same marginals q(x_s | x_0): its betas are 1 - abar_{s_k} / abar_{s_(k-1)}. The model was
trained on the original indices, so it is called with s_k, not k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The timesteps to keep out of ``num_timesteps``.

    ``section_counts`` splits the chain into equal sections and keeps, in each, that many evenly
    spaced steps (both section ends included): e.g. [10, 15, 20] with 300 steps keeps 10 of the
    first 100, 15 of the next 100 and 20 of the last 100. A string "10,15,20" or "250" (one
    section) or an int means the same. "ddimN" keeps range(0, num_timesteps, stride) for the
    integer stride that gives exactly N steps, as the DDIM paper does.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        return _ddim_steps(num_timesteps, section_counts)
    counts = _parse_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)  # the first sections take the remainder
        if count > size:
            raise ValueError(
                f"section {i} has {size} timesteps, cannot keep {count} of them "
                f"(respacing {section_counts!r} of {num_timesteps} steps)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return set(steps)


def _ddim_steps(num_timesteps: int, spec: str) -> set[int]:
    try:
        desired = int(spec[len("ddim") :])
    except ValueError:
        raise ValueError(f"bad respacing {spec!r}: expected 'ddim' and an integer") from None
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot keep exactly {desired} of {num_timesteps} timesteps with an integer "
        f"stride (respacing {spec!r})"
    )


def _parse_counts(section_counts) -> list[int]:
    if isinstance(section_counts, str):
        try:
            counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected 'ddimN', an integer or "
                "comma-separated integers"
            ) from None
    elif isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(
            f"bad respacing {section_counts!r}: counts must be non-negative integers "
            "keeping at least one step"
        )
    return counts


class _OriginalTimesteps:
    """Calls a model with the base chain's timestep indices in place of the spaced ones."""

    def __init__(self, model: Model, timestep_map: torch.Tensor):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        # Indexing keeps t's shape, so (B,) and per-frame (B, F) timesteps both map.
        original = self.timestep_map.to(t.device)[t].to(t.dtype)
        return self.model(x, original, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A :class:`GaussianDiffusion` that keeps only ``use_timesteps`` of the base schedule
    ``betas`` (default: 1000-step linear). Its timesteps are 0 .. len(use_timesteps) - 1; the model
    receives the matching original indices (``timestep_map``)."""

    def __init__(
        self,
        use_timesteps: Iterable[int],
        betas=None,
        *,
        learn_sigma: bool = True,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
    ):
        base = GaussianDiffusion(betas, learn_sigma=learn_sigma, prediction=prediction)
        kept = sorted({int(s) for s in use_timesteps})
        if not kept:
            raise ValueError("use_timesteps is empty: keep at least one timestep")
        if kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {base.num_timesteps - 1}], got "
                f"[{kept[0]}, {kept[-1]}]"
            )
        abar = base.alphas_cumprod[kept]
        super().__init__(
            1.0 - abar / np.append(1.0, abar[:-1]),
            learn_sigma=learn_sigma,
            prediction=prediction,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
        )
        self.use_timesteps = set(kept)
        self.timestep_map = np.array(kept, dtype=np.int64)
        self.original_num_steps = base.num_timesteps
        self._map_tensor = torch.from_numpy(self.timestep_map)

    def _wrap_model(self, model: Model) -> Model:
        if isinstance(model, _OriginalTimesteps):  # already mapped; mapping twice would be wrong
            return model
        return _OriginalTimesteps(model, self._map_tensor)
