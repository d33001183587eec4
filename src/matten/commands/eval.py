"""`matten eval`: Fréchet distance of a checkpoint's samples against real clips."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import CheckpointError, config_from_checkpoint, resolve_checkpoint
from ..config import ConfigError, apply_overrides
from ..devices import DeviceError, resolve_device
from ..eval.evaluate import EvalSettings, evaluate
from ..pipelines import SamplingError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval",
        help="FVD (or the offline Fréchet distance) of a checkpoint",
        description="Sample clips from a checkpoint and compute their Fréchet distance to real "
        "clips: FVD with a local I3D file (--i3d), else the offline motion-net "
        "distance (not comparable with published FVD). Writes OUTPUT/report.json "
        "and OUTPUT/comparison.gif (real clips above, samples below). Sampled clips "
        "are kept in OUTPUT/generated with the settings that made them: running "
        "again with the same checkpoint and settings resumes.",
        epilog="examples:\n"
        "  matten eval --checkpoint runs/demo --num-clips 256\n"
        "  matten eval --checkpoint runs/ucf --data /data/UCF-101 --i3d i3d_torchscript.pt "
        "--output runs/ucf/fvd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (its latest checkpoint) or a checkpoint folder",
    )
    parser.add_argument(
        "--output",
        "-o",
        default=None,
        help="evaluation folder (default: <run>/eval/step_XXXXXXX-<key>, one per "
        "checkpoint and sampling settings); a folder holding samples of "
        "another checkpoint or other settings is refused unless --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete samples in OUTPUT/generated made with another checkpoint or "
        "other settings and sample again",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="folder of the real videos (default: the run's data.root; not "
        "needed for the synthetic set)",
    )
    parser.add_argument(
        "--num-clips",
        type=int,
        default=2048,
        help="real and generated clips (StyleGAN-V protocol: 2048)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="clips sampled per batch")
    parser.add_argument(
        "--i3d",
        default=None,
        help="local I3D weights: StyleGAN-V's i3d_torchscript.pt (FVD) or a pytorch-i3d state dict",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where real statistics and the motion net are cached "
        "(default: OUTPUT/cache; <run>/eval/cache without --output)",
    )
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument(
        "--motion-net-version",
        type=int,
        choices=(1, 2),
        default=None,
        help="without --i3d: the offline motion net's version (default 2, "
        "which registers partial quality; 1 for older reports)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)"
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="override the real data config",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=lambda args: run(args, parser))
    return parser


def run(args, parser) -> int:
    try:
        device = resolve_device(args.device)  # before any work: a missing GPU fails at once
        folder = resolve_checkpoint(args.checkpoint)
        cfg = config_from_checkpoint(folder)
        overrides = list(args.set_overrides)
        if any(not o.startswith("data.") for o in overrides):
            raise ConfigError("--set only takes data.KEY=VALUE here")
        if args.data is not None:
            overrides.append(f"data.root={args.data}")
        data = apply_overrides(cfg, overrides).data
        settings = EvalSettings(
            num_clips=args.num_clips,
            batch_size=args.batch_size,
            sampler=args.sampler,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            seed=args.seed,
            weights=args.weights,
        )
        output = Path(args.output) if args.output else None  # None: the default per key
        report = evaluate(
            folder,
            output,
            data=data,
            settings=settings,
            i3d=args.i3d,
            cache_dir=args.cache_dir,
            device=device,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            motion_net_version=args.motion_net_version,
        )
    except (
        ConfigError,
        CheckpointError,
        DeviceError,
        SamplingError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        parser.error(str(exc))
    print(json.dumps({k: report[k] for k in ("metric", "value", "num_clips", "step")}))
    kid = report.get("kid") or {}
    print(
        f"fd_inf {_shown(report.get('fd_inf'))}, kid {_shown(kid.get('mean'))} "
        f"+- {_shown(kid.get('std_err'))}, precision {_shown(report.get('precision'))}, "
        f"recall {_shown(report.get('recall'))}"
    )
    if report.get("warning"):
        print(f"warning: {report['warning']}")
    print(f"report: {Path(report['output']) / 'report.json'}")
    print(f"comparison: {report['comparison']}")
    return 0


def _shown(value) -> str:
    """A metric for the one-line summary: 4 significant digits, or n/a when not computed."""
    return "n/a" if value is None else f"{value:.4g}"
