"""Parsing the sampling options of the command line: action schedules and class switches."""

from __future__ import annotations

import torch

from ..pipelines import SamplingError, resolve_labels

__all__ = ["parse_action_schedule", "parse_class_switches"]


def parse_action_schedule(spec: str, num_actions: int, names=()) -> list[int]:
    """``"right*8,stay,left*8"`` -> one action per frame: comma-separated actions (an index or
    a name), each optionally repeated ``*COUNT`` times. The list is cycled over the video."""
    lookup = {str(n).lower(): i for i, n in enumerate(names)}
    known = f" or one of {list(names)}" if names else ""
    schedule = []
    for item in str(spec).split(","):
        action, _, count = item.strip().partition("*")
        action = action.strip().lower()
        try:
            value = lookup[action] if action in lookup else int(action)
            repeat = int(count) if count.strip() else 1
        except ValueError:
            raise SamplingError(
                f"--actions item {item.strip()!r} must be ACTION or ACTION*COUNT "
                f"with ACTION an index in [0, {num_actions - 1}]{known}"
            ) from None
        if not 0 <= value < num_actions or repeat < 1:
            raise SamplingError(
                f"--actions item {item.strip()!r}: the action must be in "
                f"[0, {num_actions - 1}] and the count >= 1"
            )
        schedule.extend([value] * repeat)
    return schedule


def parse_class_switches(
    items, num_samples: int, num_classes: int, class_names=()
) -> list[tuple[int, torch.Tensor]]:
    """``["100:3", "200:dog"]`` -> [(frame, labels (num_samples,))], sorted by frame: from that
    frame on, every sample is generated with that class."""
    switches = []
    for item in items or []:
        frame, sep, label = str(item).partition(":")
        try:
            frame = int(frame)
        except ValueError:
            frame = -1
        if not sep or frame < 0:
            raise SamplingError(f"--class-at {item!r} must be FRAME:CLASS with FRAME >= 0")
        switches.append(
            (
                frame,
                resolve_labels(label, num_samples, num_classes, class_names, option="--class-at"),
            )
        )
    return sorted(switches, key=lambda s: s[0])
