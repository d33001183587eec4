"""What a run writes besides its weights' progress, each in one small piece: the run folder's
files (config.yaml, the list of skipped videos), the loss record and curve, checkpoints (all
processes agreeing), and preview samples from the EMA weights. Every file is written
atomically."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object

from ..checkpoint import CheckpointError, save_checkpoint, step_dirname
from ..config import config_to_dict
from ..data import atomic_write_path, clip_actions, save_samples
from ..pipelines import sample_videos
from .plots import plot_loss_curve
from .resume import SetupError
from .rng import capture_rng
from .setup import Run, any_process, barrier

__all__ = ["SKIPPED_FILE", "RunFiles", "LossRecord", "Checkpointer", "Previews"]

logger = logging.getLogger(__name__)

SKIPPED_FILE = "skipped_videos.tsv"


class RunFiles:
    """``config.yaml`` (the run's settings, editable before a resume) and
    ``skipped_videos.tsv`` (each video the dataset left out, with the reason)."""

    def __init__(self, run: Run):
        self.run, self.skipped_listed = run, 0

    def write_config(self) -> None:
        with atomic_write_path(self.run.output / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config_to_dict(self.run.cfg), sort_keys=False))

    def list_skipped(self) -> None:
        """(Re)write the list when the dataset has skipped more videos (one may fail later)."""
        dataset = self.run.dataset
        rows = dataset.skipped_rows() if hasattr(dataset, "skipped_rows") else []
        if len(rows) == self.skipped_listed:
            return
        path = self.run.output / SKIPPED_FILE
        with atomic_write_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["reason", "path"])
            writer.writerows(rows)
        if self.skipped_listed == 0:
            logger.warning(
                "skipped %d videos (%s): listed in %s", len(rows), dataset.skipped_summary(), path
            )
        self.skipped_listed = len(rows)


class LossRecord:
    """Every step's loss: ``loss.csv`` (continued across resumes, no gaps) and ``loss.png``."""

    def __init__(self, run: Run):
        self.run, self.path = run, run.output / "loss.csv"
        self.rows = read_losses(self.path, run.start_step) if run.main else []
        self.pending: list[tuple[int, torch.Tensor]] = []  # not yet moved off the device
        self.new: list[float] = []  # the losses of the steps of this call

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def flush(self) -> None:
        values = [(s, float(v)) for s, v in self.pending]
        self.pending.clear()
        self.new.extend(v for _, v in values)
        self.rows.extend(values)

    def recent_mean(self, count: int) -> float:
        recent = [v for _, v in self.rows[-count:]]
        return sum(recent) / len(recent)

    def write(self) -> None:
        self.flush()  # a checkpoint's loss.csv holds every step up to it
        if self.run.main:
            with atomic_write_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["step", "loss"])
                writer.writerows((s, f"{v:.6g}") for s, v in self.rows)
            if self.rows:
                plot_loss_curve(
                    self.run.output / "loss.png",
                    [r[0] for r in self.rows],
                    [r[1] for r in self.rows],
                    title=f"training loss ({self.run.meta['model_config']['name']})",
                )


def read_losses(path: Path, up_to: int) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            try:
                step, loss = int(row[0]), float(row[1])
            except (ValueError, IndexError):
                continue  # header or a torn last line
            if step <= up_to:
                rows.append((step, loss))
    return rows


class Checkpointer:
    """Writes checkpoints; every process learns whether the write failed, so none waits for a
    main process that has stopped, and the main process raises the error that says what is
    kept."""

    def __init__(self, run: Run, position=None):
        self.run = run
        # where the data stand after a step (the curriculum's stage, else the run's sampler)
        self.position = position or run.sampler.position
        self.saved_step = run.start_step  # the step of the newest checkpoint on disk (0: none)
        self.last: Path | None = None

    def save(self, step: int) -> None:
        run, accelerator = self.run, self.run.accelerator
        states = gather_object([capture_rng()]) if run.world > 1 else [capture_rng()]
        self.saved_step, failed = step, None
        if run.main:
            state = {
                "step": step,
                "optimizer": run.optimizer.state_dict(),
                "rng": states,
                "data": self.position(step),
                "config": config_to_dict(run.cfg),
                "world_size": run.world,
            }
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            try:
                self.last = save_checkpoint(
                    run.output,
                    step,
                    run.raw_model.state_dict(),
                    run.ema.state_dict(),
                    state,
                    dict(run.meta),
                    keep_last=run.cfg.train.keep_last,
                )
            except CheckpointError as exc:
                failed = exc
        if any_process(failed is not None, accelerator) and failed is None:
            raise SetupError(f"the main process could not write checkpoint {step_dirname(step)}")
        if failed is not None:
            raise failed


class Previews:
    """Sample videos from the EMA weights: ``samples/step_XXXXXXX.gif`` and its grid."""

    def __init__(self, run: Run):
        self.run = run
        self.written: list[Path] = []

    def write(self, step: int) -> None:
        run = self.run
        if run.main:
            s, n = run.cfg.sample, run.cfg.sample.num_samples
            labels = torch.arange(n) % run.num_classes if run.num_classes else None
            actions = clip_actions(run.dataset, n) if run.raw_model.takes_actions else None
            videos = sample_videos(
                run.ema,
                run.autoencoder,
                n,
                run.cfg.data.num_frames,
                run.latent_hw,
                labels=labels,
                sampler=s.sampler,
                steps=s.steps,
                eta=s.eta,
                cfg_scale=s.cfg_scale if run.num_classes else 1.0,
                seed=s.seed,
                learn_sigma=run.cfg.model.learn_sigma,
                diffusion_steps=run.cfg.diffusion.steps,
                prediction=run.cfg.diffusion.prediction,
                schedule=run.cfg.diffusion.schedule,
                device=run.device,
                actions=actions,
            )
            path = run.output / "samples" / f"{step_dirname(step)}.gif"
            self.written.extend(save_samples(videos, path, fps=s.fps))
        barrier(run.accelerator)
