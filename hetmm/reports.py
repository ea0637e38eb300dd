"""Report artefacts: heat-map overlays and panels, PIL line plots, DVC plot CSVs, model cards.

Everything is drawn with PIL (no plotting library), so PNGs exist on headless machines, and
every file is written atomically. Images are ``uint8 [H, W, 3]`` arrays or PIL images; anomaly
maps are ``[H, W]`` floats (numpy or torch); masks are ``[H, W]`` bool.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from hetmm import __version__
from hetmm.io import atomic_path, write_json_atomic, write_text_atomic
from hetmm.metrics import UndefinedMetricError, as_numpy, aupro, image_auroc, pixel_auroc

__all__ = [
    "GT_COLOUR",
    "PRED_COLOUR",
    "OverlayCase",
    "colormap",
    "overlay",
    "panel",
    "save_overlays",
    "curve_png",
    "write_plot_csv",
    "markdown_table",
    "per_group_metrics",
    "code_version",
    "model_card",
]

# White and magenta occur in neither colormap, so outlines stay readable on any heat value.
GT_COLOUR = (255, 255, 255)
PRED_COLOUR = (255, 0, 255)

# Matplotlib's tab10, the usual categorical palette for line plots.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip

# Inferno sampled at 0, 1/8, ..., 1; linear interpolation in between is close enough for display.
_INFERNO = np.array(
    [[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
     [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float64,
)  # fmt: skip


def _lut(name: str) -> np.ndarray:
    """256-entry colour table: -> uint8 [256, 3]."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "jet":  # the classic piecewise-linear jet: dark blue, cyan, yellow, dark red
        rgb = np.stack([np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)], axis=1) * 255
    elif name == "inferno":
        anchors = np.linspace(0.0, 1.0, len(_INFERNO))
        rgb = np.stack([np.interp(x, anchors, _INFERNO[:, c]) for c in range(3)], axis=1)
    else:
        raise ValueError(f"unknown colormap {name!r}; use 'jet' or 'inferno'")
    return np.round(rgb).astype(np.uint8)


def colormap(values: Any, name: str = "jet") -> np.ndarray:
    """Map values in [0, 1] (clipped) to colours: [...] float -> uint8 [..., 3]."""
    v = np.clip(np.nan_to_num(as_numpy(values).astype(np.float64)), 0.0, 1.0)
    return _lut(name)[np.round(v * 255).astype(np.intp)]


# ----------------------------------------------------------------------------- overlays


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image (any mode) or uint8 [H, W] / [H, W, 3] -> uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = as_numpy(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 [H, W, 3], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image arrays must be uint8 [H, W, 3], got shape {arr.shape}")
    return arr


def _fit_map(amap: Any, size: tuple[int, int]) -> np.ndarray:
    """[h, w] float -> float64 [H, W]; bilinear resize when the map is coarser than the image."""
    a = as_numpy(amap).astype(np.float32)
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be [H, W], got shape {a.shape}")
    h, w = size
    if a.shape != (h, w):
        a = np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))
    return a.astype(np.float64)


