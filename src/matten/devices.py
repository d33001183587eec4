"""Choosing the device a command runs on: the user's ``--device``, else CUDA when there is one."""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(ValueError):
    """A device that does not exist here (``cuda`` on a CPU-only PyTorch, a bad name, ...)."""


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` checked against this machine, or ``cuda`` if available, else ``cpu``.

    Raises :class:`DeviceError` with a sentence a user can act on instead of the traceback
    PyTorch gives later ("Torch not compiled with CUDA enabled").
    """
    if name is None or str(name).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError):
        raise DeviceError(
            f"--device {name!r} is not a device name (use cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
            raise DeviceError(
                f"--device {name}: no CUDA GPU is usable (PyTorch "
                f"{torch.__version__} is {build}); use --device cpu, or install "
                "the CUDA build of PyTorch on a GPU machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(
            f"--device {name}: unsupported device type '{device.type}' (use cpu or cuda)"
        )
    return device
