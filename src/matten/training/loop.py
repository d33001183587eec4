"""The training loop: one process or many through HuggingFace ``accelerate``.

    video batch -> autoencoder.encode (frozen) -> latents -> diffusion.training_losses(model)
    -> AdamW step (gradients clipped, averaged over processes) -> EMA update

The run folder gets ``config.yaml``, ``loss.csv`` and ``loss.png``, ``samples/step_XXXXXXX.gif``
(+ ``.png`` grid, from the EMA weights) and ``checkpoints/`` (see :mod:`.checkpoint`).
Launch on several GPUs with ``accelerate launch -m matten.cli train ...`` or
``torchrun --nproc_per_node N -m matten.cli train ...``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig, config_differences, config_from_dict, \
    config_to_dict, resolve_mixed_precision
from ..diffusion import create_diffusion, forcing_timesteps
from ..interrupts import GracefulStop
from ..latent import build_autoencoder
from ..models import build_model
from ..pipelines import sample_videos
from ..checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                         load_checkpoint_files, read_meta, resolve_checkpoint,
                         save_checkpoint, step_dirname)
from ..data import clip_actions, dataset_from_config, save_samples
from .data import StreamSampler, build_loader
from .ema import create_ema, ema_decay_at, update_ema
from .plots import plot_loss_curve

__all__ = ["train", "TrainResult", "SetupError", "capture_rng", "restore_rng"]

logger = logging.getLogger(__name__)

MODEL_KEYS = ("name", "variant", "conditioning", "num_frames", "input_size", "in_channels",
              "num_classes", "learn_sigma", "depth", "hidden_size", "num_heads", "window", "sink",
              "memory", "num_actions", "ssm_block_size")

# Settings whose change on resume would change what the trained weights mean (the model's output
# is read as another quantity, or its inputs live in another space): refused.
MEANING_KEYS = ("diffusion.prediction", "diffusion.steps", "model.learn_sigma",
                "autoencoder.kind")
# Settings that are expected to change on resume: not worth a warning.
RESUME_FREE_KEYS = ("train.max_steps", "train.output")
SKIPPED_FILE = "skipped_videos.tsv"


class SetupError(ValueError):
    """The run cannot start: bad data path, mismatched checkpoint, existing run folder, ..."""


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


# ----------------------------------------------------------------------------------------------
# random state

def capture_rng() -> dict:
    """The states of Python's, NumPy's and torch's global generators (tensors and plain values
    only, so they load with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# setup helpers

