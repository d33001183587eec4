"""Loading I3D for FVD from a local file (StyleGAN-V's TorchScript detector or a pytorch-i3d
state dict; see :mod:`.i3d` for what each is) and calling it as a feature extractor. Nothing is
downloaded: a missing file is an error that says where the file comes from."""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .i3d import (
    I3D_INPUT_SIZE,
    PYTORCH_I3D_URL,
    STYLEGAN_V_I3D_URL,
    TORCHSCRIPT_KWARGS,
    InceptionI3d,
    preprocess_for_i3d,
)

__all__ = ["I3DFeatureExtractor", "load_i3d"]


class I3DFeatureExtractor:
    """Videos -> ``(B, feature_dim)`` float64 I3D features (see :func:`preprocess_for_i3d`).

    ``name`` says which network and layer; ``weights_id`` (a hash of the weight file) tells
    weight files apart, so use :attr:`cache_name` in feature-stats cache keys.
    ``comparable_to_published`` is True only for StyleGAN-V's TorchScript I3D (the file's
    contents are not checked against a known hash). ``size`` is the frame size fed to the
    network; leave it at 224, the size the features are defined at (tests shrink it for speed).
    """

    def __init__(
        self,
        model,
        kind: str,
        name: str,
        feature_dim: int,
        weights_id: str,
        comparable_to_published: bool,
        layer: str = "logits",
        device="cpu",
        batch_size: int = 16,
        path: Path | None = None,
    ):
        self.model, self.kind, self.layer = model, kind, layer
        self.name, self.feature_dim, self.weights_id = name, int(feature_dim), weights_id
        self.comparable_to_published = bool(comparable_to_published)
        self.device, self.batch_size, self.path = torch.device(device), int(batch_size), path
        self.size = I3D_INPUT_SIZE

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.weights_id}"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "torchscript":
            return self.model(x, **TORCHSCRIPT_KWARGS)
        return self.model.features(x) if self.layer == "pool" else self.model(x)

    def _prepare(self, videos, value_range) -> torch.Tensor:
        if self.kind == "torchscript":
            # StyleGAN-V's input: [0, 255] integers, the model rescales and resizes itself.
            x = preprocess_for_i3d(videos, size=None, value_range=value_range)
            return (x * 127.5 + 128).clamp(0, 255).floor()
        return preprocess_for_i3d(videos, self.size, value_range)

    @torch.no_grad()
    def __call__(self, videos, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
        n = videos.shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            x = self._prepare(videos[start : start + self.batch_size], value_range).to(self.device)
            feats = self._features(x)
            out.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
        if not out:
            return np.zeros((0, self.feature_dim), np.float64)
        result = np.concatenate(out, axis=0)
        if result.shape[1] != self.feature_dim:
            raise RuntimeError(
                f"{self.name} returned {result.shape[1]}-d features, expected {self.feature_dim}"
            )
        return result

    def __repr__(self):
        return (
            f"I3DFeatureExtractor({self.cache_name}, feature_dim={self.feature_dim}, "
            f"comparable_to_published={self.comparable_to_published})"
        )


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``code/`` and ``constants.pkl``; torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("it holds no state dict of tensors")
    prefix = "module."  # saved from nn.DataParallel
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _not_i3d(path: Path, why: str) -> ValueError:
    return ValueError(
        f"'{path}' is not an I3D weight file Matten can read ({why}). Expected StyleGAN-V's "
        f"TorchScript I3D ({STYLEGAN_V_I3D_URL}) or a pytorch-i3d state dict "
        f"({PYTORCH_I3D_URL}) as .pt/.pth/.safetensors."
    )


def load_i3d(
    path, device="cpu", layer: str = "logits", batch_size: int = 16
) -> I3DFeatureExtractor:
    """An I3D feature extractor from a local weight file; nothing is ever downloaded.

    ``path`` is StyleGAN-V's ``i3d_torchscript.pt`` (400-d features, the ones behind published
    FVD) or a pytorch-i3d state dict (``.pt``/``.pth``/``.safetensors``) for
    :class:`InceptionI3d`, whose features are the time-averaged logits (``layer="logits"``,
    ``num_classes``-d, 400 for Kinetics, like the TorchScript features) or the 1024-d pooled
    Mixed_5c features (``layer="pool"``). Raises FileNotFoundError for a missing file and
    ValueError for a file that is neither kind.
    """
    path = Path(path).expanduser()
    if layer not in ("logits", "pool"):
        raise ValueError(f"layer must be 'logits' or 'pool', got {layer!r}")
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weights not found at '{path}'. Matten does not download them: get StyleGAN-V's "
            f"TorchScript I3D (the weights behind published FVD) from {STYLEGAN_V_I3D_URL} "
            f"(save it as i3d_torchscript.pt), or a pytorch-i3d state dict from "
            f"{PYTORCH_I3D_URL}, and pass its path."
        )
    device = torch.device(device)
    weights_id = _file_hash(path)

    if _is_torchscript(path):
        if layer != "logits":
            raise ValueError(
                "the TorchScript I3D only gives its 400-d features; use layer='logits' with it"
            )
        try:
            with warnings.catch_warnings():
                # Recent PyTorch deprecates TorchScript, but this file exists only in that format.
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise _not_i3d(path, f"TorchScript archive that cannot be loaded: {exc}") from exc
        return I3DFeatureExtractor(
            model,
            "torchscript",
            "i3d-stylegan-v-torchscript",
            400,
            weights_id,
            True,
            layer,
            device,
            batch_size,
            path,
        )

    try:
        state = _read_state_dict(path)
    except ValueError as exc:
        raise _not_i3d(path, str(exc)) from exc
    except Exception as exc:  # unpickling / format errors of all kinds
        raise _not_i3d(path, f"{type(exc).__name__}: {exc}") from exc
    logits_w = state.get("logits.conv3d.weight")
    if logits_w is None or logits_w.ndim != 5:
        raise _not_i3d(path, "no 'logits.conv3d.weight' of a pytorch-i3d InceptionI3d")
    model = InceptionI3d(num_classes=logits_w.shape[0])
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise _not_i3d(
            path,
            f"keys differ from pytorch-i3d's InceptionI3d: {len(missing)} "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise _not_i3d(path, str(exc).splitlines()[0]) from exc
    model = model.to(device).eval()
    dim = model.num_classes if layer == "logits" else InceptionI3d.FEATURE_DIM
    return I3DFeatureExtractor(
        model,
        "pytorch-i3d",
        f"i3d-pytorch-{layer}",
        dim,
        weights_id,
        False,
        layer,
        device,
        batch_size,
        path,
    )


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm counters; load_state_dict fills them.
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    return sorted(expected - given), sorted(given - expected)
