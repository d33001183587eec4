"""Gaussian diffusion with a learned reverse-process variance (Improved DDPM), for videos.

Data tensors are (B, C, ...); videos are (B, C, F, H, W). A timestep tensor ``t`` holds integer
schedule indices, either (B,) - one noise level per sample - or (B, F) - one noise level per frame
(diffusion forcing). Schedule values broadcast as (B, 1, 1, ...) or (B, 1, F, 1, ...).

A model is called as ``model(x_t, t, **model_kwargs)``. With ``learn_sigma=True`` it returns 2C
channels on dim 1: the predicted noise eps, then v in [-1, 1], which sets the reverse-process log
variance to the interpolation between log beta-tilde_t (v = -1) and log beta_t (v = 1). With
``learn_sigma=False`` it returns eps only and the variance is fixed to beta_t ("fixed large").

The training loss is IDDPM's hybrid objective L_simple + L_vlb, where the L_vlb term sees a detached
eps so it trains only the variance. L_simple's terms may be weighted by noise level (Min-SNR-gamma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .gaussian_math import discretized_gaussian_log_likelihood, normal_kl
from .sampling_loops import Model, SamplingLoops, check_eta

PREDICTIONS = ("eps", "velocity")
SAMPLERS = ("ddpm", "ddim")  # ancestral steps with the learned variance, or DDIM steps
SCHEDULES = ("linear", "cosine")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """IDDPM's "linear" schedule: betas from 1e-4 to 0.02 for 1000 steps, both ends scaled by
    1000 / num_timesteps so that other step counts cover the same noise range. Float64."""
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """IDDPM's "cosine" schedule: abar(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, betas capped at
    0.999. Noise rises more slowly than in the linear schedule, so fewer of the steps sit at levels
    where a small frame is already pure noise (IDDPM Sec. 3.2). Float64."""
    _check_num_timesteps(num_timesteps)

    def alpha_bar(i):
        return np.cos((i / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    return np.minimum(1.0 - alpha_bar(steps + 1) / alpha_bar(steps), 0.999)


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """The named noise schedule (:data:`SCHEDULES`) of ``num_timesteps`` steps."""
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def _check_num_timesteps(num_timesteps) -> None:
    if (
        isinstance(num_timesteps, bool)
        or not isinstance(num_timesteps, (int, np.integer))
        or num_timesteps < 1
    ):
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")


def mean_flat(x: torch.Tensor, frame_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over every dimension but the batch one.

    With ``frame_weight`` (B, F) for data (B, C, F, ...): the weighted mean of the per-frame means,
    so frames of weight 0 (e.g. clean history under diffusion forcing) add nothing."""
    if frame_weight is None:
        return x.mean(dim=tuple(range(1, x.dim())))
    per_frame = x.mean(dim=(1,) + tuple(range(3, x.dim())))  # (B, F)
    weight = frame_weight.to(per_frame.dtype)
    return (per_frame * weight).sum(1) / weight.sum(1).clamp(min=1e-12)


