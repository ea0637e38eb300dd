"""Synthetic defects with exact masks, made on good images, for tuning settings without labelled defects.

Contract: :func:`make_defect` takes one good image ``[H, W, 3] uint8`` and returns a new image with one defect of
the asked :class:`DefectFamily` plus its ``[H, W]`` bool mask. Pixels outside the mask are bit-identical to the
input; most pixels inside it changed visibly (an attempt that changes too little, e.g. a blur on a flat surface, is
redrawn elsewhere, and the last one gets a mild stain on top, so a mask never labels an unchanged region). The mask is
never empty, covers about 0.05-12 % of the image whatever its size, and keeps off the image border. On an object
photographed on a plain background (the image border one plain colour, :func:`_part`) a defect lies on the part, as
real ones do, and its size is relative to the part; elsewhere (textures, surfaces filling the frame) it goes
anywhere. Grayscale inputs (3 equal channels) get grayscale defects. Everything random comes from the given generator.
Images in, images out: the only files read are texture photos that ship inside scikit-image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


class DefectFamily(StrEnum):
    """Kinds of synthetic defect; the tuner scores candidate settings on each."""

    TEXTURE = "texture"  # a foreign material blended into a Perlin blob (DRAEM-like)
    CUTPASTE = "cutpaste"  # a rotated, jittered patch of a good image pasted elsewhere
    SCRATCH = "scratch"  # one or a few thin curved strokes, brighter or darker than the surface
    INTENSITY = "intensity"  # a stain, burn or discolouration: shifted brightness, contrast or colour in a blob
    DISTORT = "distort"  # a smear or dent: local blur under a faint veil, or an elastic warp, in a blob


@dataclass(frozen=True)
class SyntheticDefect:
    """A good image with one synthetic defect and its exact mask."""

    image: np.ndarray  # [H, W, 3] uint8, same shape as the input
    mask: np.ndarray  # [H, W] bool, True = changed (defect)
    family: DefectFamily


MIN_SIDE = 16  # below this a blob or a stroke has no room to look like anything
BLOB_AREA = (0.003, 0.10)  # blob area as a share of the image, drawn log-uniformly
BLOB_FILL = (0.35, 0.6)  # share of its bounding box a blob fills
CHANGE_LEVEL = 4  # grey levels a mask pixel must move by to count as changed
CHANGE_SHARE = 0.6  # share of mask pixels that must change, else the attempt is redrawn
ATTEMPTS = 3
STAIN_SHIFT = (15.0, 50.0)  # grey levels a stain moves its core by
FALLBACK_SHIFT = (12.0, 30.0)  # a milder stain laid over a last attempt that changed too little
# The part of an object line: pixels far from a plain border colour. The border (3 % of the short side) counts as
# plain when 90 % of its pixels lie within PLAIN_BORDER grey levels of its median colour (JPEG noise on a backdrop
# is a few levels; a texture's border spreads over tens); the part is what differs from it by more than PART_LEVEL
# (or 4x the border's spread), opened and hole-filled, and counts only while it covers PART_SHARE of the image.
PLAIN_BORDER = 12.0
PART_LEVEL = 40.0
PART_SHARE = (0.02, 0.9)
# Photos shipped inside scikit-image (no download) whose content reads as a surface or material.
TEXTURES = ("brick", "grass", "gravel", "moon", "cell", "immunohistochemistry")


class _Part(NamedTuple):
    """Where defects go on an object line: the part's pixel coordinates and its share of the image."""

    ys: np.ndarray
    xs: np.ndarray
    share: float


class _Edit(NamedTuple):
    """A defect inside the box at (y, x): its mask and the new pixel values there ([h, w, C] uint8)."""

    y: int
    x: int
    mask: np.ndarray
    values: np.ndarray


