"""The training loop: one process or many through HuggingFace ``accelerate``.

The run folder gets ``config.yaml``, ``loss.csv`` and ``loss.png``, ``samples/step_XXXXXXX.gif``
(+ its grid, from the EMA weights) and ``checkpoints/`` (see :mod:`matten.checkpoint`). Launch on
several GPUs with ``accelerate launch -m matten.cli train ...`` or
``torchrun --nproc_per_node N -m matten.cli train ...``. The pieces: :mod:`.resume` (what to
continue from), :mod:`.setup` (the run), :mod:`.curriculum` (the batches, short to long clips
with ``train.curriculum``), :mod:`.step` (one step), :mod:`.callbacks` (what is written along
the way).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import allocator, cpu_share
from ..checkpoint import CheckpointError, latest_checkpoint
from ..config import RunConfig
from ..interrupts import GracefulStop
from ..ssm import backend as scan_backend
from .callbacks import Checkpointer, LossRecord, Previews, RunFiles
from .curriculum import RunBatches
from .resume import NothingToTrain, SetupError, checkpoint_to_resume
from .setup import any_process, barrier, build_run
from .step import train_step

__all__ = ["train", "TrainResult"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the loss of every step run by this call (mean over processes)
    output: Path
    model: torch.nn.Module | None  # unwrapped, on the training device (None: nothing to do)
    ema: torch.nn.Module | None
    checkpoint: Path | None = None
    samples: list[Path] = field(default_factory=list)
    stopped_by: str | None = None  # the signal that stopped the run early (SIGINT, SIGTERM)
    nothing_to_do: bool = False  # resumed at train.max_steps already: nothing was trained


def train(
    cfg: RunConfig, output=None, resume: str | None = None, progress: bool = True
) -> TrainResult:
    """Train the model ``cfg`` describes, writing into ``output`` (else ``cfg.train.output``).

    ``resume``: None starts a new run (refusing a folder that already has checkpoints),
    ``"auto"`` continues from the output's latest checkpoint if there is one, anything else is a
    checkpoint path (run folder, checkpoints folder or checkpoint folder). A resumed run continues
    exactly: its parameters equal those of an uninterrupted run, bit for bit (with the same
    number of processes; on GPUs with ``train.deterministic=true``). Ctrl-C or SIGTERM finishes
    the step, writes a checkpoint and returns (``stopped_by`` says which signal).
    """
    output = Path(output or cfg.train.output or "")
    if not str(output) or str(output) == ".":
        raise SetupError("no output folder: pass --output DIR (or set train.output)")
    cfg.train.output = str(output)
    cfg.validate()
    try:
        checkpoint = checkpoint_to_resume(cfg, output, resume)
    except NothingToTrain as done:
        return TrainResult(
            done.checkpoint.step,
            [],
            output,
            None,
            None,
            checkpoint=done.checkpoint.folder,
            nothing_to_do=True,
        )
    run = build_run(cfg, output, checkpoint)
    if run.device.type == "cpu":
        allocator.keep_freed_memory()  # each step reuses the last one's pages (matten.allocator)
    batches = RunBatches(run, run.start_step)  # the data, stage by stage with a curriculum
    files, losses = RunFiles(run), LossRecord(run)
    checkpoints, previews = Checkpointer(run, batches.position), Previews(run)
    if run.main:
        output.mkdir(parents=True, exist_ok=True)
        files.write_config()
        files.list_skipped()
        losses.write()
        params = sum(p.numel() for p in run.raw_model.parameters())
        logger.info(
            "training %s (%.2fM parameters) on %s x %d, steps %d -> %d, scan: %s",
            run.meta["model_config"]["name"],
            params / 1e6,
            run.device,
            run.world,
            run.start_step,
            cfg.train.max_steps,
            scan_backend(run.device),
        )
    t = cfg.train
    result = TrainResult(run.start_step, losses.new, output, run.raw_model, run.ema)
    bar = tqdm(
        total=t.max_steps,
        initial=run.start_step,
        disable=not (run.main and progress),
        unit="step",
        dynamic_ncols=True,
        desc="train",
        smoothing=0.05,
    )
    step, last_curve = run.start_step, time.monotonic()
    run.model.train()
    with GracefulStop() as stop:
        while step < t.max_steps:
            if any_process(stop.requested is not None, run.accelerator):
                result.stopped_by = stop.requested or "a signal to another process"
                if step != checkpoints.saved_step:
                    losses.write()
                    checkpoints.save(step)
                break
            if run.device.type == "cpu":
                cpu_share.update()  # our share of the cores, beside other busy processes
            losses.add(step + 1, train_step(run, batches.next(step), step))
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                losses.flush()
                bar.set_postfix(
                    loss=f"{losses.recent_mean(max(t.log_every, 20)):.4f}", refresh=False
                )
                if time.monotonic() - last_curve > 30:  # keep loss.csv / loss.png current
                    losses.write()
                    last_curve = time.monotonic()
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                losses.write()
                checkpoints.save(step)
                if run.main:
                    files.list_skipped()
            if (t.sample_every and step % t.sample_every == 0) or step == t.max_steps:
                previews.write(step)
                run.model.train()
    bar.close()
    losses.write()
    result.step, result.samples = step, previews.written
    result.checkpoint = checkpoints.last
    if result.checkpoint is None and run.main:
        with contextlib.suppress(CheckpointError):  # e.g. a newer, incomplete checkpoint
            result.checkpoint = latest_checkpoint(output)
    barrier(run.accelerator)
    return result
