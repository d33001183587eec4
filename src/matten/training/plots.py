"""The loss curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..data import atomic_write_path

__all__ = ["plot_loss_curve", "moving_average"]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (the first ones average what exists)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-12:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of 1-2-5 values (or decades only when there are many) in [lo, hi]."""
    for mantissas in ((1, 2, 5), (1,)):
        ticks = [
            math.log10(m) + k
            for k in range(math.floor(lo) - 1, math.ceil(hi) + 1)
            for m in mantissas
        ]
        ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
        if len(ticks) <= 8:
            break
    return ticks if len(ticks) >= 2 else _nice_ticks(lo, hi)


def plot_loss_curve(
    path, steps, losses, title: str = "training loss", size=(800, 450), log_scale: bool = True
) -> Path:
    """Plot per-step losses (faint) and their moving average (bold) to a PNG, atomically."""
    from PIL import Image, ImageDraw

    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(losses) & (losses > 0 if log_scale else True)
    steps, losses = steps[keep], losses[keep]
    w, h = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    if len(losses) == 0:
        draw.text((w // 2 - 40, h // 2), "no data yet", fill="gray")
    else:
        f = np.log10 if log_scale else (lambda v: v)
        ys = f(losses)
        smooth = f(moving_average(losses, max(1, len(losses) // 20)))
        x0, x1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
        y0, y1 = float(ys.min()), float(ys.max())
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def px(s, v):
            return (
                left + (s - x0) / (x1 - x0) * (w - left - right),
                top + (y1 - v) / (y1 - y0) * (h - top - bottom),
            )

        draw.rectangle([left, top, w - right, h - bottom], outline="black")
        for tick in _log_ticks(y0, y1) if log_scale else _nice_ticks(y0, y1):
            _, y = px(x0, tick)
            draw.line([left, y, w - right, y], fill=(230, 230, 230))
            label = f"{10**tick:.3g}" if log_scale else f"{tick:.3g}"
            draw.text((5, y - 6), label, fill="black")
        for tick in _nice_ticks(x0, x1):
            x, _ = px(tick, y0)
            draw.line([x, h - bottom, x, h - bottom + 4], fill="black")
            draw.text((x - 12, h - bottom + 8), f"{int(tick)}", fill="black")
        draw.text((w // 2 - 15, h - 18), "step", fill="black")
        if len(ys) > 1:
            draw.line(
                [px(s, v) for s, v in zip(steps, ys, strict=False)], fill=(170, 190, 230), width=1
            )
            draw.line(
                [px(s, v) for s, v in zip(steps, smooth, strict=False)], fill=(20, 60, 160), width=2
            )
        else:
            x, y = px(steps[0], ys[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(20, 60, 160))
    path = Path(path)
    with atomic_write_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
