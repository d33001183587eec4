"""The sampling loops of a diffusion: run its one-step samplers (ancestral DDPM steps with the
learned variance, DDIM steps) from pure noise down to t = 0, yielding every step or only the
result. A mixin of :class:`~matten.diffusion.GaussianDiffusion`, which provides the steps
(``p_sample``, ``ddim_sample``) and ``num_timesteps``."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["Model", "SamplingLoops", "check_eta"]

Model = Callable[..., torch.Tensor]  # model(x_t, t, **model_kwargs) -> output channels


def check_eta(eta) -> None:
    """DDIM's eta is a number in [0, 1] (0: deterministic; 1: DDPM's posterior variance)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")


class SamplingLoops:
    """``p_sample_loop`` / ``ddim_sample_loop`` (and their step-by-step ``_progressive`` forms)
    for a diffusion that defines ``p_sample``, ``ddim_sample`` and ``num_timesteps``."""

    num_timesteps: int
    p_sample: Callable[..., dict[str, torch.Tensor]]
    ddim_sample: Callable[..., dict[str, torch.Tensor]]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        *,
        model_kwargs: dict | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        device=None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield each ancestral step's output, from t = T - 1 down to 0."""

        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised, model_kwargs, generator)

        yield from self._loop(step, model, shape, noise, generator, progress, device, "DDPM")

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        *,
        model_kwargs: dict | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Sample with ancestral DDPM steps and the model's variance.

        All random draws use ``generator`` when given. The device is that of ``noise``, else
        ``device``, else the generator's, else the model's parameters', else the CPU.
        """
        return _last(
            self.p_sample_loop_progressive(
                model,
                shape,
                noise,
                model_kwargs=model_kwargs,
                progress=progress,
                generator=generator,
                clip_denoised=clip_denoised,
                device=device,
            )
        )["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        eta: float = 0.0,
        *,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        device=None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield each DDIM step's output, from t = T - 1 down to 0."""
        check_eta(eta)

        def step(x, t):
            return self.ddim_sample(model, x, t, clip_denoised, model_kwargs, eta, generator)

        yield from self._loop(step, model, shape, noise, generator, progress, device, "DDIM")

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        eta: float = 0.0,
        *,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Sample with DDIM steps; with eta = 0 the result is a function of the initial noise.
        Arguments as for :meth:`p_sample_loop`."""
        return _last(
            self.ddim_sample_loop_progressive(
                model,
                shape,
                eta,
                noise=noise,
                model_kwargs=model_kwargs,
                progress=progress,
                generator=generator,
                clip_denoised=clip_denoised,
                device=device,
            )
        )["sample"]

    def _loop(self, step, model, shape, noise, generator, progress, device, name):
        x = _initial_noise(model, shape, noise, generator, device)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices, desc=f"{name} sampling", unit="step")
        for i in indices:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]


def _last(iterator):
    """The last item of an iterator, keeping none of the others alive."""
    return collections.deque(iterator, maxlen=1)[0]


def _initial_noise(model, shape, noise, generator, device) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, ...) with positive sizes, got {shape}")
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        return noise
    if device is None and generator is not None:
        device = generator.device
    if device is None and isinstance(model, torch.nn.Module):
        device = next(model.parameters(), torch.empty(0)).device
    if device is None:
        device = "cpu"
    return torch.randn(shape, generator=generator, device=device)
