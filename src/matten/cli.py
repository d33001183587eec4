"""The ``matten`` command. Each sub-command is a module in :mod:`matten.commands` with
``add_parser(subparsers)`` (which sets ``run``); ``main`` only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .interrupts import exit_status

COMMANDS = ["train", "sample", "eval", "flops", "play"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matten", description="Video generation with Mamba-Attention latent diffusion."
    )
    parser.add_argument("--version", action="version", version=f"matten {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"matten.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except KeyboardInterrupt as stop:  # Ctrl-C in a command without its own handling
        print(
            f"\nmatten {args.command}: interrupted (outputs are written whole or not at all: "
            "nothing half-written is left)",
            file=sys.stderr,
        )
        return exit_status(stop)


if __name__ == "__main__":
    sys.exit(main())