def make_defect(image: np.ndarray, family: DefectFamily | str, rng: np.random.Generator,
                donors: Sequence[np.ndarray] = ()) -> SyntheticDefect:
    """image [H, W, 3] uint8 (grayscale inputs arrive as 3 equal channels) -> one defect of that family.

    ``donors`` are other good images that CUTPASTE may cut its patch from (any size); without them it cuts from
    ``image`` itself, elsewhere. Other families ignore them.
    """
    family = _family(family)
    _check(image, "image")
    return _defect(image, *_surface(image), family, rng, donors)


def _surface(image: np.ndarray) -> tuple[np.ndarray, _Part | None]:
    """What the makers work on (a grayscale line as one channel, so that no defect can give it colour) and its
    part, computed once per image."""
    work = image[..., :1] if _is_gray(image) else image
    return work, _part(work)


def _defect(image: np.ndarray, work: np.ndarray, part: _Part | None, family: DefectFamily,
            rng: np.random.Generator, donors: Sequence[np.ndarray]) -> SyntheticDefect:
    for donor in donors:
        _check(donor, "donor")
    donors = [_gray(d) if work.shape[2] == 1 else d for d in donors]
    for _ in range(ATTEMPTS):
        edit = _MAKERS[family](work, rng, donors, part)
        if _changed_share(work, edit) >= CHANGE_SHARE:
            break
    else:
        edit = _stain(work, edit.y, edit.x, edit.mask, rng, edit.values, FALLBACK_SHIFT)
    out = image.copy()
    h, w = edit.mask.shape
    out[edit.y:edit.y + h, edit.x:edit.x + w][edit.mask] = edit.values[edit.mask]
    mask = np.zeros(image.shape[:2], bool)
    mask[edit.y:edit.y + h, edit.x:edit.x + w] = edit.mask
    return SyntheticDefect(out, mask, family)


def synthesize(normals: Sequence[np.ndarray], seed: int, families: Sequence[DefectFamily | str] = tuple(DefectFamily),
               per_image: int = 1) -> list[SyntheticDefect]:
    """per_image defects of every family on every normal (order: normal, family, repeat).

    Defect (i, family, r) uses ``np.random.default_rng([seed, i, family_index, r])`` with ``family_index`` the
    family's place in :class:`DefectFamily`, so adding a normal or a family leaves the others unchanged. A CUTPASTE
    donor is another normal (the same image when there is only one), picked by the smallest of per-normal random
    keys: appending a normal changes a donor only when the newcomer draws the smallest key.
    """
    fams = [_family(f) for f in families]
    if per_image < 0:
        raise ValueError(f"per_image must be >= 0, got {per_image}")
    order = list(DefectFamily)
    out = []
    for i, image in enumerate(normals):
        _check(image, "image")
        surface = _surface(image)
        for family in fams:
            k = order.index(family)
            for r in range(per_image):
                donors: Sequence[np.ndarray] = ()
                if family is DefectFamily.CUTPASTE and len(normals) > 1:
                    keys = np.random.default_rng([seed, i, k, r, 1]).random(len(normals))
                    keys[i] = np.inf
                    donors = (normals[int(np.argmin(keys))],)
                out.append(_defect(image, *surface, family, np.random.default_rng([seed, i, k, r]), donors))
    return out


def _family(family: DefectFamily | str) -> DefectFamily:
    try:
        return DefectFamily(family)
    except ValueError:
        raise ValueError(f"unknown defect family {family!r}; allowed: {', '.join(DefectFamily)}") from None


def _check(image: np.ndarray, what: str) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"shape {image.shape} dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what} must be an [H, W, 3] uint8 array, got {got}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{what} must be at least {MIN_SIDE} px on each side, got {image.shape[1]}x{image.shape[0]}")