def _make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    if cfg.train.deterministic:
        # CPU kernels are deterministic already; on CUDA cuBLAS needs a fixed workspace and
        # atomics-based kernels must be avoided (a warning names any that has no alternative).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    device_type = "cpu" if cpu else "cuda"
    precision = resolve_mixed_precision(cfg.train.mixed_precision, device_type)
    if precision == "fp16" and cpu:
        raise SetupError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on the CPU")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate keeps its settings process-wide; a second run in the same process (a
        # notebook, the tests) may use other ones. Launched runs keep the launcher's state.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _barrier(accelerator) -> None:
    """Wait for every process. CPU processes use a plain gloo barrier: accelerate's passes
    device_ids=[local rank], which fails on a machine with fewer GPUs than CPU processes."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        torch.distributed.barrier()
    else:
        accelerator.wait_for_everyone()


def _model_kwargs(cfg: RunConfig, in_channels: int, latent_hw, num_classes: int) -> dict:
    from ..models import CAUSAL_NAME

    m = cfg.model
    if m.name == CAUSAL_NAME:  # the long-video backbone; its clip length is only the router's
        kwargs = dict(name=m.name, input_size=list(latent_hw), in_channels=in_channels,
                      num_classes=num_classes, learn_sigma=m.learn_sigma,
                      class_dropout_prob=m.class_dropout_prob, num_actions=m.num_actions,
                      window=m.window, sink=m.sink, memory=m.memory,
                      ssm_block_size=m.ssm_block_size, context_length=cfg.data.num_frames)
        for key in ("depth", "hidden_size", "num_heads"):
            if getattr(m, key) is not None:
                kwargs[key] = getattr(m, key)
        return kwargs
    kwargs = dict(name=m.name, variant=m.variant, conditioning=m.conditioning,
                  num_frames=cfg.data.num_frames,
                  input_size=latent_hw[0] if latent_hw[0] == latent_hw[1] else tuple(latent_hw),
                  in_channels=in_channels, num_classes=num_classes, learn_sigma=m.learn_sigma,
                  class_dropout_prob=m.class_dropout_prob,
                  gradient_checkpointing=m.gradient_checkpointing)
    for key in ("depth", "hidden_size", "num_heads"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    return kwargs


def _model_num_classes(cfg: RunConfig, dataset) -> int:
    data_classes = int(getattr(dataset, "num_classes", 0) or 0)
    wanted = cfg.model.num_classes
    if wanted is None:
        return data_classes
    if wanted > 0 and wanted != data_classes:
        raise SetupError(f"model.num_classes is {wanted} but the '{cfg.data.name}' data have "
                         f"{data_classes} classes; set model.num_classes=null to use the data's "
                         f"count or 0 for an unconditional model")
    return wanted


def _compare_model_configs(saved: dict, built: dict, where: Path) -> None:
    saved = dict(saved)
    if saved.get("ssm_block_size") is not None and saved.get("depth"):
        # older checkpoints hold one (b_h, b_w) for all layers; compare per layer
        from ..models.causal import layer_block_sizes
        saved["ssm_block_size"] = [list(b) for b in layer_block_sizes(saved["ssm_block_size"],
                                                                      saved["depth"])]
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {built.get(k)!r}" for k in MODEL_KEYS
             if _norm(saved.get(k)) != _norm(built.get(k))]
    if diffs:
        raise SetupError(f"cannot resume from '{where}': the model differs ({'; '.join(diffs)})")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _check_resume_settings(saved: dict, cfg: RunConfig, where: Path) -> None:
    """Refuse a resume that changes what the weights mean; warn about every other change."""
    try:
        before = config_from_dict(saved)
    except ConfigError:
        return  # an older checkpoint's config: the model comparison still guards the weights
    changes = {k: v for k, v in config_differences(before, cfg).items()
               if k not in RESUME_FREE_KEYS}
    refused = [f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changes.items()
               if k in MEANING_KEYS]
    if refused:
        raise SetupError(f"cannot resume from '{where}' with {'; '.join(refused)}: that changes "
                         "what the trained weights mean; train a new run (another --output) "
                         "for these settings")
    if changes:
        logger.warning("resuming with changed settings: %s",
                       ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))


def _check_latent_fits(model, latent_hw, cfg: RunConfig) -> None:
    """The latent must split into whole patches: say which resolution works, before any file
    is written (the model itself only finds out at its first forward pass)."""
    patch = int(getattr(model, "patch_size", 1))
    h, w = latent_hw
    if h % patch or w % patch:
        factor = max(1, cfg.data.resolution // h)
        raise SetupError(f"data.resolution={cfg.data.resolution} gives a {h}x{w} latent, which "
                         f"the model's {patch}x{patch} patches do not divide: use a multiple of "
                         f"{patch * factor}")


def _write_skipped(dataset, output: Path, written: int) -> int:
    """List the videos the dataset left out (reason and path) in ``output/skipped_videos.tsv``;
    returns how many are listed. Rewritten when more are found (a video may fail later)."""
    rows = dataset.skipped_rows() if hasattr(dataset, "skipped_rows") else []
    if len(rows) == written:
        return written
    path = output / SKIPPED_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["reason", "path"])
        writer.writerows(rows)
    os.replace(tmp, path)
    if written == 0:
        logger.warning("skipped %d videos (%s): listed in %s", len(rows),
                       dataset.skipped_summary(), path)
    return len(rows)


def _read_losses(path: Path, up_to: int) -> list[tuple[int, float]]:
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


def _write_losses(path: Path, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows((s, f"{v:.6g}") for s, v in rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# the loop

def train(cfg: RunConfig, output=None, resume: str | None = None, progress: bool = True
          ) -> TrainResult:
    """Train the model ``cfg`` describes, writing into ``output`` (else ``cfg.train.output``).

    ``resume``: None starts a new run (refusing a folder that already has checkpoints),
    ``"auto"`` continues from the output's latest checkpoint if there is one, anything else is a
    checkpoint path (run folder, checkpoints folder or checkpoint folder). A resumed run continues
    exactly: its parameters equal those of an uninterrupted run, bit for bit (with the same
    number of processes; on GPUs with ``train.deterministic=true``).
    """
    output = Path(output or cfg.train.output or "")
    if not str(output) or str(output) == ".":
        raise SetupError("no output folder: pass --output DIR (or set train.output)")
    cfg.train.output = str(output)
    cfg.validate()

    checkpoint = None
    if resume is not None:
        if resume == "auto":
            found = latest_checkpoint(output)
            checkpoint = load_checkpoint_files(found) if found is not None else None
        else:
            checkpoint = load_checkpoint_files(resume)
    elif list_checkpoints(output):
        raise SetupError(f"'{output}' already holds checkpoints; pass --resume to continue that "
                         "run or choose another --output")
    if checkpoint is not None:
        _check_resume_settings(checkpoint.meta.get("run_config", {}), cfg, checkpoint.folder)
        done = int(checkpoint.state["step"])
        if cfg.train.max_steps < done:
            raise SetupError(f"the run is already at step {done}, past train.max_steps="
                             f"{cfg.train.max_steps}: pass --max-steps above {done} to train "
                             "further (an earlier checkpoint can be sampled with --checkpoint "
                             f"{checkpoint.folder.parent}/step_XXXXXXX)")
        if cfg.train.max_steps == done:
            logger.info("nothing left to train: the run is at step %d = train.max_steps; pass "
                        "--max-steps N (N > %d) to train longer", done, done)
            return TrainResult(done, [], output, None, None, checkpoint=checkpoint.folder,
                               nothing_to_do=True)

    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    t_cfg = cfg.train
    if t_cfg.batch_size % world:
        raise SetupError(f"train.batch_size {t_cfg.batch_size} is not divisible by the {world} "
                         "processes")

    # Same seed on every process for the model's initial weights...
    seed_everything(t_cfg.seed)
    try:
        dataset = dataset_from_config(cfg.data, seed=t_cfg.seed)
    except (ValueError, OSError) as exc:  # a missing root, a file where a folder is needed
        raise SetupError(f"data ({cfg.data.name}): {exc}") from exc
    except TypeError as exc:  # an unknown keyword in data.options
        raise SetupError(f"data ({cfg.data.name}): {exc} (check data.options: "
                         f"{cfg.data.options})") from exc
    ae_kwargs = {} if cfg.autoencoder.kind == "pixel" else \
        {"frame_batch_size": cfg.autoencoder.frame_batch_size}
    try:
        autoencoder = build_autoencoder(cfg.autoencoder.kind, cfg.autoencoder.path, **ae_kwargs)
        latent_hw = autoencoder.latent_size(cfg.data.resolution)
    except ValueError as exc:
        raise SetupError(f"autoencoder: {exc}") from exc
    autoencoder.to(device)
    num_classes = _model_num_classes(cfg, dataset)
    model_kwargs = _model_kwargs(cfg, autoencoder.latent_channels, latent_hw, num_classes)
    try:
        model = build_model(**model_kwargs)
    except (ValueError, TypeError) as exc:
        raise SetupError(f"model: {exc}") from exc
    _check_latent_fits(model, latent_hw, cfg)
    model_config = dict(model.config)
    diffusion = create_diffusion(cfg.diffusion.timestep_respacing, cfg.diffusion.steps,
                                 learn_sigma=cfg.model.learn_sigma,
                                 prediction=cfg.diffusion.prediction)
    ema = create_ema(model)

    start_step, rng_states = 0, None
    if checkpoint is not None:
        _compare_model_configs(checkpoint.meta.get("model_config", {}), model_config,
                               checkpoint.folder)
        model.load_state_dict(checkpoint.model)
        ema.load_state_dict(checkpoint.ema)
        start_step = int(checkpoint.state["step"])
        rng_states = checkpoint.state.get("rng")
    model.to(device)
    ema.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, betas=tuple(t_cfg.adam_betas),
                                  eps=t_cfg.adam_eps, weight_decay=t_cfg.weight_decay)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.state["optimizer"])
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if checkpoint is not None and checkpoint.state.get("scaler") and accelerator.scaler:
        accelerator.scaler.load_state_dict(checkpoint.state["scaler"])

    # ... and a different stream per process for noise, timesteps and label dropout.
    if rng_states is not None and len(rng_states) == world:
        restore_rng(rng_states[rank])
    else:
        if rng_states is not None and main:
            logger.warning("the checkpoint was written by %d processes, this run has %d: the "
                           "random streams are re-seeded, so the run will not match an "
                           "uninterrupted one exactly", len(rng_states), world)
        seed_everything(t_cfg.seed * 7919 + 1 + rank + start_step * 104729)

    sampler = StreamSampler(len(dataset), t_cfg.batch_size, rank, world, seed=t_cfg.seed,
                            start=start_step * t_cfg.batch_size)
    loader = build_loader(dataset, sampler, cfg.data.num_workers,
                          pin_memory=device.type == "cuda")
    class_names = list(getattr(dataset, "class_names", []) or [])[:num_classes]

    skipped_listed = 0
    if main:
        output.mkdir(parents=True, exist_ok=True)
        config_tmp = output / ".config.yaml.tmp"
        with open(config_tmp, "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        os.replace(config_tmp, output / "config.yaml")
        skipped_listed = _write_skipped(dataset, output, 0)
    loss_rows = _read_losses(output / "loss.csv", start_step) if main else []
    if main:
        _write_losses(output / "loss.csv", loss_rows)

    meta = {"model_config": model_config, "run_config": config_to_dict(cfg),
            "class_names": class_names, "diffusion_steps": cfg.diffusion.steps,
            "prediction": cfg.diffusion.prediction,
            "latent": {"channels": autoencoder.latent_channels, "size": list(latent_hw),
                       "num_frames": cfg.data.num_frames},
            "autoencoder": {"kind": autoencoder.kind, "path": cfg.autoencoder.path,
                            "frame_batch_size": cfg.autoencoder.frame_batch_size},
            "data": {"name": cfg.data.name, "resolution": cfg.data.resolution}}
    result = TrainResult(start_step, [], output, raw_model, ema)

    saved_step = start_step  # the step of the newest checkpoint on disk (0: none)

    def write_checkpoint(step: int) -> None:
        from accelerate.utils import gather_object

        nonlocal saved_step
        saved_step = step
        failed = None
        states = gather_object([capture_rng()]) if world > 1 else [capture_rng()]
        if main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "rng": states,
                     "data": sampler.position(step), "config": config_to_dict(cfg),
                     "world_size": world}
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            try:
                result.checkpoint = save_checkpoint(output, step, raw_model.state_dict(),
                                                    ema.state_dict(), state, {**meta},
                                                    keep_last=t_cfg.keep_last)
            except CheckpointError as exc:
                failed = exc
        # Every process learns whether the write failed (so none waits for a main process
        # that has stopped); the main process raises the error that says what is kept.
        if _any_process(failed is not None, accelerator) and failed is None:
            raise SetupError(f"the main process could not write checkpoint {step_dirname(step)}")
        if failed is not None:
            raise failed

    def write_samples(step: int) -> None:
        if main:
            s = cfg.sample
            labels = torch.arange(s.num_samples) % num_classes if num_classes else None
            actions = None
            if getattr(raw_model, "action_embedder", None) is not None:
                actions = clip_actions(dataset, s.num_samples)
            videos = sample_videos(ema, autoencoder, s.num_samples, cfg.data.num_frames,
                                   latent_hw, labels=labels, sampler=s.sampler, steps=s.steps,
                                   eta=s.eta, cfg_scale=s.cfg_scale if num_classes else 1.0,
                                   seed=s.seed, learn_sigma=cfg.model.learn_sigma,
                                   diffusion_steps=cfg.diffusion.steps,
                                   prediction=cfg.diffusion.prediction, device=device,
                                   actions=actions)
            path, grid = save_samples(videos, output / "samples" / f"{step_dirname(step)}.gif",
                                      fps=s.fps)
            result.samples.extend([path, grid])
        _barrier(accelerator)

    def flush_losses() -> None:
        """Move the losses of the steps since the last record into ``loss_rows``."""
        values = [(s, float(v)) for s, v in pending]
        pending.clear()
        result.losses.extend(v for _, v in values)
        loss_rows.extend(values)

    def write_curve() -> None:
        flush_losses()  # a checkpoint's loss.csv holds every step up to it
        if main and loss_rows:
            _write_losses(output / "loss.csv", loss_rows)
            plot_loss_curve(output / "loss.png", [r[0] for r in loss_rows],
                            [r[1] for r in loss_rows], title=f"training loss ({model_config['name']})")

    if main:
        params = sum(p.numel() for p in raw_model.parameters())
        logger.info("training %s (%.2fM parameters) on %s x %d, steps %d -> %d", model_config["name"],
                    params / 1e6, device, world, start_step, t_cfg.max_steps)
    bar = tqdm(total=t_cfg.max_steps, initial=start_step, disable=not (main and progress),
               unit="step", dynamic_ncols=True, desc="train", smoothing=0.05)
    conditional = num_classes > 0
    step = start_step
    pending: list[tuple[int, torch.Tensor]] = []
    data_iter = iter(loader) if step < t_cfg.max_steps else None
    last_curve = time.monotonic()
    model.train()

    def train_step(batch) -> torch.Tensor:
        """One optimisation step on ``batch``; returns its loss (mean over processes)."""
        video = batch["video"].to(device, non_blocking=True)
        latents = autoencoder.encode(video)
        # Diffusion forcing draws a noise level per frame, so the model learns to denoise any
        # frame given a history at any noise level (clean when generating autoregressively).
        frame_weight = None
        if cfg.diffusion.forcing:
            t, frame_weight = forcing_timesteps(latents.shape[0], latents.shape[2],
                                                diffusion.num_timesteps,
                                                cfg.diffusion.history_prob, device)
        else:
            t = torch.randint(0, diffusion.num_timesteps, latents.shape[:1], device=device)
        kwargs = {"y": batch["label"].to(device)} if conditional else {}
        if getattr(raw_model, "action_embedder", None) is not None:
            if "actions" not in batch:
                raise SetupError(f"model.num_actions is set but the '{cfg.data.name}' data have "
                                 "no per-frame actions")
            kwargs["actions"] = batch["actions"].to(device)
        kwargs = kwargs or None
        with accelerator.autocast():
            loss = diffusion.training_losses(model, latents, t, model_kwargs=kwargs,
                                             frame_weight=frame_weight)["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}; lower "
                                     "train.lr or enable train.grad_clip")
        accelerator.backward(loss)
        if t_cfg.grad_clip is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, raw_model, ema_decay_at(step, t_cfg.ema_decay, t_cfg.ema_early_decay,
                                                t_cfg.ema_early_steps))
        return accelerator.reduce(loss.detach(), reduction="mean") if world > 1 else loss.detach()

    # Ctrl-C or SIGTERM: finish the step, write a checkpoint, return (see GracefulStop).
    with GracefulStop() as stop:
        while step < t_cfg.max_steps:
            if _any_process(stop.requested is not None, accelerator):
                result.stopped_by = stop.requested or "a signal to another process"
                if step != saved_step:
                    write_curve()
                    write_checkpoint(step)
                break
            loss = train_step(next(data_iter))
            step += 1
            pending.append((step, loss))
            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                flush_losses()
                recent = [v for _, v in loss_rows[-max(t_cfg.log_every, 20):]]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
                if time.monotonic() - last_curve > 30:  # keep loss.csv / loss.png current
                    write_curve()
                    last_curve = time.monotonic()
            bar.update(1)
            if step % t_cfg.checkpoint_every == 0 or step == t_cfg.max_steps:
                write_curve()
                write_checkpoint(step)
                if main:  # a video may have failed to decode since
                    skipped_listed = _write_skipped(dataset, output, skipped_listed)
            if (t_cfg.sample_every and step % t_cfg.sample_every == 0) or \
                    step == t_cfg.max_steps:
                write_samples(step)
                model.train()
    bar.close()
    write_curve()
    result.step = step
    if result.checkpoint is None and main:
        with contextlib.suppress(CheckpointError):  # e.g. a newer, incomplete checkpoint
            result.checkpoint = latest_checkpoint(output)
    _barrier(accelerator)
    return result


def _any_process(flag: bool, accelerator) -> bool:
    """Whether ``flag`` is set on any process (all of them wait for this answer, so they take
    the same branch: stop at the same step, fail at the same checkpoint)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
