"""Does steering steer? Holding an action in a live stream should move the generated view the
way the same action moves the real camera.

A :class:`matten.pipelines.StreamingSession` (what ``matten play`` runs per tab) starts from
nothing, as a tab does (or, with ``--context N``, continues N real frames of a training clip
that stays lit), makes one frame with the first action ("stay"), then holds each action for
``--frames`` frames in turn (right, left, down, up). The shift between consecutive frames is
measured by phase correlation (the peak of the normalised cross-power spectrum, Hann-windowed,
to the pixel), and compared with the same measurement on real clips of the training set, per
action: the mean shift (dx, dy) and the share of transitions whose shift points the way the real
camera's does. Transitions into or out of the dark (the panning map's blackouts) are left out of
the reference.

``--one-step N`` adds a second table that leaves the rollout out: from the same N real frames of
a lit clip, one frame is generated under each action in turn (a fresh stream per action, the same
seed), and the shift is measured from the last real frame to it. A model that steers here but
not in the rollout knows the actions but loses the view in its own frames.

    python bench/steering.py --checkpoint runs/long
    python bench/steering.py --checkpoint runs/long --one-step 8 --steps 25
    python bench/steering.py --checkpoint runs/long --figure docs/steering.png \
        --screenshot docs/play.png

``--figure`` writes the generated frames, a row per held action; ``--screenshot`` the page of
``matten play`` in headless Chromium (chromium, chromium-driver and selenium) while "right" is
held.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table  # noqa: E402

from matten.data import make_grid, upscale_frames  # noqa: E402
from matten.pipelines import LongVideoPipeline, StreamingSession  # noqa: E402

HELD = ("right", "left", "down", "up")


def phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The integer (dx, dy) by which the content of frame ``a`` moved to give frame ``b``
    (grey, float), by phase correlation; a content shift of +dx means it moved right."""
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa, fb = np.fft.fft2((a - a.mean()) * window), np.fft.fft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    surface = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-12)).real
    dy, dx = np.unravel_index(np.argmax(surface), surface.shape)
    h, w = surface.shape
    return int(dx - w if dx > w // 2 else dx), int(dy - h if dy > h // 2 else dy)


def grey(frame: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float (H, W)."""
    return frame.astype(np.float64).mean(-1)


def grey_of(video_frame: torch.Tensor) -> np.ndarray:
    """A dataset frame (3, H, W) in [-1, 1] -> float (H, W) on the scale of :func:`grey`."""
    return grey(((video_frame.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255))


def real_shifts(
    dataset, names: tuple[str, ...], held: tuple[str, ...], clips: int
) -> dict[str, list[tuple[int, int]]]:
    """Per action of ``held``, the shifts of the real transitions made with it (``names``: the
    dataset's action vocabulary)."""
    out: dict[str, list[tuple[int, int]]] = {n: [] for n in held}
    for i in range(min(clips, len(dataset))):
        item = dataset[i]
        video = item["video"]
        for t in range(1, video.shape[1]):
            name = names[int(item["actions"][t])]
            a, b = grey_of(video[:, t - 1]), grey_of(video[:, t])
            if name in out and a.std() > 0 and b.std() > 0:  # not into or out of the dark
                out[name].append(phase_shift(a, b))
    return out


def expected_direction(shifts: list[tuple[int, int]]) -> np.ndarray:
    """The direction (dx, dy) of the real content shift for one action: the sign on the axis
    it moves along, 0 on the other."""
    direction = np.zeros(2, dtype=int)
    if not shifts:
        return direction
    mean = np.mean(np.asarray(shifts, dtype=np.float64), axis=0)
    axis = int(np.argmax(np.abs(mean)))
    direction[axis] = int(np.sign(mean[axis]))
    return direction


def agreement(shifts: list[tuple[int, int]], direction: np.ndarray) -> float:
    """Share of transitions whose shift has the expected sign on the moving axis (nan without
    transitions or a direction)."""
    if not shifts or not direction.any():
        return float("nan")
    axis = int(np.argmax(np.abs(direction)))
    values = np.asarray(shifts)[:, axis]
    return float(np.mean(np.sign(values) == direction[axis]))


def mean_shift(shifts: np.ndarray) -> str:
    if not len(shifts):
        return "n/a"
    return f"({shifts[:, 0].mean():+.2f}, {shifts[:, 1].mean():+.2f})"


def steer(pipe, context, seed: int, steps: int, frames: int, held: tuple[str, ...], guidance):
    """Frames generated while each action of ``held`` is held for ``frames`` frames in turn,
    after one "stay" frame -> {action: uint8 (frames + 1, H, W, 3)}, the first being the frame
    before it began. ``context``: real frames (3, n, H, W) and their (n,) actions to continue,
    or None. ``guidance``: the sessions' action_cfg_scale (None: the run's)."""
    frames_of, actions = context if context is not None else (None, None)
    session = StreamingSession.start(
        pipe,
        seed=seed,
        steps=steps,
        context=frames_of,
        context_actions=actions,
        action_cfg_scale=guidance,
    )
    last, _ = session.step(action=None)
    out = {}
    for name in held:
        run = [last]
        for _ in range(frames):
            frame, meta = session.step(action=name)
            assert meta["action_name"] == name
            run.append(frame)
        out[name] = np.stack(run)
        last = run[-1]
    return out


def one_step(pipe, contexts, steps: int, held: tuple[str, ...], guidance):
    """From each real context ((3, n, H, W) frames, their (n,) actions), one frame per action
    of ``held`` (a fresh stream each, seeded by the context's index) -> {action: [shift from
    the last real frame]}."""
    out: dict[str, list[tuple[int, int]]] = {n: [] for n in held}
    for seed, (context, actions) in enumerate(contexts):
        last = grey_of(context[:, -1])
        for name in held:
            session = StreamingSession.start(
                pipe,
                seed=seed,
                steps=steps,
                context=context,
                context_actions=actions,
                action_cfg_scale=guidance,
            )
            frame, _ = session.step(action=name)
            out[name].append(phase_shift(last, grey(frame)))
    return out


def steering_rows(real, generated, held: tuple[str, ...]) -> tuple[list[list], list]:
    """Table rows (per held action: the real direction, mean shift and agreement, the same for
    the generated transitions) and (action, agreement) pairs."""
    rows, verdicts = [], []
    for name in held:
        direction = expected_direction(real[name])
        g = np.asarray(generated[name], dtype=np.float64).reshape(-1, 2)
        r = np.asarray(real[name], dtype=np.float64).reshape(-1, 2)
        share = agreement(generated[name], direction)
        rows.append(
            [
                name,
                f"({direction[0]:+d}, {direction[1]:+d})",
                mean_shift(r),
                f"{agreement(real[name], direction):.0%}",
                mean_shift(g),
                f"{share:.0%}",
                len(g),
            ]
        )
        verdicts.append((name, share))
    return rows, verdicts


TABLE_HEADER = [
    "held",
    "real direction",
    "real mean shift",
    "real agree",
    "generated mean shift",
    "generated agree",
    "transitions",
]


def screenshot(checkpoint: str, path: str, steps: int, hold_seconds: float, guidance) -> None:
    """The page of ``matten play`` in headless Chromium after holding "right"."""
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from matten.play import create_app

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise SystemExit("--screenshot needs chromium and chromedriver")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tempfile.mkdtemp()
    pipe = LongVideoPipeline.from_pretrained(checkpoint)
    app = create_app(pipe, out, steps=steps, action_cfg_scale=guidance)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        text = lambda id_: driver.find_element(By.ID, id_).text  # noqa: E731
        WebDriverWait(driver, 120).until(lambda _: text("status").startswith("live"))
        body = driver.find_element(By.TAG_NAME, "body")
        webdriver.ActionChains(driver).key_down(Keys.ARROW_RIGHT, body).perform()
        time.sleep(hold_seconds)
        driver.save_screenshot(path)
        webdriver.ActionChains(driver).key_up(Keys.ARROW_RIGHT, body).perform()
        print(f"wrote {path} (fps {text('fps')}, p50 {text('p50')} ms, frames {text('frames')})")
    finally:
        driver.quit()
        server.should_exit = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a trained --config long run")
    parser.add_argument("--frames", type=int, default=12, help="frames each action is held")
    parser.add_argument("--seeds", type=int, default=4, help="streams (each its own real start)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: play's)")
    parser.add_argument(
        "--context", type=int, default=0, help="real frames a stream continues (0: none)"
    )
    parser.add_argument(
        "--one-step",
        type=int,
        default=0,
        metavar="N",
        help="also one frame per action from N real frames of each of 16 lit clips (0: off)",
    )
    parser.add_argument(
        "--action-cfg",
        type=float,
        default=None,
        help="guidance on actions (a model trained with action dropout; default: the run's)",
    )
    parser.add_argument("--real-clips", type=int, default=64, help="real clips for the reference")
    parser.add_argument("--figure", help="PNG of the generated frames, a row per held action")
    parser.add_argument("--screenshot", help="PNG of matten play's page with right held")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = LongVideoPipeline.from_pretrained(args.checkpoint)
    names = tuple(pipe.loaded.action_names)
    for name in HELD:
        if name not in names:
            raise SystemExit(f"the model has no action {name!r} (its actions: {names})")
    from matten.config import config_from_dict
    from matten.data import dataset_from_config

    data = config_from_dict(pipe.loaded.run_config).data
    dataset = dataset_from_config(data)
    real = real_shifts(dataset, names, HELD, args.real_clips)
    dark = names.index("dark") if "dark" in names else -1
    steps = args.steps if args.steps is not None else 4  # matten play's default
    generated: dict[str, list[tuple[int, int]]] = {n: [] for n in HELD}
    strips = []
    lit_frames = max(args.context, args.one_step)
    lit = [  # training clips whose first frames (those a stream continues) are not dark
        i
        for i in range(len(dataset) if lit_frames else 0)
        if not (dataset[i]["actions"][:lit_frames] == dark).any()
    ]
    for seed in range(args.seeds):
        item = dataset[lit[seed]] if args.context else None
        context = (
            (item["video"][:, : args.context], item["actions"][: args.context]) if item else None
        )
        runs = steer(pipe, context, seed, steps, args.frames, HELD, args.action_cfg)
        for name, frames in runs.items():
            generated[name] += [
                phase_shift(grey(frames[t - 1]), grey(frames[t])) for t in range(1, len(frames))
            ]
        if seed == 0:
            strips = [runs[n][1:] for n in HELD]
    rows, verdicts = steering_rows(real, generated, HELD)
    print(
        f"{args.checkpoint}: {args.seeds} streams x {len(HELD)} actions x {args.frames} frames, "
        f"DDIM {steps}, action guidance {pipe.action_guidance_scale(args.action_cfg)}, "
        + (f"each from {args.context} real frames" if args.context else "each from nothing")
        + "; shifts by phase correlation"
    )
    print_table(TABLE_HEADER, rows)
    print("steering: " + ", ".join(f"{n} {s:.0%} the real way" for n, s in verdicts))
    if args.one_step:
        contexts = [
            (dataset[i]["video"][:, : args.one_step], dataset[i]["actions"][: args.one_step])
            for i in lit[:16]
        ]
        rows, verdicts = steering_rows(
            real, one_step(pipe, contexts, steps, HELD, args.action_cfg), HELD
        )
        print(
            f"\none frame per action from {args.one_step} real frames of {len(contexts)} lit "
            f"clips, DDIM {steps}; shift from the last real frame"
        )
        print_table(TABLE_HEADER, rows)
        print("one step: " + ", ".join(f"{n} {s:.0%} the real way" for n, s in verdicts))
    if args.figure:
        grid = make_grid(upscale_frames(np.stack(strips), 64))
        from PIL import Image

        Image.fromarray(grid).save(args.figure)
        print(f"wrote {args.figure}")
    if args.screenshot:
        screenshot(args.checkpoint, args.screenshot, steps, 6.0, args.action_cfg)


if __name__ == "__main__":
    main()
