"""A curriculum from short to long clips (``train.curriculum``), and the batches a run draws.

``train.curriculum`` is a list of stages ``[steps, num_frames]`` or ``[steps, num_frames,
batch_size]``: stage k trains on clips of its ``num_frames`` for its ``steps``, then the next one
starts. Without a batch size a stage keeps frames x batch about the training's
(``data.num_frames`` x ``train.batch_size``), rounded down, at least 1 (per process). The last
stage runs on until ``train.max_steps``; stages that would start at or after it are not run (a
warning says so). ``data.num_frames`` stays the model's reference length and the length of the
preview samples.

Each stage reads its own resumable stream (:class:`.data.StreamSampler`, seeded by the run's
seed and the stage's index) from where the stage began, so the batch of step s is a function of
s alone and a run resumed inside a stage reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ..config import RunConfig
from .data import StreamSampler, build_loader
from .resume import SetupError
from .rng import capture_rng, restore_rng
from .setup import Run, build_dataset

__all__ = ["Stage", "curriculum_stages", "stage_at", "RunBatches"]

logger = logging.getLogger(__name__)

STAGE_SEED = 7919  # stage k's stream is seeded train.seed + k * STAGE_SEED (stage 0: the seed)


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # the steps done before it
    steps: int  # as configured (the last stage runs on to train.max_steps)
    num_frames: int
    batch_size: int  # global: split over the processes


def curriculum_stages(cfg: RunConfig, world: int = 1) -> list[Stage]:
    """The stages of ``train.curriculum`` (empty: no curriculum), with their batch sizes."""
    stages, start = [], 0
    for index, entry in enumerate(cfg.train.curriculum):
        steps, frames = int(entry[0]), int(entry[1])
        batch = int(entry[2]) if len(entry) > 2 else scaled_batch(cfg, frames, world)
        if batch % world:
            raise SetupError(
                f"train.curriculum[{index}]: batch size {batch} is not divisible "
                f"by the {world} processes"
            )
        stages.append(Stage(index, start, steps, frames, batch))
        start += steps
    return stages


def scaled_batch(cfg: RunConfig, num_frames: int, world: int = 1) -> int:
    """The batch that keeps frames x batch about the training's: rounded down to a multiple of
    the processes, at least one clip per process."""
    batch = cfg.train.batch_size * cfg.data.num_frames // num_frames
    return max(world, batch // world * world)


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that step ``step + 1`` trains in (after the last stage's steps: the last)."""
    return next((s for s in reversed(stages) if s.start <= step), stages[0])


class RunBatches:
    """The batch of every step: the run's own loader, or with a curriculum the current
    stage's, switched at the stage boundaries (and a line in the log when a stage starts)."""

    def __init__(self, run: Run, start_step: int):
        self.run = run
        self.stages = curriculum_stages(run.cfg, run.world)
        self.stage: Stage | None = None
        self.sampler, self.batches = run.sampler, None
        if not self.stages:
            self.batches = iter(run.loader) if start_step < run.cfg.train.max_steps else None
            return
        self._warn_unreached()
        self.datasets = self._stage_datasets()  # all at once: a stage the data cannot give
        # fails before any training

    def next(self, step: int) -> dict:
        """The batch of step ``step + 1``."""
        if self.stages:
            stage = stage_at(self.stages, step)
            if stage != self.stage:
                self._enter(stage, step)
        return next(self.batches)

    def position(self, step: int) -> dict:
        """Where the data stand after ``step`` steps (recorded in checkpoints)."""
        if not self.stages:
            return self.sampler.position(step)
        stage = stage_at(self.stages, max(step - 1, 0))
        sampler = self.sampler if stage == self.stage else self._sampler(stage, step)
        return {
            "stage": stage.index,
            "stage_step": step - stage.start,
            **sampler.position(step - stage.start),
        }

    def _enter(self, stage: Stage, step: int) -> None:
        self.stage, self.sampler = stage, self._sampler(stage, step)
        self.batches = iter(
            build_loader(
                self.datasets[stage.index],
                self.sampler,
                self.run.cfg.data.num_workers,
                pin_memory=self.run.device.type == "cuda",
            )
        )
        if self.run.main:
            how = (
                "starts"
                if step == stage.start
                else f"continues at its step {step - stage.start + 1}"
            )
            logger.info(
                "curriculum stage %d/%d %s (step %d): %d frames, batch %d, %s",
                stage.index + 1,
                len(self.stages),
                how,
                step + 1,
                stage.num_frames,
                stage.batch_size,
                self._until(stage),
            )

    def _sampler(self, stage: Stage, step: int) -> StreamSampler:
        """Stage ``stage``'s stream, positioned after ``step`` steps of the run."""
        run = self.run
        return StreamSampler(
            len(self.datasets[stage.index]),
            stage.batch_size,
            run.accelerator.process_index,
            run.world,
            seed=run.cfg.train.seed + stage.index * STAGE_SEED,
            start=(step - stage.start) * stage.batch_size,
        )

    def _stage_datasets(self) -> list:
        """One dataset per stage (the run's own where the clip length is the same). Building
        one must not draw from the global random streams, or a resumed run would differ."""
        cfg = self.run.cfg
        built = {cfg.data.num_frames: self.run.dataset}
        state = capture_rng()
        try:
            for stage in self.stages:
                if stage.num_frames not in built:
                    data = dataclasses.replace(cfg.data, num_frames=stage.num_frames)
                    built[stage.num_frames] = build_dataset(dataclasses.replace(cfg, data=data))
        finally:
            restore_rng(state)
        for stage in self.stages:
            if len(built[stage.num_frames]) == 0:
                raise SetupError(
                    f"train.curriculum[{stage.index}]: the '{cfg.data.name}' data "
                    f"have no clips of {stage.num_frames} frames"
                )
        return [built[stage.num_frames] for stage in self.stages]

    def _until(self, stage: Stage) -> str:
        last = stage.index == len(self.stages) - 1
        end = self.run.cfg.train.max_steps if last else stage.start + stage.steps
        return f"until step {min(end, self.run.cfg.train.max_steps)}"

    def _warn_unreached(self) -> None:
        max_steps = self.run.cfg.train.max_steps
        unreached = [s for s in self.stages if s.start >= max_steps]
        if unreached and self.run.main:
            logger.warning(
                "train.curriculum: stage(s) %s start at or after train.max_steps=%d "
                "and will not run (the curriculum has %d steps)",
                ", ".join(str(s.index + 1) for s in unreached),
                max_steps,
                sum(s.steps for s in self.stages),
            )
