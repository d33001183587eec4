"""Checkpoints: written atomically, read with safe loaders.

A run folder holds ``checkpoints/step_XXXXXXX/`` folders and a ``checkpoints/latest`` pointer::

    step_0001000/
        model.safetensors      the trained weights
        ema.safetensors        the EMA weights (what sampling uses by default)
        training_state.pt      optimizer state, step, RNG states, data position, config
                               (tensors and plain containers only: read with weights_only=True)
        checkpoint.json        step, the model's constructor arguments, the run config, classes

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into
place with ``os.replace``; ``latest`` is then replaced the same way. A crash at any point leaves
the previous checkpoint and pointer as they were. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint_files",
           "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "prune_checkpoints",
           "state_dict_to_safetensors", "load_weights", "FILES", "CHECKPOINTS_DIR"]

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE = ("model.safetensors", "ema.safetensors",
                                               "training_state.pt", "checkpoint.json")
FILES = (MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE)
FORMAT = "matten-checkpoint"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A missing, incomplete or unreadable checkpoint."""


def step_dirname(step: int) -> str:
    return f"step_{int(step):07d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def state_dict_to_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU tensors (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(run_dir, step: int, model_state: dict, ema_state: dict, training_state: dict,
                    meta: dict, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically, point ``latest`` at it
    and delete all but the newest ``keep_last`` (0 keeps all). Returns its folder."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dirname(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_file(state_dict_to_safetensors(model_state), str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "step": str(step)})
        save_file(state_dict_to_safetensors(ema_state), str(tmp / EMA_FILE),
                  metadata={"format": "pt", "step": str(step)})
        torch.save(training_state, tmp / STATE_FILE)
        _write_json(tmp / META_FILE, {"format": FORMAT, "version": 1, "step": int(step), **meta})
        for name in FILES:
            _fsync_file(tmp / name)
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same step saved again (e.g. after a resume): swap it out
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, final.name)
    prune_checkpoints(run_dir, keep_last)
    return final


def _write_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-latest-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / LATEST)
        _fsync_dir(root)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in FILES)


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint ``latest`` points at; if the pointer is missing or stale, the newest
    complete one; None if the run has none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST
    if pointer.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            name = pointer.read_text().strip()
            if _STEP_DIR.match(name) and is_complete(root / name):
                return root / name
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    removed = []
    for _, folder in found[:-keep_last]:
        if latest is not None and folder.resolve() == latest.resolve():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), a run's ``checkpoints``
    folder, or a checkpoint folder itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{p}' does not exist (give a run folder, its "
                                f"'{CHECKPOINTS_DIR}' folder or a checkpoint folder such as "
                                f"'{CHECKPOINTS_DIR}/step_0001000')")
    if p.is_file():
        if p.name in FILES:
            p = p.parent
        else:
            raise CheckpointError(f"'{p}' is a file; give a run folder or a checkpoint folder "
                                  f"(one holding {', '.join(FILES)})")
    if (p / META_FILE).is_file() or any((p / name).exists() for name in FILES):
        missing = [name for name in FILES if not (p / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint '{p}' is incomplete: missing {', '.join(missing)}")
        return p
    run_dir = p.parent if p.name == CHECKPOINTS_DIR else p
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"no checkpoint found in '{p}' (expected "
                                f"'{CHECKPOINTS_DIR}/step_XXXXXXX/' folders holding "
                                f"{', '.join(FILES)})")
    return found


def read_meta(folder) -> dict:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read '{path}': {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a Matten checkpoint description")
    return meta


def load_weights(folder, which: str = "ema") -> dict[str, torch.Tensor]:
    """The ``"ema"`` or ``"model"`` weights of a checkpoint folder (safetensors)."""
    if which not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {which!r}")
    path = Path(folder) / (EMA_FILE if which == "ema" else MODEL_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights '{path}' not found")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read weights '{path}': {exc}") from None


@dataclass
class Checkpoint:
    folder: Path
    step: int
    meta: dict
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict


def load_checkpoint_files(path) -> Checkpoint:
    """Everything in a checkpoint (``path`` as for :func:`resolve_checkpoint`)."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    state_path = folder / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read training state '{state_path}': {exc}") from None
    return Checkpoint(folder, int(meta["step"]), meta, load_weights(folder, "model"),
                      load_weights(folder, "ema"), state)
