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
the previous checkpoint and pointer as they were; a failed write (a full disk, ...) raises
:class:`CheckpointWriteError`, which says so. Only the newest ``keep_last`` are kept. Hidden
``.tmp-*`` folders are never checkpoints.

A run's current checkpoint is the one ``latest`` names (else the newest ``step_*`` folder). If it
is incomplete (a file deleted or lost), resolving the run raises :class:`CheckpointError` naming
the previous complete checkpoint instead of quietly using an older model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint_files",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "prune_checkpoints",
    "state_dict_to_safetensors",
    "load_weights",
    "FILES",
    "CHECKPOINTS_DIR",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE = (
    "model.safetensors",
    "ema.safetensors",
    "training_state.pt",
    "checkpoint.json",
)
FILES = (MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE)
FORMAT = "matten-checkpoint"
_STEP_DIR = re.compile(r"^step_(\d+)$")
FILE_MODE, DIR_MODE = 0o644, 0o755  # as every other output of a run

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A missing, incomplete or unreadable checkpoint."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (a full disk, a read-only folder, ...); the previous checkpoint
    is untouched. Also an ``OSError``, as the failure underneath it is."""


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


def save_checkpoint(
    run_dir,
    step: int,
    model_state: dict,
    ema_state: dict,
    training_state: dict,
    meta: dict,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically, point ``latest`` at it
    and delete all but the newest ``keep_last`` (0 keeps all). Returns its folder."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dirname(step)
    tmp = old = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by an earlier crash
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        save_file(
            state_dict_to_safetensors(model_state),
            str(tmp / MODEL_FILE),
            metadata={"format": "pt", "step": str(step)},
        )
        save_file(
            state_dict_to_safetensors(ema_state),
            str(tmp / EMA_FILE),
            metadata={"format": "pt", "step": str(step)},
        )
        torch.save(training_state, tmp / STATE_FILE)
        _write_json(tmp / META_FILE, {"format": FORMAT, "version": 1, "step": int(step), **meta})
        for name in FILES:
            os.chmod(tmp / name, FILE_MODE)  # safetensors creates its files 0600
            _fsync_file(tmp / name)
        os.chmod(tmp, DIR_MODE)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): swap it out
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_latest(root, final.name)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():  # failed between the two renames: undo
            with contextlib.suppress(OSError):
                os.replace(old, final)
        # safetensors reports its I/O errors (a full disk too) as SafetensorError
        if isinstance(exc, (OSError, SafetensorError)):
            raise CheckpointWriteError(_write_failed_message(run_dir, final.name, exc)) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(run_dir, keep_last)
    return final


def _write_failed_message(run_dir, name: str, exc: BaseException) -> str:
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    io_error = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", reason)
    if io_error:
        reason = io_error.group(1)
    kept = _last_complete(Path(run_dir) / CHECKPOINTS_DIR)
    where = (
        f"the last complete checkpoint, '{kept}', is kept unchanged (resume from it once "
        "the problem is fixed)"
        if kept is not None
        else "no earlier checkpoint exists"
    )
    return f"cannot write checkpoint {name} of run '{run_dir}' ({reason}); {where}"


def _write_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-latest-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, root / LATEST)
        _fsync_dir(root)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def missing_files(folder: Path) -> list[str]:
    """The checkpoint files ``folder`` lacks (all of them if it is not a folder)."""
    return [name for name in FILES if not (Path(folder) / name).is_file()]


def is_complete(folder: Path) -> bool:
    return Path(folder).is_dir() and not missing_files(folder)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` folder, complete or not, oldest first (hidden ``.tmp-*`` ones are
    temporary folders of a write or a deletion, never checkpoints)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _pointer(root: Path) -> Path | None:
    """The folder ``latest`` names (it may be gone), or None without a readable pointer."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        name = (root / LATEST).read_text().strip()
        if _STEP_DIR.match(name):
            return root / name
    return None


