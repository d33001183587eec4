"""What every sampler call is checked against, once: the sampler, its steps, eta, the guidance
scale and the class labels; and the one place that runs a sampler over a diffusion."""

from __future__ import annotations

import torch

from ..diffusion import SAMPLERS, check_cfg_scale, check_eta, create_diffusion

__all__ = [
    "SamplingError",
    "SAMPLERS",
    "default_steps",
    "check_sampling",
    "sampling_diffusion",
    "run_sampler",
    "resolve_labels",
]


class SamplingError(ValueError):
    """Bad sampling options (class out of range, guidance for an unconditional model, ...)."""


def default_steps(sampler: str) -> int:
    """250 respaced steps for DDPM, 50 for DDIM."""
    return 250 if sampler == "ddpm" else 50


def check_sampling(
    sampler: str, steps: int | None, eta, cfg_scale, diffusion_steps: int, conditional: bool
) -> int:
    """Refuse what no sampler can do, with the option's name; returns the number of steps
    (``steps``, or the sampler's default)."""
    if sampler not in SAMPLERS:
        raise SamplingError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    steps = default_steps(sampler) if steps is None else int(steps)
    if not 1 <= steps <= diffusion_steps:
        raise SamplingError(f"--steps must be in [1, {diffusion_steps}], got {steps}")
    for option, check, value in (
        ("--eta", check_eta, eta),
        ("--cfg-scale", check_cfg_scale, cfg_scale),
    ):
        try:
            check(value)
        except ValueError as exc:
            raise SamplingError(f"{option}: {exc}") from None
    if cfg_scale != 1.0 and not conditional:
        raise SamplingError(
            "classifier-free guidance (--cfg-scale other than 1) needs a "
            "class-conditional model and class labels"
        )
    return steps


def sampling_diffusion(
    steps: int,
    *,
    diffusion_steps: int,
    learn_sigma: bool,
    prediction: str,
    schedule: str,
):
    """The training chain (``diffusion_steps`` of ``schedule``) respaced to ``steps`` evenly
    spaced steps."""
    return create_diffusion(
        str(steps),
        diffusion_steps=diffusion_steps,
        learn_sigma=learn_sigma,
        prediction=prediction,
        schedule=schedule,
    )


def run_sampler(
    diffusion,
    model,
    noise: torch.Tensor,
    *,
    sampler: str,
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise ``noise`` all the way with ``diffusion``'s DDPM or DDIM loop."""
    if sampler == "ddpm":
        return diffusion.p_sample_loop(
            model,
            noise.shape,
            noise=noise,
            model_kwargs=model_kwargs,
            progress=progress,
            generator=generator,
            clip_denoised=clip_denoised,
        )
    return diffusion.ddim_sample_loop(
        model,
        noise.shape,
        eta=float(eta),
        noise=noise,
        model_kwargs=model_kwargs,
        progress=progress,
        generator=generator,
        clip_denoised=clip_denoised,
    )


def resolve_labels(
    class_arg, num_samples: int, num_classes: int, class_names=(), option: str = "--class"
) -> torch.Tensor | None:
    """Labels for ``num_samples`` samples: None for an unconditional model; for a conditional one
    ``class_arg`` (an index or a class name, or a list of them, cycled) or, when None, the classes
    in turn. Errors name the command-line ``option`` the classes came from."""
    if num_classes <= 0:
        if class_arg not in (None, [], ()):
            raise SamplingError(
                "this model is unconditional (trained without class labels); "
                f"{option} cannot be used"
            )
        return None
    if class_arg is None or class_arg == [] or class_arg == ():
        return torch.arange(num_samples) % num_classes
    if isinstance(class_arg, torch.Tensor):
        class_arg = class_arg.tolist()
    items = class_arg if isinstance(class_arg, (list, tuple)) else [class_arg]
    names = {str(n).lower(): i for i, n in enumerate(class_names or [])}
    labels = []
    for item in items:
        text = str(item).strip()
        if text.lower() in names:
            labels.append(names[text.lower()])
            continue
        try:
            value = int(text)
        except ValueError:
            known = f" or one of {list(class_names)}" if class_names else ""
            raise SamplingError(
                f"{option} {text!r} is not a class index in [0, {num_classes - 1}]{known}"
            ) from None
        if not 0 <= value < num_classes:
            raise SamplingError(
                f"{option} {value} is out of range: the model has {num_classes} "
                f"classes (0 to {num_classes - 1})"
            )
        labels.append(value)
    return torch.tensor([labels[i % len(labels)] for i in range(num_samples)], dtype=torch.long)
