"""`matten sample`: sample videos from a checkpoint into a GIF/MP4 and a PNG grid."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..data import VIDEO_SUFFIXES, grid_path_for, remove_stale_temp_files, save_samples
from ..devices import DeviceError
from ..interrupts import exit_status, sigterm_as_interrupt
from ..pipelines import LongVideoInterrupted, LongVideoPipeline, MattenPipeline, SamplingError
from .options import parse_action_schedule, parse_class_switches


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "sample",
        help="sample videos from a trained checkpoint",
        description="Sample videos from a checkpoint (EMA weights by default). Writes OUTPUT "
        "(the samples side by side) and OUTPUT.png beside it, a grid with a row per "
        "sample (demo.gif -> demo.gif.png). With --frames, Ctrl-C keeps the frames "
        "made so far in a partial video (long.mp4 -> long.partial.mp4).",
        epilog="examples:\n"
        "  matten sample --checkpoint runs/demo --output demo.gif\n"
        "  matten sample --checkpoint runs/ucf/checkpoints/step_0150000 --output ucf.mp4 "
        "--class 3 --cfg-scale 7 --sampler ddpm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (its latest checkpoint) or a checkpoint folder",
    )
    parser.add_argument(
        "--output", "-o", required=True, help="video file: .gif, .mp4, .webm, .mov, .mkv or .avi"
    )
    parser.add_argument(
        "--num-samples",
        "-n",
        type=int,
        default=None,
        help="default: the run's config (sample.num_samples)",
    )
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=None,
        metavar="CLASS",
        help="class index or name for a class-conditional model "
        "(repeat to cycle several); default: all in turn",
    )
    parser.add_argument(
        "--sampler",
        choices=("ddpm", "ddim"),
        default=None,
        help="default: the one the run's config names (sample.sampler)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="respaced sampling steps (default 250 for ddpm, 50 for ddim)",
    )
    parser.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (1 = none; default: the config's)",
    )
    parser.add_argument(
        "--action-cfg-scale",
        type=float,
        default=None,
        help="long videos: guidance on the actions (1 = none; a model trained with "
        "model.causal.action_dropout_prob > 0; default: the config's)",
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="EMA weights (default) or the raw trained weights",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="samples per model call")
    parser.add_argument(
        "--fps",
        type=int,
        default=None,
        help="frames per second of the video (default: the config's)",
    )
    parser.add_argument(
        "--vae", default=None, help="local Stable Diffusion VAE path (overrides the checkpoint's)"
    )
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if any)")
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="long video (Matten-Causal models): generate this many frames chunk "
        "by chunk, writing them as they come, at constant memory per frame",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=2,
        help="frames denoised together in long generation (default 2)",
    )
    parser.add_argument(
        "--actions",
        default=None,
        metavar="SPEC",
        help="per-frame actions of an action-conditioned model, cycled over the "
        "video: e.g. 'right*8,stay*2,left*8' (names or indices); default: "
        "the camera moves of the training clips",
    )
    parser.add_argument(
        "--class-at",
        dest="class_at",
        action="append",
        default=None,
        metavar="FRAME:CLASS",
        help="long video: switch every sample to CLASS from FRAME on (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=lambda args: run(args, parser))
    return parser


def run(args, parser) -> int:
    try:
        if Path(args.output).suffix.lower() not in VIDEO_SUFFIXES:
            raise SamplingError(
                f"--output '{args.output}' must end in one of {', '.join(VIDEO_SUFFIXES)}"
            )
        if args.num_samples is not None and args.num_samples < 1:
            raise SamplingError(f"--num-samples must be >= 1, got {args.num_samples}")
        if args.fps is not None and args.fps < 1:
            raise SamplingError(f"--fps must be >= 1 (frames per second), got {args.fps}")
        pipe = MattenPipeline.from_pretrained(
            args.checkpoint, weights=args.weights, device=args.device, vae_path=args.vae
        )
        args.num_samples = int(pipe.default("num_samples", args.num_samples, 8))
        if args.frames is not None:
            if not pipe.model.streams:
                raise SamplingError(
                    "--frames needs a long-video model (model.name: "
                    "Matten-Causal); clip models generate their "
                    f"{pipe.loaded.num_frames} training frames"
                )
            return run_long(args, parser, LongVideoPipeline(pipe.loaded, pipe.device))
        if args.class_at:
            raise SamplingError("--class-at switches classes mid-stream: it needs --frames")
        if args.action_cfg_scale not in (None, 1.0):
            raise SamplingError(
                "--action-cfg-scale guides a long video's actions: it needs --frames"
            )
        labels = pipe.labels(args.classes, args.num_samples)
        actions = frame_actions(args, pipe)
        if actions is not None:
            actions = torch.stack([actions(f) for f in range(pipe.loaded.num_frames)], dim=1)
        sampler = pipe.default("sampler", args.sampler, "ddim")
        start = time.time()
        videos = pipe(
            args.num_samples,
            labels,
            sampler=sampler,
            steps=args.steps,
            eta=args.eta,
            cfg_scale=args.cfg_scale,
            seed=args.seed,
            actions=actions,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        fps = int(pipe.default("fps", args.fps, 8))
        grid_path = grid_path_for(args.output)
        clean_stale_temp_files(args.output, grid_path)
        video_path, grid_path = save_samples(videos, args.output, fps=fps, grid_path=grid_path)
    except (SamplingError, CheckpointError, DeviceError, FileNotFoundError) as exc:
        parser.error(str(exc))
    loaded = pipe.loaded
    what = "" if labels is None else f", classes {labels.tolist()}"
    print(
        f"{args.num_samples} samples from {loaded.folder} (step {loaded.step}, {args.weights} "
        f"weights, {sampler}{what}) in {time.time() - start:.1f}s"
    )
    print(f"video: {video_path}")
    print(f"grid:  {grid_path}")
    return 0


def run_long(args, parser, pipe: LongVideoPipeline) -> int:
    """`--frames N`: autoregressive generation of a long-video model, written progressively."""
    if args.frames < 1 or args.chunk_size < 1:
        parser.error("--frames and --chunk-size must be >= 1")
    try:
        labels = pipe.labels(args.classes, args.num_samples)
        actions = frame_actions(args, pipe)
        switches = parse_class_switches(
            args.class_at, args.num_samples, pipe.loaded.num_classes, pipe.loaded.class_names
        )
    except SamplingError as exc:
        parser.error(str(exc))
    y = labels
    if switches:  # (parse_class_switches refused them for an unconditional model)

        def y(frame: int):  # the labels of the last switch at or before this frame
            return next((lab for at, lab in reversed(switches) if at <= frame), labels)

    clean_stale_temp_files(args.output)
    start = time.time()
    try:
        # Ctrl-C, or SIGTERM (kill, a job scheduler), keeps the frames made so far.
        with sigterm_as_interrupt():
            path = pipe.write(
                args.output,
                args.frames,
                args.chunk_size,
                fps=args.fps,
                keep_partial=True,
                progress=not args.no_progress,
                num_videos=args.num_samples,
                class_labels=y,
                actions=actions,
                sampler=args.sampler,
                steps=args.steps,
                eta=args.eta,
                cfg_scale=args.cfg_scale,
                action_cfg_scale=args.action_cfg_scale,
                seed=args.seed,
            )
    except LongVideoInterrupted as stop:
        if stop.partial is None:
            print(
                "interrupted before any frame could be kept: nothing was written", file=sys.stderr
            )
        else:
            print(
                f"interrupted: the {stop.frames} frames generated so far (of {args.frames}) "
                f"are in '{stop.partial}', a partial video; '{args.output}' was not written",
                file=sys.stderr,
            )
        return exit_status(stop.interrupt)
    except (SamplingError, ValueError) as exc:
        parser.error(str(exc))
    loaded = pipe.loaded
    print(
        f"{args.frames} frames x {args.num_samples} from {loaded.folder} (step {loaded.step}) "
        f"in {time.time() - start:.1f}s, chunks of {args.chunk_size}"
    )
    print(f"video: {path}")
    return 0


def clean_stale_temp_files(*outputs) -> None:
    """Delete the temporary files that killed earlier runs left beside ``outputs``, saying so."""
    for output in outputs:
        removed = remove_stale_temp_files(output)
        if removed:
            print(
                f"removed {len(removed)} temporary file(s) that an earlier, killed run left "
                f"beside '{output}'",
                file=sys.stderr,
            )


def frame_actions(args, pipe: MattenPipeline):
    """``frame -> actions (num_samples,)`` for an action-conditioned model (None otherwise):
    the ``--actions`` schedule, or the camera moves of the run's training clips, cycled."""
    model = pipe.model
    num_actions = model.num_actions
    if args.actions is not None and not num_actions:
        raise SamplingError("--actions needs a model trained with discrete actions")
    if not model.takes_actions:
        return None
    n = args.num_samples
    if args.actions is not None:
        schedule = parse_action_schedule(args.actions, num_actions, pipe.loaded.action_names)
        return lambda frame: torch.full((n,), schedule[frame % len(schedule)], dtype=torch.long)
    clips = pipe.loaded.training_actions(n)
    return lambda frame: clips[:, frame % clips.shape[1]]
