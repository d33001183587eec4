"""`matten play`: steer a long-video model live in the browser (see :mod:`matten.play`)."""

from __future__ import annotations

import sys

import uvicorn

from ..checkpoint import CheckpointError
from ..devices import DeviceError
from ..pipelines import SamplingError
from ..play import PlayError, create_app, load_playable

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "play",
        help="play a long-video model live in the browser",
        description="Serve a page that streams frames from a long-video (Matten-Causal) model as "
        "they are generated, steered with the arrow keys or the action buttons. "
        "Each browser tab gets its own stream, up to --max-streams at once; "
        "snapshots and videos are written under --output.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (its latest checkpoint) or a checkpoint folder",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--output", default="play", help="folder for snapshots and saved videos (default ./play)"
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=2,
        help="live streams at once; more tabs are told the server is busy",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="DDIM steps per frame to start with (default 4; the page changes it)",
    )
    parser.add_argument(
        "--action-cfg-scale",
        type=float,
        default=None,
        help="guidance on the held action (a model trained with model.causal."
        "action_dropout_prob > 0; 1 = none; default: the run's sample.action_cfg_scale)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if any)")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    try:
        pipe = load_playable(args.checkpoint, device=args.device)
        app = create_app(
            pipe,
            args.output,
            max_streams=args.max_streams,
            seed=args.seed,
            steps=args.steps,
            action_cfg_scale=args.action_cfg_scale,
        )
    except (PlayError, SamplingError, CheckpointError, DeviceError, FileNotFoundError) as exc:
        print(f"matten play: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOCAL_HOSTS:
        print(
            f"matten play: warning: listening on {args.host}: the server has no "
            "authentication, anyone who can reach this address can use it",
            file=sys.stderr,
        )
    print(f"matten play: open http://{args.host}:{args.port}/", file=sys.stderr)
    # Messages over 1 MiB close the socket; smaller oversized ones get an error (the app's limit).
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=1 << 20, log_level="warning")
    return 0