def _is_gray(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def _gray(image: np.ndarray) -> np.ndarray:
    """One channel [H, W, 1] uint8: the image's own if it is grayscale, the channel mean otherwise."""
    return image[..., :1] if _is_gray(image) else _to_uint8(image.mean(-1, keepdims=True))


def _changed_share(work: np.ndarray, edit: _Edit) -> float:
    h, w = edit.mask.shape
    old = work[edit.y:edit.y + h, edit.x:edit.x + w][edit.mask].astype(np.int16)
    diff = np.abs(edit.values[edit.mask].astype(np.int16) - old).max(-1)
    return float((diff >= CHANGE_LEVEL).mean())


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _sign(level: float, rng: np.random.Generator) -> float:
    """+1 (brighter) or -1 (darker): random on mid greys, away from the nearer end otherwise so clipping cannot eat
    the change."""
    if level > 170:
        return -1.0
    if level < 85:
        return 1.0
    return float(rng.choice((-1.0, 1.0)))


# --- shapes -------------------------------------------------------------------------------------------------------

def _perlin(shape: tuple[int, int], rng: np.random.Generator, cells: float = 3.0, octaves: int = 3,
           persistence: float = 0.5) -> np.ndarray:
    """2-D gradient (Perlin) noise [h, w] float32, zero mean and unit std: ``octaves`` layers, the first with about
    ``cells`` lattice cells along the longer side, each next one twice as fine and ``persistence`` times as strong."""
    h, w = shape
    total = np.zeros(shape, np.float32)
    for octave in range(octaves):
        n = cells * 2 ** octave / max(h, w)
        ys, xs = np.arange(h, dtype=np.float32) * n, np.arange(w, dtype=np.float32) * n
        yi, xi = ys.astype(np.intp), xs.astype(np.intp)
        fy, fx = ys - yi, xs - xi
        angle = rng.uniform(0, 2 * np.pi, (yi[-1] + 2, xi[-1] + 2))
        grads = np.sin(angle).astype(np.float32), np.cos(angle).astype(np.float32)
        c00, c01, c10, c11 = (_corner(grads, yi, xi, fy, fx, dy, dx) for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)))
        uy, ux = _fade(fy)[:, None], _fade(fx)[None, :]
        top = c00 + ux * (c01 - c00)
        bottom = c10 + ux * (c11 - c10)
        total += persistence ** octave * (top + uy * (bottom - top))
    total -= total.mean()
    return total / max(float(total.std()), 1e-6)


def _corner(grads: tuple[np.ndarray, np.ndarray], yi: np.ndarray, xi: np.ndarray, fy: np.ndarray, fx: np.ndarray,
            dy: int, dx: int) -> np.ndarray:
    """[h, w]: the dot product of the lattice corner (dy, dx)'s gradient with each pixel's offset from it."""
    iy, ix = (yi + dy)[:, None], (xi + dx)[None, :]
    return grads[0][iy, ix] * (fy - dy)[:, None] + grads[1][iy, ix] * (fx - dx)[None, :]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _part(work: np.ndarray) -> _Part | None:
    """The part of ``work [H, W, C]`` when it sits on a plain background (see PLAIN_BORDER), else None."""
    h, w, c = work.shape
    m = max(2, round(0.03 * min(h, w)))
    pixels = work.astype(np.float32)
    border = np.concatenate([pixels[:m].reshape(-1, c), pixels[-m:].reshape(-1, c),
                             pixels[:, :m].reshape(-1, c), pixels[:, -m:].reshape(-1, c)])
    backdrop = np.median(border, 0)
    spread = float(np.quantile(np.abs(border - backdrop).max(1), 0.9))
    if spread > PLAIN_BORDER:
        return None
    far = np.abs(pixels - backdrop).max(-1) > max(PART_LEVEL, 4 * spread)
    far = ndimage.binary_fill_holes(ndimage.binary_opening(far, iterations=2))
    share = float(far.mean())
    if not PART_SHARE[0] <= share <= PART_SHARE[1]:
        return None
    ys, xs = np.nonzero(far)
    return _Part(ys, xs, share)


def _margin(shape: tuple[int, ...]) -> int:
    return max(1, round(0.01 * min(shape[:2])))


