"""Line plots as PNG (ROC, PRO curves) and the CSV files ``dvc plots`` reads. PIL only, written atomically."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hetmm.io import json_safe, write_png_atomic, write_text_atomic
from hetmm.report.overlays import font

# Matplotlib's tab10, the usual categorical palette for line plots.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip



def _nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], int]:
    """Round tick positions in [lo, hi] at a 1/2/5 x 10^k step: -> (ticks, decimals for labels)."""
    raw = (hi - lo) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def _limits(values: Iterable[np.ndarray], given: tuple[float, float] | None) -> tuple[float, float]:
    if given is not None:
        lo, hi = float(given[0]), float(given[1])
    else:
        finite = np.concatenate([v[np.isfinite(v)] for v in values])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def curve_png(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    xlim: tuple[float, float] | None = None,
    *,
    ylim: tuple[float, float] | None = None,
    diagonal: bool = False,
    size: tuple[int, int] = (640, 480),
) -> Path:
    """Line plot of ``{name: (x [n], y [n])}`` as a PNG of ``size`` (width, height), written atomically.

    Axes with round ticks and labels, light grid, a legend in the emptiest corner, and, with
    ``diagonal=True``, the chance line y = x (for ROC curves). Curves are clipped to the limits.
    """
    if not curves:
        raise ValueError("curve_png needs at least one curve")
    data = {}
    for name, (x, y) in curves.items():
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if xa.shape != ya.shape or xa.ndim != 1:
            raise ValueError(f"curve {name!r}: x and y must be 1-D of equal length, got {xa.shape}, {ya.shape}")
        data[name] = (xa, ya)
    x0, x1 = _limits((x for x, _ in data.values()), xlim)
    y0, y1 = _limits((y for _, y in data.values()), ylim)

    small, medium = font(12), font(14)
    xticks, xdec = _nice_ticks(x0, x1)
    yticks, ydec = _nice_ticks(y0, y1)
    xlabels = [f"{t:.{xdec}f}" for t in xticks]
    ylabels = [f"{t:.{ydec}f}" for t in yticks]
    width, height = size
    # margins grow with the tick labels so that long labels are never cut off
    left = 30 + max(38, max((int(small.getlength(t)) for t in ylabels), default=0))
    right = max(16, int(small.getlength(xlabels[-1]) / 2) + 4) if xlabels else 16
    top, bottom = 36, 52
    pw, ph = width - left - right, height - top - bottom
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def px(x: np.ndarray | float, y: np.ndarray | float, scale: int = 1) -> tuple[Any, Any]:
        """Data -> pixel coordinates inside the plot area (origin top-left), times ``scale``."""
        return (np.asarray(x) - x0) / (x1 - x0) * pw * scale, (1 - (np.asarray(y) - y0) / (y1 - y0)) * ph * scale

    for t, text in zip(xticks, xlabels):
        u = left + float(px(t, y0)[0])
        draw.line([(u, top), (u, top + ph)], fill=(232, 232, 232))
        draw.line([(u, top + ph), (u, top + ph + 4)], fill=(0, 0, 0))
        draw.text((u, top + ph + 6), text, fill=(0, 0, 0), font=small, anchor="mt")
    for t, text in zip(yticks, ylabels):
        v = top + float(px(x0, t)[1])
        draw.line([(left, v), (left + pw, v)], fill=(232, 232, 232))
        draw.line([(left - 4, v), (left, v)], fill=(0, 0, 0))
        draw.text((left - 6, v), text, fill=(0, 0, 0), font=small, anchor="rm")

    # curves on a 2x RGBA layer of the plot area: downsampling anti-aliases, cropping clips
    scale = 2
    layer = Image.new("RGBA", (pw * scale, ph * scale), (255, 255, 255, 0))
    ldraw = ImageDraw.Draw(layer)
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        if hi > lo:
            (ua, ub), (va, vb) = px(np.array([lo, hi]), np.array([lo, hi]), scale)
            n_dash = 40
            for k in range(0, n_dash, 2):
                f0, f1 = k / n_dash, (k + 1) / n_dash
                ldraw.line([(ua + (ub - ua) * f0, va + (vb - va) * f0), (ua + (ub - ua) * f1, va + (vb - va) * f1)],
                           fill=(150, 150, 150, 255), width=2 * scale)  # fmt: skip
    for i, (x, y) in enumerate(data.values()):
        ok = np.isfinite(x) & np.isfinite(y)
        u, v = px(x[ok], y[ok], scale)
        colour = _PALETTE[i % len(_PALETTE)] + (255,)
        if u.size == 1:
            ldraw.ellipse([u[0] - 3 * scale, v[0] - 3 * scale, u[0] + 3 * scale, v[0] + 3 * scale], fill=colour)
        elif u.size:
            ldraw.line(list(zip(u.tolist(), v.tolist())), fill=colour, width=2 * scale, joint="curve")
    layer = layer.resize((pw, ph), Image.Resampling.LANCZOS)
    img.paste(layer, (left, top), layer)
    draw.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))

    draw.text((left + pw / 2, 10), title, fill=(0, 0, 0), font=font(15), anchor="mt")
    draw.text((left + pw / 2, height - 8), xlabel, fill=(0, 0, 0), font=medium, anchor="mb")
    label_box = medium.getbbox(ylabel)
    ylab = Image.new("RGB", (label_box[2] + 4, label_box[3] + 4), (255, 255, 255))
    ImageDraw.Draw(ylab).text((2, 2), ylabel, fill=(0, 0, 0), font=medium)
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (6, top + (ph - ylab.height) // 2))

    _draw_legend(draw, data, (x0, x1, y0, y1), (left, top, pw, ph), small)
    path = Path(path)
    write_png_atomic(path, img)
    return path


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    limits: tuple[float, float, float, float],
    area: tuple[int, int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """Legend box in the plot corner holding the fewest curve points."""
    names = list(data)
    x0, x1, y0, y1 = limits
    left, top, pw, ph = area
    row = 16
    text_w = max(int(draw.textlength(n, font=font)) for n in names)
    bw, bh = text_w + 34, row * len(names) + 8
    fx, fy = min(0.45, bw / pw), min(0.45, bh / ph)  # corner box size as a fraction of the plot

    def crowding(right: bool, upper: bool) -> int:
        count = 0
        for x, y in data.values():
            u = (x - x0) / (x1 - x0)
            v = (y - y0) / (y1 - y0)
            in_u = u >= 1 - fx if right else u <= fx
            in_v = v >= 1 - fy if upper else v <= fy
            count += int(np.count_nonzero(in_u & in_v & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)))
        return count

    corners = [(True, False), (False, True), (True, True), (False, False)]  # lower right first
    right, upper = min(corners, key=lambda c: crowding(*c))
    bx = left + pw - bw - 6 if right else left + 6
    by = top + 6 if upper else top + ph - bh - 6
    draw.rectangle([bx, by, bx + bw, by + bh], fill=(255, 255, 255), outline=(160, 160, 160))
    for i, name in enumerate(names):
        cy = by + 4 + i * row + row // 2
        draw.line([(bx + 6, cy), (bx + 24, cy)], fill=_PALETTE[i % len(_PALETTE)], width=3)
        draw.text((bx + 28, cy), name, fill=(0, 0, 0), font=font, anchor="lm")


def write_plot_csv(path: str | Path, columns: Mapping[str, Sequence[Any]]) -> Path:
    """Write equal-length columns as a CSV with a header row (atomic), e.g. for ``dvc plots``."""
    cols = {name: json_safe(list(values)) for name, values in columns.items()}
    lengths = {name: len(v) for name, v in cols.items()}
    if not cols or len(set(lengths.values())) != 1:
        raise ValueError(f"write_plot_csv needs one or more columns of equal length, got {lengths}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    writer.writerows(zip(*cols.values()))
    path = Path(path)
    write_text_atomic(path, buf.getvalue())
    return path


def tuning_png(path: str | Path, candidates: Sequence[Mapping[str, Any]], title: str, note: str = "") -> Path:
    """The tuner's search: each candidate's objective in evaluation order, the best so far and the starting point.

    ``candidates``: records with ``objective`` (None for a candidate excluded as too slow). Without any scored
    candidate (nothing was tuned) the picture says so with ``note``.
    """
    values = np.array([np.nan if c.get("objective") is None else c["objective"] for c in candidates], dtype=float)
    if not np.isfinite(values).any():
        img = Image.new("RGB", (640, 160), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        draw.text((320, 40), title, fill=(0, 0, 0), font=font(15), anchor="mt")
        draw.text((320, 90), note or "no candidate was scored", fill=(80, 80, 80), font=font(13), anchor="mt")
        write_png_atomic(Path(path), img)
        return Path(path)
    order = np.arange(1, len(values) + 1, dtype=float)
    best = np.fmax.accumulate(np.where(np.isfinite(values), values, -np.inf))
    start = values[0] if np.isfinite(values[0]) else np.nanmin(values)
    curves = {"candidate": (order, values), "best so far": (order, np.where(np.isfinite(best), best, np.nan)),
              "before tuning": (np.array([1.0, order[-1]]), np.array([start, start]))}
    return curve_png(path, curves, "candidate (evaluation order)", "objective (mean of 3 metrics, %)", title)


def report_curves(reports: Path, name: str, roc: Mapping[str, Sequence[float]], pro: Mapping[str, Sequence[float]],
                  metrics: Mapping[str, Any], scores: np.ndarray, labels: np.ndarray, threshold: float) -> None:
    """``plots/roc.csv``, ``plots/pro.csv`` (for ``dvc plots``) and ``roc.png`` / ``pro.png`` of a report: the area in
    the legend, the chance line on the ROC and the deployed threshold's operating point on it. ``scores [N]``,
    ``labels [N]`` bool (True = defective)."""
    write_plot_csv(reports / "plots" / "roc.csv", {"fpr": roc["fpr"], "tpr": roc["tpr"]})
    curves = {f"image ROC (AUROC {_figure(metrics.get('image_auroc'))})": (roc["fpr"], roc["tpr"])}
    if labels.any() and not labels.all():
        fpr, tpr = float(np.mean(scores[~labels] >= threshold)), float(np.mean(scores[labels] >= threshold))
        curves[f"deployed threshold {threshold:.3g} (FPR {fpr:.2f}, TPR {tpr:.2f})"] = ([fpr], [tpr])
    curve_png(reports / "roc.png", curves, "false positive rate", "true positive rate", f"{name}: image ROC",
              (-0.02, 1.02), ylim=(-0.02, 1.02), diagonal=True)  # a perfect curve runs along the frame
    write_plot_csv(reports / "plots" / "pro.csv", {"fpr": pro["fpr"], "pro": pro["pro"]})
    curve_png(reports / "pro.png", {f"PRO (AU-PRO {_figure(metrics.get('aupro'))})": (pro["fpr"], pro["pro"])},
              "false positive rate", "per-region overlap", f"{name}: PRO (FPR <= 0.3)")


def score_histogram_png(path: str | Path, groups: Mapping[str, np.ndarray], threshold: float, title: str,
                        bins: int = 30) -> Path:
    """The distribution of image scores per group (``{name: scores [n]}``; e.g. good, defect, unlabelled) as
    step outlines on shared bins, with the deployed ``threshold`` as a vertical line: how far each kind of image
    lies from the decision, labelled or not."""
    finite = [np.asarray(v, dtype=np.float64)[np.isfinite(v)] for v in groups.values()]
    every = np.concatenate(finite + [np.array([threshold], dtype=np.float64)])
    lo, hi = float(every.min()), float(every.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    curves, top = {}, 1.0
    for (name, _), values in zip(groups.items(), finite):
        counts = np.histogram(values, edges)[0].astype(np.float64)
        top = max(top, float(counts.max(initial=0)))
        # a step outline: each bin's count held across the bin, down to zero at both ends
        x = np.concatenate([[edges[0]], np.repeat(edges, 2)[1:-1], [edges[-1]]])
        y = np.concatenate([[0.0], np.repeat(counts, 2), [0.0]])
        curves[f"{name} ({values.size})"] = (x, y)
    curves[f"threshold {threshold:.3g}"] = ([threshold, threshold], [0.0, top * 1.05])
    return curve_png(path, curves, "image score", "images", title, ylim=(0.0, top * 1.08))


def _figure(value: Any) -> str:
    return "undefined" if value is None else f"{value:.2f}"
