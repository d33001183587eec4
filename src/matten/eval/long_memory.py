"""Scoring long-video memory on the panning-map task (:mod:`matten.data.long_memory`).

:func:`revisit_pairs` finds the frames where the camera came back to where it was,
:func:`retrieval_error` scores a (generated) video by how much those frames differ, binned by the
gap between them (ground-truth videos score exactly 0), and :func:`pixel_last_seen` says, for
every pixel of every frame, how long its map point had been out of sight.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["revisit_pairs", "pixel_last_seen", "retrieval_error"]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def revisit_pairs(
    camera, min_gap: int, max_overlap_shift: float = 0.5, min_excursion: float = 0.0, visible=None
) -> list[tuple[int, int, int]]:
    """Frame pairs ``(earlier, later, gap)`` where the camera is back (nearly) where it was.

    A pair counts when ``later - earlier >= min_gap`` and the two positions differ by at most
    ``max_overlap_shift`` pixels on each axis (0.5 keeps only exact revisits of integer paths).
    With ``min_excursion > 0`` the camera must also have been at least that far away (on some
    axis) in between, so that a pair tests memory rather than a camera that never moved.
    ``visible`` (F,) bool, optional: only frames that show something (not dark) pair up.
    """
    cam = _as_numpy(camera).astype(np.float64)
    if cam.ndim != 2 or cam.shape[1] != 2:
        raise ValueError(f"camera must be (num_frames, 2), got shape {tuple(cam.shape)}")
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1, got {min_gap}")
    pairs: list[tuple[int, int, int]] = []
    for i in range(len(cam) - min_gap):
        later = cam[i + min_gap :]
        dist = np.abs(later - cam[i]).max(axis=1)
        hits = np.flatnonzero(dist <= max_overlap_shift)
        if min_excursion > 0 and len(hits):
            # farthest the camera got from cam[i] up to each later frame
            away = np.maximum.accumulate(np.abs(cam[i + 1 :] - cam[i]).max(axis=1))
            hits = hits[away[hits + min_gap - 1] >= min_excursion]
        pairs.extend((i, i + min_gap + int(h), min_gap + int(h)) for h in hits)
    shown = _visibility(visible, len(cam))
    return [p for p in pairs if shown[p[0]] and shown[p[1]]]


def pixel_last_seen(camera, height: int, width: int, visible=None) -> np.ndarray:
    """For every pixel of every frame, the last earlier frame that showed the same map point.

    ``camera`` is ``(F, 2)`` integer top-left ``(x, y)`` positions of a ``height`` x ``width``
    window. Returns int64 ``(F, height, width)``: the index of that frame, or -1 where the
    point is in view for the first time. ``f - last`` is how long the point was out of sight, so
    pixels with ``f - last >= window`` show content that a model attending to its last
    ``window - 1`` frames can only know from a longer memory. ``visible`` (F,) bool, optional:
    frames that show nothing (dark) show no point.
    """
    cam = _as_numpy(camera)
    if cam.ndim != 2 or cam.shape[1] != 2 or np.any(cam != np.round(cam)) or np.any(cam < 0):
        raise ValueError(
            f"camera must be (num_frames, 2) non-negative integer positions, "
            f"got shape {tuple(cam.shape)}"
        )
    cam = cam.astype(np.int64)
    visible = _visibility(visible, len(cam))
    seen = np.full((cam[:, 1].max() + height, cam[:, 0].max() + width), -1, dtype=np.int64)
    last = np.empty((len(cam), height, width), dtype=np.int64)
    for f, (x, y) in enumerate(cam):
        view = seen[y : y + height, x : x + width]
        last[f] = view
        if visible[f]:
            view[...] = f
    return last


def _visibility(visible, frames: int) -> np.ndarray:
    if visible is None:
        return np.ones(frames, dtype=bool)
    visible = _as_numpy(visible).astype(bool)
    if visible.shape != (frames,):
        raise ValueError(
            f"visible must be ({frames},) for {frames} camera positions, got shape {visible.shape}"
        )
    return visible


def retrieval_error(
    video,
    camera,
    min_gap: int = 1,
    bins=8,
    max_shift: int = 0,
    min_excursion: float = 0.0,
    visible=None,
) -> dict:
    """Error between revisited views, against the gap between them: how well a video remembers.

    ``video`` is ``(3, F, H, W)`` (tensor or array, any value range; the dataset's is [-1, 1]);
    ``camera`` its ``(F, 2)`` top-left positions; ``visible`` (F,) its lit frames (for items with
    a blackout: ``actions != DARK``). For every revisit pair (see :func:`revisit_pairs`; camera
    offsets up to ``max_shift`` whole pixels are aligned and only
    the overlap compared) the mean absolute pixel difference is taken, and pairs are averaged
    within gap bins: ``bins`` equal-width bins over ``[min_gap, F)`` or a sequence of edges (a
    gap ``g`` falls in ``[edge_k, edge_k+1)``; gaps outside all bins count only in "mean").

    Returns ``{"gaps": bin centres, "errors": mean error per bin (nan when empty),
    "count": pairs per bin, "edges": bin edges, "mean": error over all pairs (nan if none)}``.
    Ground-truth items score 0 exactly. To test memory rather than short-range consistency, set
    ``min_gap`` (or the bin edges) past the frames the model sees at once.
    """
    v = _as_numpy(video).astype(np.float32)
    cam = _as_numpy(camera).astype(np.float64)
    if v.ndim != 4:
        raise ValueError(f"video must be (channels, frames, height, width), got shape {v.shape}")
    frames, h, w = v.shape[1:]
    if cam.shape != (frames, 2):
        raise ValueError(
            f"camera must be ({frames}, 2) for a {frames}-frame video, got shape {tuple(cam.shape)}"
        )
    if int(max_shift) != max_shift or not 0 <= max_shift < min(h, w):
        raise ValueError(f"max_shift must be an integer in [0, {min(h, w) - 1}], got {max_shift}")
    if min_gap < 1 or min_gap > frames - 1:
        raise ValueError(
            f"min_gap must be in [1, {frames - 1}] for a {frames}-frame video, got {min_gap}"
        )
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise ValueError(f"bins must be >= 1 or a sequence of edges, got {bins}")
        edges = np.linspace(min_gap, frames, int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError(
                f"bins must be an int or an increasing sequence of >= 2 edges, got {bins!r}"
            )

    pairs = np.array(
        revisit_pairs(cam, min_gap, max_shift + 1e-6, min_excursion, visible), dtype=np.int64
    ).reshape(-1, 3)
    offset = cam[pairs[:, 1]] - cam[pairs[:, 0]]
    whole = np.all(np.abs(offset - np.round(offset)) < 1e-6, axis=1)  # sub-pixel: no alignment
    pairs, offset = pairs[whole], np.round(offset[whole]).astype(np.int64)
    errors = np.empty(len(pairs))
    # frame j's pixel (r, c) shows what frame i shows at (r + dy, c + dx): compare the overlap,
    # all pairs with the same offset at once (in chunks, to bound memory)
    keys = offset[:, 0] * (2 * h + 1) + offset[:, 1]
    for key in np.unique(keys):
        sel = np.flatnonzero(keys == key)
        dx, dy = offset[sel[0]]
        r0, r1, c0, c1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
        for chunk in np.array_split(sel, max(1, len(sel) // 256)):
            later = v[:, pairs[chunk, 1], r0:r1, c0:c1]
            earlier = v[:, pairs[chunk, 0], r0 + dy : r1 + dy, c0 + dx : c1 + dx]
            errors[chunk] = np.abs(later - earlier).mean(axis=(0, 2, 3))

    which = np.searchsorted(edges, pairs[:, 2], side="right") - 1
    inside = (which >= 0) & (which < len(edges) - 1)
    count = np.bincount(which[inside], minlength=len(edges) - 1)
    total = np.bincount(which[inside], weights=errors[inside], minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return {
        "gaps": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "errors": binned.tolist(),
        "count": count.tolist(),
        "edges": edges.tolist(),
        "mean": float(errors.mean()) if len(errors) else float("nan"),
    }