def _box(shape: tuple[int, ...], rng: np.random.Generator, fill: float, part: _Part | None,
         area: tuple[float, float] = BLOB_AREA) -> tuple[int, int]:
    """Box size (h, w) for a defect of log-uniform area share ``area`` (of the part, if any) filling ``fill`` of
    its box."""
    hh, ww = shape[:2]
    m = _margin(shape)
    pixels = np.exp(rng.uniform(np.log(area[0]), np.log(area[1]))) * hh * ww / fill * (part.share if part else 1.0)
    aspect = np.exp(rng.uniform(-0.7, 0.7))
    return (int(np.clip(round(np.sqrt(pixels * aspect)), 5, hh - 2 * m)),
            int(np.clip(round(np.sqrt(pixels / aspect)), 5, ww - 2 * m)))


def _place(shape: tuple[int, ...], size: tuple[int, int], rng: np.random.Generator,
           part: _Part | None) -> tuple[int, int]:
    """Top-left corner of a box of ``size`` that keeps the margin off the image border, centred on a pixel of the
    part if there is one."""
    m = _margin(shape)
    if part is None:
        return int(rng.integers(m, shape[0] - m - size[0] + 1)), int(rng.integers(m, shape[1] - m - size[1] + 1))
    k = int(rng.integers(len(part.ys)))
    return (int(np.clip(part.ys[k] - size[0] // 2, m, shape[0] - m - size[0])),
            int(np.clip(part.xs[k] - size[1] // 2, m, shape[1] - m - size[1])))


def _blob(size: tuple[int, int], fill: float, rng: np.random.Generator) -> np.ndarray:
    """Irregular blob [h, w] bool filling ``fill`` of the box: an elliptic bump roughened by Perlin noise and cut at
    the quantile that gives exactly that area (a plain noise threshold would make the area a lottery)."""
    h, w = size
    yy, xx = np.linspace(-1, 1, h, dtype=np.float32)[:, None], np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    score = 1 - (yy ** 2 + xx ** 2) + rng.uniform(0.25, 0.7) * _perlin(size, rng, cells=rng.uniform(1.5, 4))
    score[[0, -1], :] = score[:, [0, -1]] = -np.inf  # the blob ends inside its box
    mask = score > np.quantile(score[1:-1, 1:-1], 1 - fill)
    if not mask.any():
        mask[h // 2, w // 2] = True
    return mask


def _ramp(mask: np.ndarray, width: float, floor: float = 0.35) -> np.ndarray:
    """Weight [h, w] rising from ``floor`` at the mask edge to 1 at ``width`` px inside: soft-edged defects, still
    visible up to their edge."""
    t = np.clip(ndimage.distance_transform_edt(mask) / max(width, 1.0), 0, 1).astype(np.float32)
    return floor + (1 - floor) * _fade(t)


def _patch(source: np.ndarray, size: tuple[int, int], scale: float, angle: float, rng: np.random.Generator,
           avoid: tuple[float, float] | None = None) -> np.ndarray:
    """A crop of ``source`` scaled by ``scale`` (output px per source px) and rotated by ``angle`` degrees, of
    ``size`` [h, w, C] float32. ``avoid`` is a (y, x) the crop's centre keeps away from (cut-paste on one image)."""
    h, w = size
    side = int(np.ceil(np.hypot(h, w))) + 2  # the box, rotated about its centre, stays inside this square
    need = min(max(2, int(np.ceil(side / scale))), *source.shape[:2])
    ys = rng.integers(0, source.shape[0] - need + 1, 8)
    xs = rng.integers(0, source.shape[1] - need + 1, 8)
    pick = 0
    if avoid is not None:
        pick = int(np.argmax(np.hypot(ys + need / 2 - avoid[0], xs + need / 2 - avoid[1])))
    crop = source[ys[pick]:ys[pick] + need, xs[pick]:xs[pick] + need]
    img = Image.fromarray(np.ascontiguousarray(crop[..., 0] if crop.shape[2] == 1 else crop))
    out = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR).rotate(angle, Image.Resampling.BILINEAR))
    top, left = (side - h) // 2, (side - w) // 2
    return out[top:top + h, left:left + w].reshape(h, w, -1).astype(np.float32)


# --- families -----------------------------------------------------------------------------------------------------

@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data  # lazy: only TEXTURE needs it, and the photos ship with the package (no download)

    img = getattr(skimage.data, name)()
    img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
    img.flags.writeable = False
    return img


def _texture(work: np.ndarray, rng: np.random.Generator, donors: Sequence[np.ndarray],
             part: _Part | None) -> _Edit:
    fill = rng.uniform(*BLOB_FILL)
    size = _box(work.shape, rng, fill, part)
    y, x = _place(work.shape, size, rng, part)
    mask = _blob(size, fill, rng)
    old = work[y:y + size[0], x:x + size[1]].astype(np.float32)
    photo = _photo(TEXTURES[rng.integers(len(TEXTURES))])
    # texture detail scales with the image, so a 64 px image gets a 64 px-like texture
    scale = np.exp(rng.uniform(np.log(0.6), np.log(2.0))) * min(work.shape[:2]) / 512
    tex = _patch(photo, size, scale, rng.uniform(0, 360), rng)
    if work.shape[2] == 1:
        tex = tex.mean(-1, keepdims=True)
    # loose match: the surface's mean colour (a little of the photo's own kept), a random contrast, a random offset
    t_mean, o_mean = tex[mask].mean(0), old[mask].mean(0)
    spread = max(float(old[mask].std()), 12.0) * rng.uniform(0.7, 1.5)
    offset = _sign(float(o_mean.mean()), rng) * rng.uniform(0.3, 1.0) * spread
    target = o_mean + rng.uniform(0, 0.4) * (t_mean - o_mean) + offset
    tex = (tex - t_mean) * (spread / max(float(tex[mask].std()), 1.0)) + target
    new = old + rng.uniform(0.5, 1.0) * (tex - old)
    return _Edit(y, x, mask, _to_uint8(new))


def _cutpaste(work: np.ndarray, rng: np.random.Generator, donors: Sequence[np.ndarray],
              part: _Part | None) -> _Edit:
    rectangle = rng.random() < 0.4
    fill = 1.0 if rectangle else rng.uniform(*BLOB_FILL)
    size = _box(work.shape, rng, fill, part, (BLOB_AREA[0], 0.08))
    y, x = _place(work.shape, size, rng, part)
    mask = np.ones(size, bool) if rectangle else _blob(size, fill, rng)
    source = donors[rng.integers(len(donors))] if donors else work
    avoid = None if donors else (y + size[0] / 2, x + size[1] / 2)
    if rng.random() < 0.5:
        source = source[:, ::-1]
    angle = float(rng.choice((0, 90, 180, 270))) if rng.random() < 0.5 else rng.uniform(0, 360)
    scale = rng.uniform(0.9, 1.1) * min(work.shape[:2]) / min(source.shape[:2])
    patch = _patch(source, size, scale, angle, rng, avoid)
    mean = patch[mask].mean(0)
    patch = (patch - mean) * rng.uniform(0.75, 1.3) + mean + _sign(float(mean.mean()), rng) * rng.uniform(8, 30)
    if work.shape[2] == 3:
        patch = patch * rng.uniform(0.95, 1.05, 3)  # colour balance
    return _Edit(y, x, mask, _to_uint8(patch))


def _stroke(start: np.ndarray, heading: float, length: float, rng: np.random.Generator) -> np.ndarray:
    """Points [n, 2] (x, y) of a smooth curve: the heading drifts as a slow sine plus a constant bend."""
    n = max(8, int(length / 2))
    t = np.linspace(0, 1, n)
    turn = rng.uniform(-1, 1) * t + rng.uniform(0, 0.8) * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t
                                                                    + rng.uniform(0, 2 * np.pi))
    step = length / (n - 1)
    angle = heading + turn
    pts = np.cumsum(np.stack([np.cos(angle), np.sin(angle)], -1) * step, 0)
    return start + pts - pts[0]


def _scratch(work: np.ndarray, rng: np.random.Generator, donors: Sequence[np.ndarray],
             part: _Part | None) -> _Edit:
    hh, ww = work.shape[:2]
    short = min(hh, ww)
    width = max(1, round(rng.uniform(0.004, 0.012) * short))
    heading = rng.uniform(0, 2 * np.pi)
    reach = short * (np.sqrt(part.share) if part else 1.0)  # on a part, strokes scale with the part
    strokes = []
    for _ in range(int(rng.choice((1, 2, 3), p=(0.5, 0.3, 0.2)))):  # a few scratches from one cause run alike
        start = rng.uniform(-0.12, 0.12, 2) * reach
        strokes.append(_stroke(start, heading + rng.uniform(-0.4, 0.4), rng.uniform(0.15, 0.5) * reach, rng))
    pts = np.concatenate(strokes)
    lo, hi = pts.min(0), pts.max(0)
    room = np.array([ww, hh]) - 2 * (_margin(work.shape) + width)
    shrink = min(1.0, float(np.min(room / np.maximum(hi - lo, 1))))  # the group fits inside the image
    free = room - (hi - lo) * shrink
    if part is None:
        offset = _margin(work.shape) + width + rng.uniform(0, 1, 2) * free
    else:  # the group's centre on a pixel of the part, the group still inside the image
        k = int(rng.integers(len(part.ys)))
        centre = np.array([part.xs[k], part.ys[k]], dtype=np.float64)
        offset = _margin(work.shape) + width + np.clip(centre - (hi - lo) * shrink / 2 - _margin(work.shape) - width,
                                                       0, free)
    canvas = Image.new("L", (ww, hh), 0)
    draw = ImageDraw.Draw(canvas)
    for k, stroke in enumerate(strokes, 1):
        xy = (stroke - lo) * shrink + offset
        draw.line([tuple(p) for p in xy], fill=k, width=width, joint="curve")
    ids = np.asarray(canvas)
    rows, cols = np.nonzero(ids)
    y, x = int(rows.min()), int(cols.min())
    ids = ids[y:rows.max() + 1, x:cols.max() + 1]
    mask = ids > 0
    old = work[y:y + mask.shape[0], x:x + mask.shape[1]].astype(np.float32)
    sign = _sign(float(old[mask].mean()), rng)
    depth = np.concatenate([[0], rng.uniform(25, 70, len(strokes))]).astype(np.float32)[ids]
    # brightest (or darkest) along the middle of a wide stroke, as light catches a groove
    profile = _ramp(mask, width / 2, floor=0.6)
    return _Edit(y, x, mask, _to_uint8(old + (sign * depth * profile)[..., None]))


def _intensity(work: np.ndarray, rng: np.random.Generator, donors: Sequence[np.ndarray],
               part: _Part | None) -> _Edit:
    fill = rng.uniform(*BLOB_FILL)
    size = _box(work.shape, rng, fill, part)
    y, x = _place(work.shape, size, rng, part)
    return _stain(work, y, x, _blob(size, fill, rng), rng)


def _stain(work: np.ndarray, y: int, x: int, mask: np.ndarray, rng: np.random.Generator,
           base: np.ndarray | None = None, shift: tuple[float, float] = STAIN_SHIFT) -> _Edit:
    """A soft-edged shift of brightness, contrast and (colour images) hue inside ``mask``, laid over ``base`` (the
    image's own pixels by default). Also the fallback for an attempt that changed too little, laid over that attempt:
    a shift shows on any surface that is not clipped (on a flat one a dent shows only as shading anyway)."""
    old = (work[y:y + mask.shape[0], x:x + mask.shape[1]] if base is None else base).astype(np.float32)
    mean = old[mask].mean(0)
    delta = (rng.uniform(0.6, 1.4) - 1) * (old - mean) + _sign(float(mean.mean()), rng) * rng.uniform(*shift)
    if work.shape[2] == 3 and rng.random() < 0.6:
        tint = rng.normal(size=3)
        tint -= tint.mean()  # a hue change on top of the brightness change, not a second one
        delta = delta + tint / max(float(np.linalg.norm(tint)), 1e-6) * rng.uniform(15, 40)
    weight = _ramp(mask, rng.uniform(0.1, 0.3) * min(mask.shape))
    return _Edit(y, x, mask, _to_uint8(old + weight[..., None] * delta))


def _box_blur(values: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """Gaussian-like blur in time independent of sigma: three box passes of matching variance per axis."""
    for axis, s in enumerate(sigma):
        size = max(1, int(round(np.sqrt(4 * s * s + 1))))
        for _ in range(3):
            values = ndimage.uniform_filter1d(values, size, axis=axis, mode="nearest")
    return values


def _busyness(crop: np.ndarray) -> float:
    """Mean absolute difference between neighbours: what a blur or a warp has to work with."""
    crop = crop.astype(np.int16)
    return float(np.abs(np.diff(crop, axis=0)).mean() + np.abs(np.diff(crop, axis=1)).mean())


def _distort(work: np.ndarray, rng: np.random.Generator, donors: Sequence[np.ndarray],
             part: _Part | None) -> _Edit:
    fill = rng.uniform(*BLOB_FILL)
    size = _box(work.shape, rng, fill, part)
    # blur and warp only show where there is fine structure: take the busiest of a few candidate places
    places = [_place(work.shape, size, rng, part) for _ in range(8)]
    y, x = max(places, key=lambda p: _busyness(work[p[0]:p[0] + size[0], p[1]:p[1] + size[1]]))
    mask = _blob(size, fill, rng)
    weight = _ramp(mask, rng.uniform(0.1, 0.3) * min(size))[..., None]
    old = work[y:y + size[0], x:x + size[1]].astype(np.float32)
    if rng.random() < 0.5:  # smear: an (often directional) blur under a faint veil, with context from around the box
        s = max(1.5, rng.uniform(0.04, 0.12) * min(size))
        sigma = (s, s * rng.uniform(0.3, 1.0))[:: int(rng.choice((1, -1)))]
        pad = int(np.ceil(2 * max(sigma)))
        y0, x0 = max(0, y - pad), max(0, x - pad)
        region = work[y0:y + size[0] + pad, x0:x + size[1] + pad].astype(np.float32)
        blurred = _box_blur(region, sigma)[y - y0:y - y0 + size[0], x - x0:x - x0 + size[1]]
        veil = _sign(float(old[mask].mean()), rng) * rng.uniform(6, 16)  # smudged film scatters a little light
        new = old + weight * (blurred - old + veil)
    else:  # dent: pixels pulled along a smooth random displacement field that fades towards the edge
        amp = max(2.0, rng.uniform(0.08, 0.2) * min(size))
        cells = rng.uniform(1, 3)
        dy, dx = (_perlin(size, rng, cells, octaves=2) * amp * weight[..., 0] for _ in range(2))
        gy, gx = np.mgrid[y:y + size[0], x:x + size[1]].astype(np.float32)
        new = np.stack([ndimage.map_coordinates(work[..., c], [gy + dy, gx + dx], order=1, mode="nearest",
                                                output=np.float32) for c in range(work.shape[2])], -1)
    return _Edit(y, x, mask, _to_uint8(new))


_MAKERS: dict[DefectFamily, Callable[[np.ndarray, np.random.Generator, Sequence[np.ndarray], _Part | None], _Edit]] = {
    DefectFamily.TEXTURE: _texture,
    DefectFamily.CUTPASTE: _cutpaste,
    DefectFamily.SCRATCH: _scratch,
    DefectFamily.INTENSITY: _intensity,
    DefectFamily.DISTORT: _distort,
}