def _fit_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """[h, w] bool-like -> bool [H, W]; nearest-neighbour resize so regions keep hard edges."""
    m = as_numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {m.shape}")
    m = m > 0.5 if m.dtype != bool else m
    h, w = size
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST))
    return m


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Border pixels of a mask: bool [H, W] -> bool [H, W] (mask XOR eroded mask).

    Pixels outside the image count as background, so regions touching the border are closed.
    """
    if not mask.any():
        return mask
    eroded = binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=thickness, border_value=0)
    return mask ^ eroded


def overlay(
    image: Image.Image | np.ndarray,
    amap: Any,
    mask: Any = None,
    pred_mask: Any = None,
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Image.Image:
    """Heat map blended on the image, GT outlined in :data:`GT_COLOUR`, prediction in :data:`PRED_COLOUR`.

    image uint8 [H, W, 3] or PIL; amap [h, w] (resized to the image if needed); mask / pred_mask
    bool [h, w] or None. ``vmin`` / ``vmax`` fix the colour scale (default: this map's range);
    pass the same values for every image of a set so that colours are comparable. ``alpha`` is
    the heat map's weight in the blend, ``cmap`` 'jet' or 'inferno'.
    Returns an RGB PIL image [H, W].
    """
    rgb = _rgb(image)
    size = rgb.shape[:2]
    a = _fit_map(amap, size)
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    norm = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    out = (1.0 - alpha) * rgb + alpha * colormap(norm, cmap)
    out = np.round(out).astype(np.uint8)
    thickness = max(1, round(min(size) / 256))  # one pixel at 256 px, thicker on large images
    for m, colour in ((pred_mask, PRED_COLOUR), (mask, GT_COLOUR)):  # GT drawn last, on top
        if m is not None:
            out[_outline(_fit_mask(m, size), thickness)] = colour
    return Image.fromarray(out)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def panel(
    image: Image.Image | np.ndarray,
    amap: Any,
    mask: Any,
    score: float | None,
    title: str,
    *,
    pred_mask: Any = None,
    vmin: float | None = None,
    vmax: float | None = None,
    tile: int = 256,
) -> Image.Image:
    """Side by side: image | overlay | GT mask, under a title line with the score.

    Each tile is scaled to ``tile`` pixels high. ``mask`` may be None (a grey "no mask" tile).
    Returns an RGB PIL image [tile + header, 3 * tile width].
    """
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    tw = max(1, round(w * tile / h))
    tiles = [Image.fromarray(rgb), overlay(rgb, amap, mask, pred_mask, vmin=vmin, vmax=vmax)]
    if mask is None:
        tiles.append(Image.new("RGB", (w, h), (96, 96, 96)))
    else:
        tiles.append(Image.fromarray(_fit_mask(mask, (h, w)).astype(np.uint8) * 255).convert("RGB"))
    header, caption = 22, 18
    out = Image.new("RGB", (3 * tw, tile + header + caption), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    text = title if score is None else f"{title}    score {score:.4g}"
    draw.text((6, 4), text, fill=(0, 0, 0), font=_font(14))
    labels = ("image", "anomaly map", "ground truth" if mask is not None else "no mask")
    for i, (t, lab) in enumerate(zip(tiles, labels)):
        out.paste(t.resize((tw, tile), Image.Resampling.BILINEAR), (i * tw, header + caption))
        draw.text((i * tw + 6, header + 1), lab, fill=(80, 80, 80), font=_font(12))
    return out


@dataclass(frozen=True)
class OverlayCase:
    """One image to render: ``name`` becomes the file name (characters outside [A-Za-z0-9._-] -> _)."""

    name: str
    image: Image.Image | np.ndarray
    amap: Any
    mask: Any = None
    pred_mask: Any = None
    score: float | None = None


def _save_png(path: Path, img: Image.Image) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_overlays(
    out_dir: str | Path,
    items: Iterable[OverlayCase],
    *,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    kind: Literal["overlay", "panel"] = "overlay",
) -> list[Path]:
    """Write one PNG per case to ``out_dir`` (atomic) and return the paths, in input order.

    ``threshold``: when given, cases without a ``pred_mask`` get ``amap >= threshold`` outlined.
    The colour scale defaults to the range over *all* given maps, not per image: per-image
    scaling paints the hottest pixel of a perfectly normal image red.
    """
    cases = list(items)
    maps = [as_numpy(c.amap) for c in cases]
    lo = min((float(m.min()) for m in maps), default=0.0) if vmin is None else vmin
    hi = max((float(m.max()) for m in maps), default=1.0) if vmax is None else vmax
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for case, amap in zip(cases, maps):
        path = out_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", case.name) + ".png")
        if path in paths:
            raise ValueError(f"two cases map to the same file {path.name}; make the names unique")
        pred = case.pred_mask
        if pred is None and threshold is not None:
            pred = amap >= threshold
        if kind == "panel":
            img = panel(case.image, amap, case.mask, case.score, case.name, pred_mask=pred, vmin=lo, vmax=hi)
        else:
            img = overlay(case.image, amap, case.mask, pred, vmin=lo, vmax=hi)
        _save_png(path, img)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- line plots


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

    small, medium = _font(12), _font(14)
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

    draw.text((left + pw / 2, 10), title, fill=(0, 0, 0), font=_font(15), anchor="mt")
    draw.text((left + pw / 2, height - 8), xlabel, fill=(0, 0, 0), font=medium, anchor="mb")
    label_box = medium.getbbox(ylabel)
    ylab = Image.new("RGB", (label_box[2] + 4, label_box[3] + 4), (255, 255, 255))
    ImageDraw.Draw(ylab).text((2, 2), ylabel, fill=(0, 0, 0), font=medium)
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (6, top + (ph - ylab.height) // 2))

    _draw_legend(draw, data, (x0, x1, y0, y1), (left, top, pw, ph), small)
    path = Path(path)
    _save_png(path, img)
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


# ----------------------------------------------------------------------------- tables and files


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars / arrays -> python, NaN / inf -> None, paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN; DVC and browsers reject it
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_plot_csv(path: str | Path, columns: Mapping[str, Sequence[Any]]) -> Path:
    """Write equal-length columns as a CSV with a header row (atomic), e.g. for ``dvc plots``."""
    cols = {name: _plain(list(values)) for name, values in columns.items()}
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


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_cell(value: Any) -> bool:
    """Fits in one table cell: a scalar, a flat list (a shape) or a flat dict (a confusion matrix)."""
    if isinstance(value, Mapping):
        return all(_is_scalar(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_scalar(v) for v in value)
    return _is_scalar(value)


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{_cell(k)}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """GitHub markdown table of dict rows; columns default to every key, in first-seen order.

    Numeric columns are right-aligned; None / NaN print as ``n/a``, a missing key as an empty cell.
    """
    rows = [_plain(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if not columns:
        return ""
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |"]
    aligns = []
    for c in columns:
        present = [r[c] for r in rows if r.get(c) is not None]
        numeric = bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        aligns.append("---:" if numeric else "---")
    lines.append("| " + " | ".join(aligns) + " |")
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) if c in r else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def per_group_metrics(
    scores: Any, labels: Any, groups: Sequence[str], maps: Any = None, masks: Any = None
) -> list[dict[str, Any]]:
    """Per defect type: that type's defective images against *all* good images.

    scores [M], labels [M] (True = defective), groups [M] (defect type per image; ignored for good
    images), optional maps / masks [M, H, W]. Returns rows sorted by group: ``{group, n_images,
    n_good, image_auroc[, pixel_auroc, aupro]}``; a metric undefined on the subset is None.
    """
    s = as_numpy(scores).reshape(-1)
    y = as_numpy(labels).reshape(-1).astype(bool)
    g = np.asarray(list(groups), dtype=object)
    if not (s.shape == y.shape == g.shape):
        raise ValueError(f"scores, labels and groups must have one entry per image: {s.shape}, {y.shape}, {g.shape}")
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks, or neither")
    a = None if maps is None else as_numpy(maps)
    m = None if masks is None else as_numpy(masks)

    def safe(fn: Any, *args: Any) -> float | None:
        try:
            return fn(*args)
        except UndefinedMetricError:
            return None

    rows = []
    for group in sorted(set(g[y].tolist())):
        subset = (y & (g == group)) | ~y
        row: dict[str, Any] = {
            "group": group,
            "n_images": int(np.count_nonzero(y & (g == group))),
            "n_good": int(np.count_nonzero(~y)),
            "image_auroc": safe(image_auroc, s[subset], y[subset]),
        }
        if a is not None:
            row["pixel_auroc"] = safe(pixel_auroc, a[subset], m[subset])
            row["aupro"] = safe(aupro, a[subset], m[subset])
        rows.append(row)
    return rows


def code_version() -> str:
    """``git describe --always --dirty --tags`` of the source checkout, else ``hetmm <version>``."""
    root = Path(__file__).resolve().parent.parent
    # only ask git when hetmm itself is a checkout; an installed copy could sit inside another repo
    if (root / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"],
                cwd=root, capture_output=True, text=True, timeout=10, check=True,
            )  # fmt: skip
            if done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"hetmm {__version__}"


def _title(key: str) -> str:
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def _render(value: Any, level: int) -> list[str]:
    """Markdown lines for one card value; nesting that does not fit a table becomes sub-headings."""
    if isinstance(value, (Mapping, list)) and not value:
        return ["(none)", ""]
    if _is_scalar(value):
        return [_cell(value), ""]
    if isinstance(value, Mapping):
        if all(isinstance(v, Mapping) and all(_is_cell(x) for x in v.values()) for v in value.values()):
            return [markdown_table([{"name": k, **v} for k, v in value.items()])]
        lines: list[str] = []
        cells = {k: v for k, v in value.items() if _is_cell(v)}
        if cells:
            lines.append(markdown_table([{"key": k, "value": v} for k, v in cells.items()]))
        for k, v in value.items():
            if k not in cells:
                lines += ["#" * min(level, 6) + " " + _title(k), "", *_render(v, level + 1)]
        return lines
    if all(isinstance(v, Mapping) for v in value):
        return [markdown_table(value)]
    if all(_is_scalar(v) for v in value):
        return [*(f"- {_cell(v)}" for v in value), ""]
    return ["```json", json.dumps(value, indent=2), "```", ""]


def model_card(path_md: str | Path, path_json: str | Path, info: Mapping[str, Any]) -> None:
    """Write ``info`` as a JSON model card and as markdown, both atomically.

    The markdown is generic: top-level scalars (hashes, threshold, code version, ...) form the
    first table, then one section per remaining key, with key / value tables for dicts, row
    tables for dicts of dicts and lists of dicts, and sub-headings for deeper nesting; flat lists
    and dicts inside a table are written inline. ``code_version`` is filled in when missing.
    ``title`` (optional) becomes the heading. No timestamp is added, so that an unchanged run
    reproduces byte-identical files (DVC would otherwise see a new output every time).
    """
    card = _plain(info)
    if "code_version" not in card:
        card["code_version"] = code_version()
    title = card.pop("title", "HETMM model card")
    lines = [f"# {title}", ""]
    scalars = {k: v for k, v in card.items() if _is_scalar(v)}
    if scalars:
        lines.append(markdown_table([{"field": k, "value": v} for k, v in scalars.items()]))
    for key, value in card.items():
        if not _is_scalar(value):
            lines += [f"## {_title(key)}", "", *_render(value, 3)]
    write_text_atomic(path_md, "\n".join(lines).rstrip() + "\n")
    write_json_atomic(path_json, {"title": title, **card})
