"""The latent space: the autoencoder between videos and what the diffusion model sees.

* :class:`PixelAutoencoder` — the identity (3 channels, no downsampling), for small data.
* :class:`StableDiffusionVAE` — the Stable Diffusion v1-4 VAE (diffusers ``AutoencoderKL``, 8x
  downsampling, 4 latent channels, latents scaled by 0.18215), applied frame by frame.

Both map a video ``(B, 3, F, H, W)`` in [-1, 1] to latents ``(B, C, F, H/s, W/s)`` and back.
Weights of the VAE are read from a local path only; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "Autoencoder",
    "PixelAutoencoder",
    "StableDiffusionVAE",
    "SD_VAE_CONFIG",
    "SD_VAE_SCALE_FACTOR",
    "AUTOENCODERS",
    "build_autoencoder",
    "load_vae_state_dict",
]

SD_VAE_SCALE_FACTOR = 0.18215

# The architecture of the Stable Diffusion v1-4 VAE (CompVis/stable-diffusion-v1-4, subfolder
# "vae"; stabilityai/sd-vae-ft-ema and sd-vae-ft-mse share it).
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": SD_VAE_SCALE_FACTOR,
}

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
_WHERE = (
    "Download the Stable Diffusion VAE beforehand, e.g. `hf download stabilityai/sd-vae-ft-ema "
    "--local-dir sd-vae-ft-ema` (config.json + diffusion_pytorch_model.safetensors) or the "
    "'vae' folder of CompVis/stable-diffusion-v1-4 from Hugging Face, and pass that folder "
    "(or a single .safetensors file) as autoencoder.path; Matten never downloads weights."
)


class Autoencoder(nn.Module):
    """Interface: ``encode(video) -> latents``, ``decode(latents) -> video``.

    Attributes: ``latent_channels``, ``downsample`` (spatial factor), ``kind``.
    """

    kind = "base"
    latent_channels = 3
    downsample = 1

    def latent_size(self, resolution) -> tuple[int, int]:
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"resolution {h}x{w} is not divisible by the {self.kind} "
                f"autoencoder's downsampling factor {self.downsample}"
            )
        return h // self.downsample, w // self.downsample

    def encode(self, video: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _check_video(x: torch.Tensor, channels: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must have shape (B, {channels}, F, H, W), got {shape}")


class PixelAutoencoder(Autoencoder):
    """The identity: the diffusion model works on the pixels in [-1, 1]."""

    kind = "pixel"
    latent_channels = 3
    downsample = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video, 3, "video")
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_video(latents, 3, "latents")
        return latents


class StableDiffusionVAE(Autoencoder):
    """The Stable Diffusion VAE applied to each frame, ``frame_batch_size`` frames at a time.

    Args:
        path: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; a
            Stable Diffusion pipeline folder with a ``vae/`` subfolder also works) or a single
            ``.safetensors`` file (diffusers keys, or the original LDM/CompVis keys of
            ``vae-ft-ema-560000-ema-pruned.safetensors`` or a full SD checkpoint). ``None``
            builds the network with random weights (tests only).
        config: overrides of :data:`SD_VAE_CONFIG` (a folder's ``config.json`` is applied first).
        frame_batch_size: frames per VAE call (lower it to save memory).
        sample_posterior: encode to a sample of the posterior (as in training Latte/Matten);
            ``False`` takes its mean.
    """

    kind = "sd-vae"
    downsample = 8

    def __init__(
        self,
        path=None,
        config: dict | None = None,
        frame_batch_size: int = 16,
        sample_posterior: bool = True,
        scale_factor: float | None = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        if int(frame_batch_size) < 1:
            raise ValueError(f"frame_batch_size must be >= 1, got {frame_batch_size}")
        self.frame_batch_size = int(frame_batch_size)
        self.sample_posterior = bool(sample_posterior)
        weights, folder_config = (None, {}) if path is None else _locate_weights(path)
        arch = dict(SD_VAE_CONFIG)
        arch.update({k: v for k, v in folder_config.items() if k in SD_VAE_CONFIG})
        arch.update(config or {})
        unknown = set(arch) - set(SD_VAE_CONFIG)
        if unknown:
            raise ValueError(
                f"unknown VAE config keys {sorted(unknown)}; known: {sorted(SD_VAE_CONFIG)}"
            )
        self.vae = AutoencoderKL(**arch)
        self.latent_channels = int(arch["latent_channels"])
        self.downsample = 2 ** (len(arch["block_out_channels"]) - 1)
        self.scale_factor = float(
            scale_factor if scale_factor is not None else arch["scaling_factor"]
        )
        self.path = None if path is None else str(path)
        if weights is not None:
            state = load_vae_state_dict(weights, arch)
            missing, unexpected = self.vae.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"'{weights}' does not hold Stable Diffusion VAE weights of this "
                    f"architecture: {len(missing)} missing keys (e.g. "
                    f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. "
                    f"{unexpected[:3]})"
                )
        self.vae.eval().requires_grad_(False)

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        b, _, f = x.shape[:3]
        flat = x.transpose(1, 2).flatten(0, 1)  # (B*F, C, H, W)
        dtype = next(self.vae.parameters()).dtype
        out = torch.cat([fn(chunk.to(dtype)) for chunk in flat.split(self.frame_batch_size)])
        return out.unflatten(0, (b, f)).transpose(1, 2).contiguous()

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 4, F, H/8, W/8)."""
        _check_video(video, 3, "video")
        self.latent_size(tuple(video.shape[-2:]))

        def enc(frames):
            dist = self.vae.encode(frames).latent_dist
            z = dist.sample(generator) if self.sample_posterior else dist.mode()
            return z * self.scale_factor

        return self._frames(video, enc).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, F, h, w) -> video (B, 3, F, 8h, 8w), clamped to [-1, 1]."""
        _check_video(latents, self.latent_channels, "latents")
        return (
            self._frames(latents, lambda z: self.vae.decode(z / self.scale_factor).sample)
            .float()
            .clamp(-1, 1)
        )


# ----------------------------------------------------------------------------------------------
# loading weights


def _locate_weights(path) -> tuple[Path, dict]:
    """The weights file for ``path`` and the folder's config.json (or {})."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(
                f"VAE weights '{p}' must be a .safetensors file (pickled .ckpt/.bin "
                "files are not loaded); convert it or use the diffusers folder"
            )
        return p, {}
    if p.is_dir():
        for folder in (p, p / "vae"):
            weights = folder / WEIGHTS_NAME
            if weights.is_file():
                config = {}
                if (folder / CONFIG_NAME).is_file():
                    try:
                        config = json.loads((folder / CONFIG_NAME).read_text())
                    except (OSError, ValueError) as exc:
                        raise ValueError(
                            f"cannot read VAE config '{folder / CONFIG_NAME}': {exc}"
                        ) from None
                    cls = config.get("_class_name", "AutoencoderKL")
                    if cls != "AutoencoderKL":
                        raise ValueError(
                            f"'{folder / CONFIG_NAME}' describes a {cls}, not the "
                            "Stable Diffusion AutoencoderKL"
                        )
                return weights, config
        raise FileNotFoundError(
            f"no '{WEIGHTS_NAME}' in the VAE folder '{p}' (nor in '{p / 'vae'}'). {_WHERE}"
        )
    raise FileNotFoundError(f"Stable Diffusion VAE weights not found at '{p}'. {_WHERE}")


