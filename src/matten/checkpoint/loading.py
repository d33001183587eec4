"""A trained model back from its checkpoint, for inference: the network with its EMA (or raw)
weights, its autoencoder, and what the checkpoint says about how it was trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, RunConfig, config_from_dict
from ..data import action_names, clip_actions, dataset_from_config
from ..latent import Autoencoder, build_autoencoder
from ..models import build_model
from .files import CheckpointError, load_weights, read_meta, resolve_checkpoint

__all__ = ["LoadedModel", "load_for_sampling", "config_from_checkpoint"]


def config_from_checkpoint(path) -> RunConfig:
    """The run config stored in a checkpoint (run folder, checkpoints folder or checkpoint)."""
    meta = read_meta(resolve_checkpoint(path))
    try:
        return config_from_dict(meta["run_config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"the checkpoint's config cannot be read: {exc}") from None


@dataclass
class LoadedModel:
    model: nn.Module
    autoencoder: Autoencoder
    meta: dict
    folder: Path

    @property
    def num_classes(self) -> int:
        return int(self.meta["model_config"].get("num_classes") or 0)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def num_frames(self) -> int:
        return int(self.meta["latent"]["num_frames"])

    @property
    def latent_size(self) -> tuple[int, int]:
        h, w = self.meta["latent"]["size"]
        return int(h), int(w)

    @property
    def learn_sigma(self) -> bool:
        return bool(self.meta["model_config"].get("learn_sigma", True))

    @property
    def diffusion_steps(self) -> int:
        return int(self.meta.get("diffusion_steps", 1000))

    @property
    def prediction(self) -> str:
        return str(self.meta.get("prediction", "eps"))

    @property
    def schedule(self) -> str:
        """The noise schedule the model was trained on ("linear" for checkpoints older than the
        option)."""
        return str(self.meta.get("schedule", "linear"))

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run_config(self) -> dict:
        """The run config as stored (plain dicts)."""
        return dict(self.meta.get("run_config") or {})

    @property
    def sample_settings(self) -> dict:
        """The run's ``sample`` section: its default sampler, steps, guidance scale, fps, ..."""
        return dict(self.run_config.get("sample") or {})

    @property
    def action_names(self) -> tuple[str, ...]:
        """Names of the discrete actions of the data the model was trained on (may be empty)."""
        return action_names(str(self.run_config.get("data", {}).get("name", "")))

    def training_actions(self, num_samples: int) -> torch.Tensor | None:
        """The per-frame actions (num_samples, F) of the first training clips: what an
        action-conditioned model is steered with when no actions are given."""
        data = config_from_dict(self.run_config).data
        return clip_actions(dataset_from_config(data), num_samples)


def load_for_sampling(path, weights: str = "ema", device="cpu", vae_path=None) -> LoadedModel:
    """Rebuild the model of a checkpoint (run folder, checkpoints folder or checkpoint folder)
    with its ``"ema"`` (default) or ``"model"`` weights, and its autoencoder."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    try:
        model = build_model(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild the model of '{folder}': {exc}") from None
    state = load_weights(folder, weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the {weights} weights of '{folder}' do not fit its model: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    model.to(device).eval().requires_grad_(False)
    ae_meta = dict(meta.get("autoencoder") or {"kind": "pixel"})
    kind = ae_meta.get("kind", "pixel")
    kwargs = {}
    if kind != "pixel":
        kwargs["frame_batch_size"] = int(ae_meta.get("frame_batch_size", 16))
    autoencoder = build_autoencoder(
        kind, vae_path if vae_path is not None else ae_meta.get("path"), **kwargs
    ).to(device)
    return LoadedModel(model, autoencoder, meta, folder)
