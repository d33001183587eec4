"""A synthetic long-memory task: a camera window pans over a fixed random world and comes back.

A model that generates long videos chunk by chunk must keep what it showed earlier: when the
camera returns to a place it left many frames ago, the view should be the same as before. This
is the "retrieval error against gap length" measure of world-model evaluations such as Memory
Maze, shrunk to something a small model can learn in minutes on random data:

* every item is one fixed world map (a smooth random colour texture plus a few bright, distinctly
  coloured landmarks), drawn with numpy from a generator seeded by ``(seed, index)``;
* a window of ``resolution`` pixels pans over it, one axis-aligned move of ``step`` pixels (or a
  pause) per frame, along a trajectory that leaves the start and returns to it;
* the window sits at integer pixel positions, so frames are exact crops of the map (no
  resampling blur) and a revisit reproduces an earlier frame exactly.

:mod:`matten.eval.long_memory` scores a (generated) video on it: where the camera came back,
how much the frames differ, binned by the gap between them (ground-truth videos score 0).

Actions are the camera's moves as discrete labels, ``actions[t]`` being the move from frame
``t - 1`` to ``t`` (``actions[0]`` is 0): 0 stay, 1 left, 2 right, 3 up, 4 down, and 5 dark
(:data:`DARK`): the camera stays but sees nothing. ``camera[t]`` is the window's top-left corner
as ``(x, y)`` in map pixels.

With ``blackout`` a clip may go dark for several frames and come back where it was: when the
light returns, the whole view is content last seen before the dark, a retrieval after a gap
that a model seeing only its recent frames cannot make.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import as_size

ACTION_NAMES = ("stay", "left", "right", "up", "down", "dark")
DARK = 5  # the action of a frame where the camera stays and sees nothing
# (dx, dy) of one move per action, in units of the dataset's ``step``.
ACTION_DELTAS = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], dtype=np.int64)
TRAJECTORIES = ("out_and_back", "loop", "mixed", "wander")


def _bilinear(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample ``grid`` (gh, gw, C) at fractional grid coordinates ``ys`` (H,) x ``xs`` (W,)."""
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, grid.shape[0] - 2)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, grid.shape[1] - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class PanningMapDataset(Dataset):
    """``num_videos`` clips of a window panning over a per-item random world map.

    Items are ``{"video": float (3, num_frames, H, W) in [-1, 1], "label": int64 0,
    "actions": int64 (num_frames,), "camera": float32 (num_frames, 2)}`` (just video and label
    with ``with_actions=False``). ``trajectory`` picks the path:

    * ``"out_and_back"``: a persistent random walk heading for the far side of the map for the
      first half, then the same path in reverse, so frame ``t`` is revisited at ``F - 1 - t``
      (gaps up to ``F - 1``);
    * ``"loop"``: laps of a rectangle whose perimeter takes between ``F / 2`` and ``F - 1``
      frames where the map is big enough (otherwise the largest rectangle that fits), so every
      position of the first lap is revisited one lap later;
    * ``"mixed"``: one of the two per item, at random;
    * ``"wander"``: a random agent's path (each move drawn anew among stay and the moves that
      keep the window on the map, held for 1-3 frames), so the next move cannot be told from
      the past ones: a model trained on it has to read its actions to move the view, which is
      what live play needs (the persistent paths above can be continued from the frames alone).
      Revisits happen, but at no guaranteed gap.

    The window can only get out of sight of where it started if the map is well over twice its
    size (the 48 x 48 default for 16 x 16 frames: 32 pixels of room per axis). ``step`` is the
    camera's move per frame in pixels (1-2 keeps motion learnable);
    ``landmark_size`` is the range of landmark radii as a fraction of the window's shorter side;
    ``num_landmarks`` defaults to about 8 per 48 x 48 pixels of map.

    ``blackout`` is the chance that a clip goes dark (black frames, action :data:`DARK`, the
    camera still) for a number of frames drawn from ``blackout_frames`` (inclusive), starting at
    ``blackout_start`` or at a random frame that leaves at least one lit frame on each side.
    """

    def __init__(
        self,
        num_videos: int,
        resolution=16,
        num_frames: int = 64,
        map_size=48,
        seed: int = 0,
        trajectory: str = "out_and_back",
        step: int = 1,
        num_landmarks: int | None = None,
        landmark_size: tuple[float, float] = (0.1, 0.2),
        with_actions: bool = True,
        blackout: float = 0.0,
        blackout_frames: tuple[int, int] = (4, 8),
        blackout_start: int | None = None,
    ):
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        if num_frames < 2:
            raise ValueError(
                f"num_frames must be >= 2 (a camera path needs at least two "
                f"frames), got {num_frames}"
            )
        if int(step) != step or step < 1:
            raise ValueError(f"step must be a positive integer number of pixels, got {step}")
        if trajectory not in TRAJECTORIES:
            raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {trajectory!r}")
        self.num_videos, self.num_frames = int(num_videos), int(num_frames)
        self.height, self.width = as_size(resolution)
        self.resolution = (self.height, self.width)
        self.map_height, self.map_width = as_size(map_size)
        self.map_size = (self.map_height, self.map_width)
        self.step = int(step)
        if self.map_height < self.height + self.step or self.map_width < self.width + self.step:
            raise ValueError(
                f"map_size {self.map_size} must exceed resolution {self.resolution} "
                f"by at least step={self.step} pixels in both height and width, so "
                f"the camera window has room to pan over the map"
            )
        self.landmark_size = (float(landmark_size[0]), float(landmark_size[1]))
        if not 0 < self.landmark_size[0] <= self.landmark_size[1] < 0.5:
            raise ValueError(
                f"landmark_size must be (low, high) with 0 < low <= high < 0.5, got {landmark_size}"
            )
        if num_landmarks is None:
            num_landmarks = max(1, round(8 * self.map_height * self.map_width / 48**2))
        if num_landmarks < 0:
            raise ValueError(f"num_landmarks must be >= 0, got {num_landmarks}")
        self.num_landmarks = int(num_landmarks)
        self.blackout = float(blackout)
        self.blackout_frames = (int(blackout_frames[0]), int(blackout_frames[1]))
        self.blackout_start = None if blackout_start is None else int(blackout_start)
        if not 0.0 <= self.blackout <= 1.0:
            raise ValueError(f"blackout must be a probability in [0, 1], got {blackout}")
        if self.blackout > 0:
            low, high = self.blackout_frames
            first = 1 if self.blackout_start is None else self.blackout_start
            if not 1 <= low <= high or first < 1 or first + high > self.num_frames - 1:
                raise ValueError(
                    f"blackout_frames {blackout_frames} starting at frame {first} "
                    f"must leave a lit frame before and after the dark in "
                    f"{self.num_frames} frames"
                )
        self.seed, self.trajectory, self.with_actions = int(seed), trajectory, bool(with_actions)
        # the camera's top-left corner ranges over [0, range] on each axis
        self.x_range = self.map_width - self.width
        self.y_range = self.map_height - self.height
        self.num_classes, self.class_names = 0, []
        self.skipped: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return self.num_videos

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        # separate streams, so the map and the path can be drawn independently of each other
        if not 0 <= index < self.num_videos:
            raise IndexError(f"index {index} out of range for {self.num_videos} panning videos")
        return np.random.default_rng([self.seed, index, stream])

    # -- the world ---------------------------------------------------------------------------

    def world(self, index: int) -> np.ndarray:
        """Item ``index``'s map: float32 ``(map_height, map_width, 3)`` in [0, 1]."""
        rng = self._rng(index, 0)
        mh, mw, s = self.map_height, self.map_width, min(self.height, self.width)
        ys, xs = np.arange(mh) + 0.5, np.arange(mw) + 0.5
        world = np.zeros((mh, mw, 3))
        # two octaves of smoothly interpolated random colour: coarse regions plus local detail,
        # so every window position looks different from its neighbours
        for cell, amplitude in ((max(s / 2, 2.0), 0.35), (max(s / 4, 1.5), 0.15)):
            gh, gw = math.ceil(mh / cell) + 2, math.ceil(mw / cell) + 2
            grid = rng.uniform(0.0, 1.0, size=(gh, gw, 3))
            oy, ox = rng.uniform(0, 1, size=2)
            world += amplitude * _bilinear(grid, ys / cell + oy, xs / cell + ox)
        world += rng.uniform(0.0, 0.15, size=3)  # per-map tint
        world = np.clip(world, 0.0, 0.7)  # the background stays darker than the landmarks

        n = self.num_landmarks
        hue0 = rng.random()
        for k in range(n):  # bright, evenly spread hues, so landmarks are told apart
            radius = rng.uniform(*self.landmark_size) * s
            colour = np.array(
                colorsys.hsv_to_rgb(
                    (hue0 + k / max(n, 1)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.0)
                )
            )
            cx, cy = rng.uniform(0, mw), rng.uniform(0, mh)
            disc = rng.random() < 0.5
            # draw only inside the landmark's bounding box
            y0, y1 = max(0, int(cy - radius - 1)), min(mh, int(cy + radius + 2))
            x0, x1 = max(0, int(cx - radius - 1)), min(mw, int(cx + radius + 2))
            dx, dy = xs[None, x0:x1] - cx, ys[y0:y1, None] - cy
            if disc:  # with a one-pixel antialiased edge
                alpha = np.clip(radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)
            else:  # square
                alpha = np.clip(radius + 0.5 - np.abs(dx), 0.0, 1.0) * np.clip(
                    radius + 0.5 - np.abs(dy), 0.0, 1.0
                )
            patch = world[y0:y1, x0:x1]
            world[y0:y1, x0:x1] = patch * (1.0 - alpha[..., None]) + alpha[..., None] * colour
        return world.astype(np.float32)

    # -- the camera path ---------------------------------------------------------------------

    def _walk(self, rng, start: np.ndarray, moves: int) -> np.ndarray:
        """A persistent random walk of ``moves`` actions that heads for far targets."""
        limit = np.array([self.x_range, self.y_range])
        pos, previous, actions = start.copy(), 0, []
        # head for the region opposite the start on each axis, then for the far corner, then
        # anywhere: the camera gets as far from where it began as the path length allows
        far = np.where(start > limit / 2, 0.0, 2 * limit / 3)
        targets = [
            np.round(rng.uniform(far, far + limit / 3)),
            np.where(start > limit / 2, 0, limit),
        ]
        target = targets.pop(0)
        while len(actions) < moves:
            if np.abs(target - pos).max() < self.step:
                target = targets.pop(0) if targets else np.round(rng.uniform(0, limit))
            weights = np.zeros(5)
            weights[0] = 0.3
            for a in range(1, 5):
                nxt = pos + ACTION_DELTAS[a] * self.step
                if np.any(nxt < 0) or np.any(nxt > limit):
                    continue
                toward = np.abs(target - nxt).sum() < np.abs(target - pos).sum()
                weights[a] = 4.0 if toward else 0.3
                if previous and np.all(ACTION_DELTAS[a] == -ACTION_DELTAS[previous]):
                    weights[a] = 0.1  # rarely turn straight back mid-way
            a = min(
                4,
                int(
                    np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right")
                ),
            )
            nxt = pos + ACTION_DELTAS[a] * self.step
            toward = a and np.abs(target - nxt).sum() < np.abs(target - pos).sum()
            # keep going the same way for a while; detours and pauses are short
            for _ in range(int(rng.integers(2, 7) if toward else rng.integers(1, 4))):
                nxt = pos + ACTION_DELTAS[a] * self.step
                if len(actions) >= moves or np.any(nxt < 0) or np.any(nxt > limit):
                    break
                pos = nxt
                actions.append(a)
            previous = a if a else previous
        return np.asarray(actions, dtype=np.int64)

    def _wander(self, rng, f: int) -> np.ndarray:
        """Positions ``(f, 2)`` of a random agent: each action uniform among stay and the moves
        that stay on the map, held for 1-3 frames (or until it would leave the map)."""
        limit = np.array([self.x_range, self.y_range])
        pos = np.array([rng.integers(0, r // self.step + 1) for r in limit]) * self.step
        path = [pos]
        while len(path) < f:
            allowed = [a for a in range(5) if self._on_map(pos + ACTION_DELTAS[a] * self.step)]
            a = allowed[int(rng.integers(len(allowed)))]
            for _ in range(int(rng.integers(1, 4))):
                nxt = pos + ACTION_DELTAS[a] * self.step
                if len(path) >= f or not self._on_map(nxt):
                    break
                pos = nxt
                path.append(pos)
        return np.stack(path)

    def _on_map(self, pos: np.ndarray) -> bool:
        return bool(np.all(pos >= 0) and pos[0] <= self.x_range and pos[1] <= self.y_range)

    def _loop(self, rng, f: int) -> np.ndarray:
        """Positions of one lap of a rectangle, ``(P, 2)``, sized so a lap takes ~f/2..f-1."""
        st = self.step
        sx, sy = self.x_range // st, self.y_range // st  # room in moves on each axis
        lap_max = 2 * (sx + sy)
        lo = min(max(4, 2 * math.ceil(math.ceil(f / 2) / 2)), lap_max)  # even, >= F/2
        hi = min(max(lo, f - 1), lap_max)
        lap = 2 * int(rng.integers(lo // 2, hi // 2 + 1))
        half = lap // 2  # a + b, the rectangle's width plus height in moves
        a = int(rng.integers(max(1, half - sy), min(sx, half - 1) + 1))
        b = half - a
        x0 = int(rng.integers(0, sx - a + 1)) * st
        y0 = int(rng.integers(0, sy - b + 1)) * st
        moves = [2] * a + [4] * b + [1] * a + [3] * b  # clockwise from the top-left corner
        deltas = ACTION_DELTAS[np.asarray(moves)] * st
        lap_pos = np.array([x0, y0]) + np.concatenate([[[0, 0]], np.cumsum(deltas, 0)[:-1]])
        if rng.random() < 0.5:
            lap_pos = lap_pos[::-1]  # counter-clockwise
        return np.roll(lap_pos, -int(rng.integers(lap)), axis=0)

    def camera_path(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index``'s camera: top-left ``(x, y)`` int64 ``(F, 2)`` and actions ``(F,)``."""
        rng = self._rng(index, 1)
        dark = self._blackout(index)
        f = self.num_frames - (len(dark) if dark is not None else 0)  # frames with a move
        kind = self.trajectory
        if kind == "mixed":
            kind = ("out_and_back", "loop")[int(rng.integers(2))]
        if kind == "wander":
            camera = self._wander(rng, f)
        elif kind == "loop":
            lap = self._loop(rng, f)
            camera = lap[np.arange(f) % len(lap)]
        else:
            half = (f + 1) // 2
            start = (
                np.array(
                    [
                        rng.integers(0, self.x_range // self.step + 1),
                        rng.integers(0, self.y_range // self.step + 1),
                    ]
                )
                * self.step
            )
            moves = self._walk(rng, start, half - 1)
            out = start + np.concatenate([[[0, 0]], np.cumsum(ACTION_DELTAS[moves] * self.step, 0)])
            camera = np.concatenate([out, out[: f - half][::-1]])  # come back the same way
        camera = camera.astype(np.int64)
        if dark is None:
            return camera, actions_from_camera(camera, self.step)
        # the camera stands still in the dark, then goes on along its path
        s = dark.start
        camera = np.concatenate(
            [camera[:s], np.repeat(camera[s - 1 : s], len(dark), 0), camera[s:]]
        )
        actions = actions_from_camera(camera, self.step)
        actions[dark] = DARK
        return camera, actions

    def _blackout(self, index: int) -> range | None:
        """The dark frames of item ``index``, or None (its own random stream, so the map and
        the path are the same with or without a blackout)."""
        if self.blackout == 0:
            return None
        rng = self._rng(index, 2)
        if rng.random() >= self.blackout:
            return None
        length = int(rng.integers(self.blackout_frames[0], self.blackout_frames[1] + 1))
        start = (
            self.blackout_start
            if self.blackout_start is not None
            else int(rng.integers(1, self.num_frames - length))
        )
        return range(start, start + length)

    # -- rendering ---------------------------------------------------------------------------

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw item ``index``: float32 frames ``(F, H, W, 3)`` in [0, 1], camera, actions."""
        world = self.world(index)
        camera, actions = self.camera_path(index)
        rows = camera[:, 1, None] + np.arange(self.height)  # (F, H)
        cols = camera[:, 0, None] + np.arange(self.width)  # (F, W)
        frames = world[rows[:, :, None], cols[:, None, :]]  # integer crops: (F, H, W, 3)
        frames[actions == DARK] = 0.0
        return frames, camera, actions

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.num_videos
        frames, camera, actions = self.render(index)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).mul(2.0).sub(1.0).clamp(-1.0, 1.0)
        item = {"video": video.contiguous(), "label": torch.tensor(0, dtype=torch.int64)}
        if self.with_actions:
            item["actions"] = torch.from_numpy(actions)
            item["camera"] = torch.from_numpy(camera.astype(np.float32))
        return item

    def __repr__(self):
        return (
            f"PanningMapDataset(num_videos={self.num_videos}, resolution={self.resolution}, "
            f"num_frames={self.num_frames}, map_size={self.map_size}, "
            f"trajectory={self.trajectory!r}, step={self.step}, seed={self.seed}, "
            f"blackout={self.blackout}, blackout_frames={self.blackout_frames})"
        )


def actions_from_camera(camera, step: int = 1) -> np.ndarray:
    """Discrete actions ``(F,)`` from camera positions: the move into each frame (0 for the first).

    Raises ``ValueError`` for a move that is not a single axis-aligned ``step`` or a pause.
    """
    camera = np.asarray(camera)
    delta = np.diff(camera, axis=0)
    actions = np.zeros(len(camera), dtype=np.int64)
    for a in range(1, 5):
        actions[1:][np.all(delta == ACTION_DELTAS[a] * step, axis=1)] = a
    bad = (actions[1:] == 0) & np.any(delta != 0, axis=1)
    if bad.any():
        t = int(np.flatnonzero(bad)[0]) + 1
        raise ValueError(
            f"camera move into frame {t} is {delta[t - 1].tolist()}, not one of "
            f"the discrete actions (a pause or one axis-aligned step of {step})"
        )
    return actions
