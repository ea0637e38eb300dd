"""Heat-map overlays and case panels for people to look at (PIL only, so PNGs exist on headless machines).

Images are ``uint8 [H, W, 3]`` arrays or PIL images; anomaly maps are ``[H, W]`` floats (numpy or torch); masks are
``[H, W]`` bool. Every file is written atomically. :func:`picks` chooses which test images a report draws.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from hetmm.core.metrics import as_numpy
from hetmm.io import write_png_atomic

# White and magenta occur in neither colormap, so outlines stay readable on any heat value.
GT_COLOUR = (255, 255, 255)
PRED_COLOUR = (255, 0, 255)

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


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def anchored_scale(pixel_threshold: float) -> tuple[float, float]:
    """Colour scale ``(vmin, vmax)`` with the pixel threshold in the middle: the same colours mean the same
    distance from the threshold on every image, so a good part never looks red (maps are >= 0)."""
    return 0.0, 2.0 * pixel_threshold if pixel_threshold > 0 else 1.0


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
    threshold: float | None = None,
    tile: int = 256,
) -> Image.Image:
    """Side by side: image | overlay | ground truth (or, without one, the predicted mask), under a title line with
    the score, above a colour bar from ``vmin`` to ``vmax`` (``threshold`` marked) and the outline legend.

    Each tile is scaled to ``tile`` pixels high. Returns an RGB PIL image [tile + 92, 3 * tile width].
    """
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    tw = max(1, round(w * tile / h))
    tiles = [Image.fromarray(rgb), overlay(rgb, amap, mask, pred_mask, vmin=vmin, vmax=vmax)]
    third, label = (mask, "ground truth") if mask is not None else (pred_mask, "predicted mask")
    if third is None:
        tiles.append(Image.new("RGB", (w, h), (96, 96, 96)))
        label = "no mask"
    else:
        tiles.append(Image.fromarray(_fit_mask(third, (h, w)).astype(np.uint8) * 255).convert("RGB"))
    header, caption, footer = 22 + 18 * title.count("\n"), 18, 52  # a line per title line
    out = Image.new("RGB", (3 * tw, tile + header + caption + footer), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    text = title if score is None else f"{title}    score {score:.4g}"
    draw.text((6, 4), text, fill=(0, 0, 0), font=font(14))
    for i, (t, lab) in enumerate(zip(tiles, ("image", "anomaly map", label))):
        out.paste(t.resize((tw, tile), Image.Resampling.BILINEAR), (i * tw, header + caption))
        draw.text((i * tw + 6, header + 1), lab, fill=(80, 80, 80), font=font(12))
    _colour_bar(out, draw, (6, header + caption + tile + 6, min(tw * 2, 3 * tw - 12), 10), vmin, vmax, threshold)
    legend = "outlines: white = ground truth, magenta = predicted defect" if mask is not None else \
        "outline: magenta = predicted defect (no ground truth for this image)"
    draw.text((6, header + caption + tile + 36), legend, fill=(80, 80, 80), font=font(11))
    return out


def _colour_bar(out: Image.Image, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], vmin: float | None,
                vmax: float | None, threshold: float | None) -> None:
    """A horizontal jet gradient at ``box`` (x, y, width, height) labelled with its ends and the threshold."""
    x, y, width, height = box
    if vmin is None or vmax is None or vmax <= vmin or width < 20:
        return
    out.paste(Image.fromarray(np.repeat(colormap(np.linspace(0, 1, width))[None], height, axis=0)), (x, y))
    small = font(10)
    draw.text((x, y + height + 1), f"{vmin:.3g}", fill=(0, 0, 0), font=small)
    draw.text((x + width, y + height + 1), f"{vmax:.3g}", fill=(0, 0, 0), font=small, anchor="ra")
    if threshold is not None and vmin < threshold < vmax:
        u = x + round((threshold - vmin) / (vmax - vmin) * (width - 1))
        draw.line([(u, y - 2), (u, y + height + 1)], fill=(0, 0, 0), width=2)
        draw.text((u, y + height + 1), f"pixel threshold {threshold:.3g}", fill=(0, 0, 0), font=small, anchor="ma")


@dataclass(frozen=True)
class OverlayCase:
    """One image to render: ``name`` becomes the file name (characters outside [A-Za-z0-9._-] -> _) and, unless
    ``title`` is given, the panel's title."""

    name: str
    image: Image.Image | np.ndarray
    amap: Any
    mask: Any = None
    pred_mask: Any = None
    score: float | None = None
    title: str | None = None


def save_overlays(
    out_dir: str | Path,
    items: Iterable[OverlayCase],
    *,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    kind: Literal["overlay", "panel"] = "overlay",
    bar_threshold: float | None = None,
) -> list[Path]:
    """Write one PNG per case to ``out_dir`` (atomic) and return the paths, in input order.

    ``threshold``: when given, cases without a ``pred_mask`` get ``amap >= threshold`` outlined.
    ``bar_threshold``: the value marked on a panel's colour bar.
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
            img = panel(case.image, amap, case.mask, case.score, case.title or case.name, pred_mask=pred, vmin=lo,
                        vmax=hi, threshold=bar_threshold)
        else:
            img = overlay(case.image, amap, case.mask, pred, vmin=lo, vmax=hi)
        write_png_atomic(path, img)
        paths.append(path)
    return paths


def picks(count: int, lowest_defects: list[int], highest_good: list[int]) -> tuple[list[int], ...]:
    """``count`` distinct images in all (fewer when the test split has fewer): the worst defects, the worst good
    images and the best defects, shared out in that order of priority."""
    worst_defect, worst_good, best_defect = [], [], []
    queues = ((worst_defect, iter(lowest_defects)), (worst_good, iter(highest_good)),
              (best_defect, iter(lowest_defects[::-1])))
    taken: set[int] = set()
    while len(taken) < count:
        before = len(taken)
        for group, queue in queues:
            if len(taken) == count:
                break
            pick = next((i for i in queue if i not in taken), None)
            if pick is not None:
                group.append(pick)
                taken.add(pick)
        if len(taken) == before:  # every image shown
            break
    return worst_defect, worst_good, best_defect
