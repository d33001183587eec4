"""One optimisation step: encode the clips, draw timesteps and noise, the diffusion loss, the
backward pass, the optimizer and the EMA update.

    video batch -> autoencoder.encode (frozen) -> latents -> diffusion.training_losses(model)
    (+ train.memory_reg_weight x MALT's memory regulariser) -> AdamW step (gradients clipped,
    averaged over processes) -> EMA update
"""

from __future__ import annotations

import contextlib

import torch

from ..diffusion import forcing_timesteps
from ..models.malt import memory_penalty, recording_writes
from .ema import ema_decay_at, update_ema
from .resume import SetupError
from .setup import Run

__all__ = ["train_step"]


def train_step(run: Run, batch: dict, step: int) -> torch.Tensor:
    """Train on ``batch`` as step ``step + 1``; returns its loss (mean over processes)."""
    cfg, device, diffusion = run.cfg, run.device, run.diffusion
    latents = run.autoencoder.encode(batch["video"].to(device, non_blocking=True))
    # Diffusion forcing draws a noise level per frame, so the model learns to denoise any frame
    # given a history at any noise level (clean when generating autoregressively).
    frame_weight = None
    if cfg.diffusion.forcing:
        t, frame_weight = forcing_timesteps(
            latents.shape[0],
            latents.shape[2],
            diffusion.num_timesteps,
            cfg.diffusion.history_prob,
            device,
            context_noise=cfg.diffusion.context_noise,
        )
    else:
        t = torch.randint(0, diffusion.num_timesteps, latents.shape[:1], device=device)
    kwargs = {"y": batch["label"].to(device)} if run.num_classes > 0 else {}
    if run.raw_model.takes_actions:
        if "actions" not in batch:
            raise SetupError(
                f"model.causal.num_actions is set but the '{cfg.data.name}' data have no "
                "per-frame actions"
            )
        kwargs["actions"] = batch["actions"].to(device)
    weight = cfg.train.memory_reg_weight
    recording = recording_writes(run.raw_model) if weight else contextlib.nullcontext([])
    with run.accelerator.autocast(), recording as malt_layers:
        loss = diffusion.training_losses(
            run.model, latents, t, model_kwargs=kwargs or None, frame_weight=frame_weight
        )["loss"].mean()
        # MALT's memory regulariser: slots kept apart and diverse (off at weight 0)
        penalty = memory_penalty(malt_layers)
        if penalty is not None:
            loss = loss + weight * penalty
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the loss is {loss.item()} at step {step + 1}; lower train.lr "
            "or enable train.grad_clip"
        )
    run.accelerator.backward(loss)
    t_cfg = cfg.train
    if t_cfg.grad_clip is not None and run.accelerator.sync_gradients:
        run.accelerator.clip_grad_norm_(run.model.parameters(), t_cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(
        run.ema,
        run.raw_model,
        ema_decay_at(step, t_cfg.ema_decay, t_cfg.ema_early_decay, t_cfg.ema_early_steps),
    )
    loss = loss.detach()
    return run.accelerator.reduce(loss, reduction="mean") if run.world > 1 else loss