def timestep_view(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t`` reshaped to broadcast against a tensor of ``shape``: (B,) -> (B, 1, 1, ...) and
    (B, F) -> (B, 1, F, 1, ...), F being dim 2 of the data."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"data must be (B, C, ...), got shape {shape}")
    batch, rest = shape[0], len(shape) - 2
    if t.dim() == 1 and t.shape[0] == batch:
        return t.view(batch, 1, *([1] * rest))
    if t.dim() == 2 and len(shape) >= 3 and tuple(t.shape) == (batch, shape[2]):
        return t.view(batch, 1, shape[2], *([1] * (rest - 1)))
    raise ValueError(
        f"timesteps must have shape (B,) or (B, F) for data of shape {shape}, got {tuple(t.shape)}"
    )


class GaussianDiffusion(SamplingLoops):
    """Forward process, reverse-process parameters, training losses and samplers.

    Args:
        betas: the noise schedule, float64, each in (0, 1]; default
            :func:`linear_beta_schedule` with 1000 steps.
        learn_sigma: whether the model also outputs the variance interpolation v (2C channels).
        prediction: what the model's first C channels predict: ``"eps"``, the noise (DDPM,
            IDDPM, DiT, Latte, Matten), or ``"velocity"``, v = sqrt(abar) eps - sqrt(1 - abar) x_0
            (Salimans & Ho 2022, as Imagen Video uses). Velocity keeps x_0 well determined at high
            noise, where an eps error is multiplied by sqrt(1/abar - 1) (157 at t = 999), so
            small models learn the global layout of a clip in far fewer steps.
        loss_weighting: ``"uniform"`` (L_simple as is) or ``"min_snr"``: each noise level's term
            weighted so that it counts as an x_0 error of weight min(SNR, gamma) (Hang et al. 2023,
            "Efficient Diffusion Training via Min-SNR Weighting"): the x_0 weight SNR is capped
            at gamma, so the easy low-noise levels stop dominating; for velocity the weight is
            min(SNR, gamma) / (SNR + 1), for eps min(SNR, gamma) / SNR. With velocity this also
            damps the high-noise levels (the weight falls like SNR there: 3e-4 at t = 900 of the
            linear schedule), which velocity prediction otherwise trains at full weight.
        min_snr_gamma: gamma of ``"min_snr"`` (5 in the paper).
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray | None = None,
        *,
        learn_sigma: bool = True,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}"
            )
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma!r}")
        self.prediction = prediction
        betas = linear_beta_schedule(1000) if betas is None else np.asarray(betas, np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                "every beta must lie in (0, 1]; a linear schedule with fewer than 20 "
                "steps goes past 1"
            )
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t).
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus
        # beta-tilde_0 is 0; its log is floored at beta-tilde_1 (at beta_0 for a one-step chain)
        # so that the learned-range interpolation and the decoder NLL stay finite at t = 0.
        floor = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(floor, self.posterior_variance[1:]))
        self.log_betas = np.log(betas)
        # "Fixed large" variance for models without a variance output: beta_t, but beta-tilde_1 at
        # t = 0 so the decoder's variance is not needlessly wide.
        self.fixed_log_variance = np.log(np.append(floor, betas[1:]))
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.mse_weights = self._mse_weights()

    def _mse_weights(self) -> np.ndarray:
        """Per-timestep weights of L_simple's terms (all 1 for ``"uniform"``)."""
        if self.loss_weighting == "uniform":
            return np.ones(self.num_timesteps)
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        clipped = np.minimum(snr, self.min_snr_gamma)
        return clipped / (snr + 1.0) if self.prediction == "velocity" else clipped / snr

    # ------------------------------------------------------------------ schedule look-ups

    def _extract(self, arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as a tensor that broadcasts against x (float64 for float64 x, else float32)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        # The cast happens before the move: some devices (MPS) have no float64.
        table = torch.from_numpy(arr).to(dtype).to(t.device)
        return table[timestep_view(t, x.shape)]

    def _check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype.is_floating_point
            or t.is_complex()
            or t.dtype == torch.bool
        ):
            raise ValueError("timesteps must be an integer tensor of schedule indices")
        timestep_view(t, x.shape)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got values in "
                f"[{int(t.min())}, {int(t.max())}]"
            )

    def _wrap_model(self, model: Model) -> Model:
        """Hook for subclasses that change what the model sees (respacing maps timesteps)."""
        return model

    # ------------------------------------------------------------------ forward process

    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        self._check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn(
                x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype
            )
        elif noise.shape != x_start.shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}"
            )
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        self._check_timesteps(t, x_t)
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def _eps_from_velocity(self, x_t, t, velocity):
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_t) * velocity
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )

    def _split_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v) from the model output (its prediction converted to eps); v is None
        without a learned variance."""
        mean_part, v = self._raw_split(model_output, x)
        if self.prediction == "velocity":
            mean_part = self._eps_from_velocity(x, t, mean_part)
        return mean_part, v

    def _raw_split(
        self, model_output: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        channels = x.shape[1]
        expected = (x.shape[0], 2 * channels if self.learn_sigma else channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            what = "eps and v (learn_sigma=True)" if self.learn_sigma else "eps"
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected "
                f"{expected}: {what} for input of shape {tuple(x.shape)}"
            )
        if not self.learn_sigma:
            return model_output, None
        eps, v = model_output.split(channels, dim=1)
        return eps, v

    def _model_log_variance(
        self, v: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        if v is None:
            return self._extract(self.fixed_log_variance, t, x).expand(x.shape)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x)
        max_log = self._extract(self.log_betas, t, x)
        frac = (v + 1) / 2  # v in [-1, 1] -> [0, 1]
        return frac * max_log + (1 - frac) * min_log

    def _mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool
    ) -> dict[str, torch.Tensor]:
        eps, v = self._split_output(model_output, x, t)
        log_variance = self._model_log_variance(v, x, t)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model and return p(x_{t-1} | x_t) as a dict with "mean", "variance",
        "log_variance", "pred_xstart" (the predicted x_0) and "eps" (the model's eps)."""
        self._check_timesteps(t, x)
        output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
        return self._mean_variance_from_output(output, x, t, clip_denoised)

    # ------------------------------------------------------------------ training

    def _vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        frame_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample term of the variational bound, in bits per dimension."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        # At t = 0 the bound's term is the decoder's likelihood of the data, not a KL. Choosing per
        # element (not per sample) lets each frame of a (B, F) t have its own kind of term.
        first = timestep_view(t, x_t.shape) == 0
        return mean_flat(torch.where(first, nll, kl), frame_weight) / math.log(2.0)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        frame_weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses: "mse" (L_simple), "vb" (L_vlb term; only with learn_sigma) and
        "loss" = mse + vb, each of shape (B,).

        ``frame_weight`` (B, F), optional, weighs each frame's share of the loss (0 leaves a frame
        out: given history the model reads but is not asked to denoise)."""
        self._check_timesteps(t, x_start)
        if frame_weight is not None and (
            x_start.dim() < 3 or tuple(frame_weight.shape) != (x_start.shape[0], x_start.shape[2])
        ):
            raise ValueError(
                f"frame_weight must have shape (B, F) for data of shape "
                f"{tuple(x_start.shape)}, got {tuple(frame_weight.shape)}"
            )
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        output = self._wrap_model(model)(x_t, t, **(model_kwargs or {}))
        pred, v = self._raw_split(output, x_start)
        if self.prediction == "velocity":
            target = (
                self._extract(self.sqrt_alphas_cumprod, t, x_start) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
            )
        else:
            target = noise
        squared = (target - pred) ** 2
        if self.loss_weighting != "uniform":
            squared = squared * self._extract(self.mse_weights, t, x_start)
        terms = {"mse": mean_flat(squared, frame_weight)}
        if v is None:
            terms["loss"] = terms["mse"]
            return terms
        # The bound sees a detached mean prediction, so it trains only the variance; the mean
        # is left to L_simple, which is the better objective for it (IDDPM Sec. 3.1).
        frozen = torch.cat([pred.detach(), v], dim=1)
        # L_vlb is a sum of T per-step terms, weighted by lambda = 0.001 in IDDPM; one sampled
        # term therefore carries T / 1000.
        terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t, frame_weight) * (
            self.num_timesteps / 1000.0
        )
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    # ------------------------------------------------------------------ sampling steps

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}; returns "sample" and "pred_xstart"."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # No noise on the last step (t = 0): its mean is the sample.
        nonzero = (timestep_view(t, x.shape) != 0).to(x.dtype)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al., Eq. 12); eta = 0 is deterministic, eta = 1
        has DDPM's posterior variance. Returns "sample" and "pred_xstart"."""
        check_eta(eta)
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        # eps recomputed from x_0 so that the step agrees with a clipped x_0.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        # Never negative in exact arithmetic for eta <= 1; the clamp absorbs float32 rounding.
        direction = torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
        sample = out["pred_xstart"] * torch.sqrt(abar_prev) + direction
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            sample = sample + sigma * noise  # sigma is 0 at t = 0
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}
