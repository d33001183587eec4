"""Pictures of videos: grids (a row per video, a column per frame), videos tiled side by side,
small frames enlarged so they can be seen, and a batch of samples saved as a video plus a grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_path
from .transforms import video_to_uint8
from .video_write import as_uint8_frames, check_video_path, write_video


def make_grid(
    videos, padding: int = 2, pad_value: int = 0, max_frames: int | None = None
) -> np.ndarray:
    """Tile videos into one ``uint8 (H', W', 3)`` image: one row per video, one column per frame.

    ``videos`` is ``uint8 (B, T, H, W, 3)`` or a list of ``(T, H, W, 3)`` arrays of the same
    frame size (shorter videos leave their last cells blank).
    """
    if hasattr(videos, "detach"):
        videos = videos.detach().cpu().numpy()
    if isinstance(videos, np.ndarray):
        if videos.ndim == 4:
            videos = videos[None]
        if videos.ndim != 5:
            raise ValueError(f"videos must have shape (B, T, H, W, 3), got {videos.shape}")
        videos = list(videos)
    videos = [as_uint8_frames(v, what=f"video {i}") for i, v in enumerate(videos)]
    if not videos:
        raise ValueError("no videos to put in the grid")
    h, w = videos[0].shape[1:3]
    for i, v in enumerate(videos):
        if v.shape[1:3] != (h, w):
            raise ValueError(f"video {i} has frame size {v.shape[1:3]}, video 0 has {(h, w)}")
    cols = max(v.shape[0] for v in videos)
    if max_frames is not None:
        cols = min(cols, int(max_frames))
    p = int(padding)
    grid = np.full((p + len(videos) * (h + p), p + cols * (w + p), 3), pad_value, dtype=np.uint8)
    for r, v in enumerate(videos):
        for c in range(min(cols, v.shape[0])):
            y, x = p + r * (h + p), p + c * (w + p)
            grid[y : y + h, x : x + w] = v[c]
    return grid


def save_grid_image(
    path, videos, padding: int = 2, pad_value: int = 0, max_frames: int | None = None
) -> Path:
    """Save videos as a PNG grid (rows = videos, columns = frames), atomically."""
    from PIL import Image

    path = Path(path)
    grid = make_grid(videos, padding=padding, pad_value=pad_value, max_frames=max_frames)
    fmt = "PNG" if path.suffix.lower() in ("", ".png") else None
    with atomic_write_path(path) as tmp:
        Image.fromarray(grid).save(
            tmp, format=fmt or Image.registered_extensions().get(path.suffix.lower(), "PNG")
        )
    return path


def tile_videos(videos: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, T, H, W, 3) -> (T, H', W', 3): the N videos side by side in a near-square grid."""
    n, t, h, w, c = videos.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros(
        (t, padding + rows * (h + padding), padding + cols * (w + padding), c), dtype=np.uint8
    )
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        out[:, y : y + h, x : x + w] = videos[i]
    return out


def upscale_frames(frames: np.ndarray, min_size: int) -> np.ndarray:
    """Nearest-neighbour upscale of small frames (..., H, W, 3) so they can be seen."""
    h, w = frames.shape[-3:-1]
    k = max(1, math.ceil(min_size / max(h, w)))
    if k > 1:
        frames = frames.repeat(k, axis=-3).repeat(k, axis=-2)
    return frames


def grid_path_for(output) -> Path:
    """The grid image of the video ``output``, named after its whole name: ``demo.gif`` ->
    ``demo.gif.png``, so ``demo.mp4`` written beside it gets its own ``demo.mp4.png``."""
    output = Path(output)
    return output.with_name(output.name + ".png")


def save_samples(
    videos: torch.Tensor, output, fps: int = 8, min_size: int = 128, grid_path=None
) -> tuple[Path, Path]:
    """Write ``videos`` (N, 3, F, H, W) in [-1, 1] as one video file (the samples tiled side by
    side; format from the suffix) and a PNG grid (a row per sample, a column per frame) at
    ``grid_path``: by default beside it with ``.png`` for its suffix (``step_0001000.png`` for
    the training loop's ``step_0001000.gif``; ``matten sample`` passes :func:`grid_path_for`).
    Small frames are enlarged to at least ``min_size`` pixels. Returns both paths."""
    output = Path(output)
    check_video_path(output, fps)
    frames = upscale_frames(video_to_uint8(videos), min_size // 2 if len(videos) > 1 else min_size)
    video_path = write_video(output, tile_videos(frames), fps=fps)
    grid = save_grid_image(output.with_suffix(".png") if grid_path is None else grid_path, frames)
    return video_path, grid
