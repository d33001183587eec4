"""`matten train`: train a model from a config (packaged name or YAML path) with overrides."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    latest_checkpoint,
    resolve_checkpoint,
)
from ..config import ConfigError, apply_overrides, config_differences, load_config, packaged_configs
from ..training import SetupError, train


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train a video diffusion model",
        description="Train a Matten (or Latte baseline) video diffusion model. Several GPUs: "
        "`accelerate launch -m matten.cli train ...` or "
        "`torchrun --nproc_per_node N -m matten.cli train ...`.",
        epilog="examples:\n"
        "  matten train --config demo --output runs/demo\n"
        "  matten train --config ucf101 --output runs/ucf data.root=/data/UCF-101 "
        "autoencoder.path=/models/sd-vae-ft-ema\n"
        "  matten train --output runs/demo --resume            # continue a run\n"
        "  matten train --config demo --output runs/d --set train.batch_size=4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"a packaged config ({', '.join(packaged_configs())}) or a YAML "
        "file; when resuming, defaults to the checkpoint's config",
    )
    parser.add_argument(
        "--output", "-o", default=None, help="run folder (checkpoints, samples, loss curve)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="train.batch_size (global, split over processes)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue from the output's latest checkpoint ('auto', the default "
        "when no PATH is given) or from PATH",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set train.lr=2e-4",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="more overrides, e.g. train.batch_size=4 model.depth=2",
    )
    parser.set_defaults(run=lambda args: run(args, parser))
    return parser


def build_config(args):
    """The run config from --config, the checkpoint (when resuming) and the overrides."""
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: the bare --resume was followed by an override
        args.overrides = [args.resume] + list(args.overrides)
        args.resume = "auto"
    overrides = list(args.set_overrides) + list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.config is not None:
        return load_config(args.config, overrides)
    if args.resume is not None:
        source = args.resume
        if source == "auto":
            if args.output is None:
                raise ConfigError("--resume without a PATH needs --output (the run to continue)")
            source = latest_checkpoint(args.output)
            if source is None:
                raise FileNotFoundError(
                    f"nothing to resume in '{args.output}' and no --config given to start a new run"
                )
        return apply_overrides(resume_base_config(source), overrides).validate()
    raise ConfigError("--config is required to start a run (e.g. --config demo)")


def resume_base_config(checkpoint):
    """The config a resumed run starts from: the run folder's ``config.yaml`` when the user has
    edited it (the edits take effect; the loop refuses those that change what the weights
    mean), else the config stored in the checkpoint."""
    folder = resolve_checkpoint(checkpoint)
    saved = config_from_checkpoint(folder)
    edited_path = folder.parent.parent / "config.yaml"
    if not edited_path.is_file():
        return saved
    try:
        edited = load_config(str(edited_path))
    except (ConfigError, OSError) as exc:
        raise ConfigError(
            f"the run's config '{edited_path}' cannot be used: {exc} (fix it, or "
            "delete it to resume with the checkpoint's own config)"
        ) from None
    edits = {k: v for k, v in config_differences(saved, edited).items() if k != "train.output"}
    if edits:
        logging.getLogger(__name__).warning(
            "using the edited %s: %s",
            edited_path,
            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in edits.items()),
        )
        return edited
    return saved


def run(args, parser) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output
    try:
        cfg = build_config(args)
        output = args.output or cfg.train.output
        if output is None:
            raise ConfigError("--output is required (the run folder)")
        result = train(cfg, output=output, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, SetupError, CheckpointError, FileNotFoundError) as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"\nstopped at once; {_last_checkpoint_words(output)}", file=sys.stderr)
        return 130
    resume = f"matten train --output {result.output} --resume"
    if result.stopped_by is not None:
        print(
            f"stopped by {result.stopped_by} at step {result.step}: checkpoint "
            f"{result.checkpoint}; continue with: {resume}"
        )
        return 143 if result.stopped_by == "SIGTERM" else 130  # 128 + the signal's number
    if result.nothing_to_do:
        print(
            f"nothing left to train: {result.output} is at step {result.step} "
            f"(train.max_steps); add --max-steps N to train longer"
        )
        return 0
    if result.checkpoint is not None:
        print(f"step {result.step}: checkpoint {result.checkpoint}")
        print(f"loss curve: {result.output / 'loss.png'}")
        for path in result.samples[-2:]:
            print(f"samples: {path}")
    return 0


def _last_checkpoint_words(output) -> str:
    try:
        found = latest_checkpoint(output) if output else None
    except CheckpointError as exc:
        return str(exc)
    if found is None:
        return "no checkpoint was written"
    return f"the last checkpoint is {found}; continue with: matten train --output {output} --resume"