def _last_complete(root: Path) -> Path | None:
    """The complete checkpoint the run falls back to: the pointer's, else the newest."""
    named = _pointer(root)
    if named is not None and is_complete(named):
        return named
    found = [p for _, p in _step_folders(root) if is_complete(p)]
    return found[-1] if found else None


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder)."""
    return [
        (step, p) for step, p in _step_folders(Path(run_dir) / CHECKPOINTS_DIR) if is_complete(p)
    ]


def latest_checkpoint(run_dir) -> Path | None:
    """The run's current checkpoint: the one ``latest`` names, or the newest ``step_*`` folder
    when there is no pointer or the folder it names is gone (with a warning); None if the run
    has none.

    Raises :class:`CheckpointError` if that checkpoint is incomplete, naming what is missing and
    the previous complete checkpoint to give instead: an older model is never used silently.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    folders = _step_folders(root)
    if not folders:
        return None
    named = _pointer(root)
    current = folders[-1][1]
    if named is not None and named.is_dir():
        current = named
    elif named is not None:
        logger.warning(
            "%s names %s, which does not exist; using the newest checkpoint, '%s'",
            root / LATEST,
            named.name,
            current,
        )
    current_step = int(_STEP_DIR.match(current.name).group(1))
    missing = missing_files(current)
    if missing:
        older = [p for step, p in folders if step < current_step and is_complete(p)]
        if older:
            advice = f"to use the previous complete checkpoint, give '{older[-1]}' instead"
        else:
            advice = "the run has no earlier complete checkpoint"
        raise CheckpointError(
            f"the latest checkpoint '{current}' is incomplete (missing "
            f"{', '.join(missing)}); {advice}"
        )
    newer = [p for step, p in folders if step > current_step and not is_complete(p)]
    if newer:  # e.g. left behind by a resume from an older checkpoint
        logger.warning(
            "'%s' is incomplete (missing %s) and ignored; using '%s', which %s names",
            newer[-1],
            ", ".join(missing_files(newer[-1])),
            current,
            LATEST,
        )
    return current


def prune_checkpoints(run_dir, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    if keep_last <= 0:
        return []
    root = Path(run_dir) / CHECKPOINTS_DIR
    named = _pointer(root)
    removed = []
    for _, folder in list_checkpoints(run_dir)[:-keep_last]:
        if named is not None and folder.name == named.name:
            continue
        _delete_folder(folder)
        removed.append(folder)
    return removed


def _delete_folder(folder: Path) -> None:
    """Rename out of sight first, so that a crash part-way leaves no half-deleted ``step_*``
    folder (the hidden ``.tmp-*`` leftover is cleaned by the next save)."""
    trash = folder.with_name(f".tmp-pruned-{folder.name}-{os.getpid()}")
    try:
        os.replace(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), a run's ``checkpoints``
    folder, or a checkpoint folder itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint '{p}' does not exist (give a run folder, its "
            f"'{CHECKPOINTS_DIR}' folder or a checkpoint folder such as "
            f"'{CHECKPOINTS_DIR}/step_0001000')"
        )
    if p.is_file():
        if p.name in FILES:
            p = p.parent
        else:
            raise CheckpointError(
                f"'{p}' is a file; give a run folder or a checkpoint folder "
                f"(one holding {', '.join(FILES)})"
            )
    in_run = p.parent.name == CHECKPOINTS_DIR and _STEP_DIR.match(p.name)
    if in_run or any((p / name).exists() for name in FILES):
        missing = missing_files(p)  # a checkpoint folder itself
        if missing:
            raise CheckpointError(f"checkpoint '{p}' is incomplete: missing {', '.join(missing)}")
        return p
    run_dir = p.parent if p.name == CHECKPOINTS_DIR else p
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint found in '{p}' (expected "
            f"'{CHECKPOINTS_DIR}/step_XXXXXXX/' folders holding "
            f"{', '.join(FILES)})"
        )
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
    return Checkpoint(
        folder,
        int(meta["step"]),
        meta,
        load_weights(folder, "model"),
        load_weights(folder, "ema"),
        state,
    )
