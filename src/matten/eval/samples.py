"""The sampled clips of an evaluation, kept so that an interrupted evaluation resumes: one
shard per batch, and the key of everything they depend on (the checkpoint's content, the
weights, the sampler settings, the seed, the clip count, the batch size, the clip size), so that
clips made with other settings are never mixed in."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import CHECKPOINTS_DIR, EMA_FILE, META_FILE, MODEL_FILE, step_dirname
from ..data import atomic_write_path

__all__ = [
    "SamplesMismatchError",
    "SHARD_FORMAT",
    "sample_key",
    "key_digest",
    "default_output",
    "GeneratedClips",
]

logger = logging.getLogger(__name__)


class SamplesMismatchError(ValueError):
    """The output folder holds sampled clips made with other settings or another checkpoint."""


SHARD_FORMAT = 1  # what a shard holds (uint8 clips and labels); bump when that changes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_key(
    folder,
    weights: str,
    step: int,
    sampler: str,
    cfg_scale: float,
    settings,
    num_frames: int,
    resolution: int,
) -> dict:
    """Everything the sampled clips of an evaluation depend on. The checkpoint enters by content
    (the weights file used and its ``checkpoint.json``), so a copied run keeps its samples."""
    folder = Path(folder)
    return {
        "step": int(step),
        "weights": weights,
        "weights_sha256": _sha256(folder / (EMA_FILE if weights == "ema" else MODEL_FILE)),
        "checkpoint_json_sha256": _sha256(folder / META_FILE),
        "sampler": sampler,
        "steps": None if settings.steps is None else int(settings.steps),
        "eta": float(settings.eta),
        "cfg_scale": float(cfg_scale),
        "seed": int(settings.seed),
        "num_clips": int(settings.num_clips),
        "batch_size": int(settings.batch_size),
        "num_frames": int(num_frames),
        "resolution": int(resolution),
        "shard_format": SHARD_FORMAT,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_output(folder, key: dict) -> Path:
    """``<run>/eval/step_XXXXXXX-<first 8 hex digits of the key's hash>`` for the checkpoint
    ``folder``: one evaluation folder per checkpoint and settings, side by side."""
    folder = Path(folder)
    run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else folder.parent
    return run_dir / "eval" / f"{step_dirname(key['step'])}-{key_digest(key)[:8]}"


def _key_differences(old: dict, new: dict) -> list[str]:
    def shown(value):
        text = json.dumps(value)
        return text[1:13] + "..." if len(text) > 40 else text  # a hash: its first digits

    names = list(new) + [name for name in old if name not in new]
    return [
        f"{name} {shown(old.get(name))} -> {shown(new.get(name))}"
        for name in names
        if old.get(name) != new.get(name)
    ]


class GeneratedClips:
    """The sampled clips of an evaluation, one ``shard_XXXXX.npz`` per batch (uint8 clips and
    labels), each written atomically, and ``key.json``: the :func:`sample_key` they were made
    with. Shard ``i`` is a function of (key, i) alone, so an interrupted evaluation continues
    with the missing shards and gets the same clips."""

    KEY_FILE = "key.json"

    def __init__(self, folder, num_clips: int, batch_size: int, key: dict | None = None):
        self.folder = Path(folder)
        self.num_clips, self.batch_size = int(num_clips), int(batch_size)
        self.num_shards = -(-self.num_clips // self.batch_size)
        self.key = key

    def claim(self, overwrite: bool = False) -> None:
        """Make the folder this key's: keep shards made with the same key; refuse shards of
        another key (or, with ``overwrite``, delete them); then record the key."""
        key_path = self.folder / self.KEY_FILE
        shards = list(self.folder.glob("shard_*.npz"))
        if key_path.is_file():
            try:
                old = json.loads(key_path.read_text())
            except (OSError, ValueError):
                old = None
            if old == self.key:
                return
            if isinstance(old, dict):
                differences = ", ".join(_key_differences(old, self.key or {}))
                problem = f"samples made with other settings ({differences})"
            else:
                problem = f"samples with an unreadable {self.KEY_FILE}"
        elif shards:
            problem = f"{len(shards)} sample shard(s) without a {self.KEY_FILE} (an older layout)"
        else:
            problem = None
        if problem is not None:
            if not overwrite:
                raise SamplesMismatchError(
                    f"'{self.folder}' holds {problem}; pass --overwrite to sample again there, "
                    "or choose another --output"
                )
            logger.warning("%s: deleting %s", self.folder, problem)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(key_path) as tmp:
            tmp.write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")

    def path(self, shard: int) -> Path:
        return self.folder / f"shard_{shard:05d}.npz"

    def shard_size(self, shard: int) -> int:
        return min(self.batch_size, self.num_clips - shard * self.batch_size)

    def load(self, shard: int) -> np.ndarray | None:
        """The clips of a finished shard, or None (missing, or unreadable: then it is redone)."""
        path = self.path(shard)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                clips = data["clips"]
        except Exception as exc:  # a damaged shard is sampled again
            logger.warning(
                "generated clips '%s' cannot be read (%s); sampling them again", path, exc
            )
            return None
        return clips if len(clips) == self.shard_size(shard) else None

    def save(self, shard: int, clips: np.ndarray, labels) -> None:
        with atomic_write_path(self.path(shard)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, clips=clips, labels=np.asarray(labels if labels is not None else []))