_LEGACY_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def load_vae_state_dict(file, config: dict | None = None) -> dict[str, torch.Tensor]:
    """Read a VAE state dict from a .safetensors file in diffusers keys, converting the older
    diffusers attention names and the original LDM layout (optionally under
    ``first_stage_model.``, as in a full Stable Diffusion checkpoint)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"cannot read '{file}' as safetensors: {exc}") from None
    if any(k.startswith("first_stage_model.") for k in state):
        state = {
            k[len("first_stage_model.") :]: v
            for k, v in state.items()
            if k.startswith("first_stage_model.")
        }
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):  # LDM layout
        try:
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        except ImportError:  # pragma: no cover - depends on the diffusers version
            raise ValueError(
                f"'{file}' holds VAE weights in the original LDM layout and this "
                "diffusers version cannot convert them; use the diffusers folder "
                "(config.json + diffusion_pytorch_model.safetensors)"
            ) from None
        state = convert_ldm_vae_checkpoint(state, dict(config or SD_VAE_CONFIG))
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
        if ".attentions." in key and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1x1 conv weights of old checkpoints -> linear
        out[key] = value
    return out


AUTOENCODERS = {"pixel": PixelAutoencoder, "sd-vae": StableDiffusionVAE}
_ALIASES = {
    "identity": "pixel",
    "none": "pixel",
    "vae": "sd-vae",
    "sd_vae": "sd-vae",
    "sdvae": "sd-vae",
}


def build_autoencoder(kind: str = "pixel", path=None, **kwargs) -> Autoencoder:
    """``"pixel"`` (identity) or ``"sd-vae"`` (needs ``path``, see :class:`StableDiffusionVAE`)."""
    key = _ALIASES.get(str(kind).lower(), str(kind).lower())
    if key not in AUTOENCODERS:
        raise ValueError(f"unknown autoencoder '{kind}'; choose one of {sorted(AUTOENCODERS)}")
    if key == "pixel":
        if path is not None:
            raise ValueError("the pixel autoencoder takes no weights path")
        return PixelAutoencoder()
    if path is None:
        raise FileNotFoundError(
            "the sd-vae autoencoder needs its weights: set autoencoder.path "
            f"to a local folder or .safetensors file. {_WHERE}"
        )
    return StableDiffusionVAE(path, **kwargs)
