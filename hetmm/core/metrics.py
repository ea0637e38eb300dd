"""Evaluation metrics: image / pixel AUROC, AU-PRO (standard), PRO (official HETMM variant), F1-max.

Every function accepts numpy arrays or torch tensors (any device) and returns python floats in
percent. Anomaly maps are ``[M, H, W]`` (a single ``[H, W]`` map is read as ``M = 1``); ground-truth
masks have the same shape and are binarised at 0.5, so bool, {0, 1} and {0, 255} masks all work.

Pixel metrics never build a float64 copy or an index sort of all pixels: the GT-negative scores
are copied once in the maps' own dtype and sorted in place, and the (few) positive scores are
located in them with ``searchsorted``. That keeps 400 x 256 x 256 maps to about one extra copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from skimage.measure import label
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "UndefinedMetricError",
    "as_numpy",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "pro_official",
    "f1_max",
    "roc_points",
    "pro_points",
    "summarise",
]

OFFICIAL_PRO_STEPS = 300
OFFICIAL_PRO_FPR_LIMIT = 0.3
OFFICIAL_PRO_EPS = 1e-5


class UndefinedMetricError(ValueError):
    """The metric does not exist for these data (e.g. only one class present); not a usage error."""


# ----------------------------------------------------------------------------- input handling


def as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device; half precision -> float32) or sequence."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        t = x.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _binary_labels(labels: Any, n: int) -> np.ndarray:
    """labels [M] bool / {0, 1} -> bool [M]; other values are rejected, not guessed."""
    y = as_numpy(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"got {n} scores but {y.shape[0]} labels")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be bool or 0/1, got values {np.unique(y)[:5].tolist()}")
        y = y.astype(bool)
    return y


def _scores_1d(scores: Any) -> np.ndarray:
    s = as_numpy(scores).reshape(-1)
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s


def _maps_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """maps [M, H, W] (or [H, W]), masks of the same shape -> (maps, bool masks [M, H, W])."""
    a = as_numpy(maps)
    g = as_numpy(masks)
    if a.ndim == 2 and g.ndim == 2:
        a, g = a[None], g[None]
    if a.ndim != 3 or a.shape != g.shape:
        raise ValueError(f"maps must be [M, H, W] and masks the same shape, got {a.shape} and {g.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"maps must be real numbers, got dtype {a.dtype}")
    if g.dtype != bool:
        g = g > 0.5  # the official code binarises (bilinearly resized) masks at 0.5
    if np.issubdtype(a.dtype, np.floating) and not all(np.isfinite(m).all() for m in a):
        raise ValueError("anomaly maps contain NaN or infinite values")
    return a, g


def _sorted_negatives(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """GT-negative scores, ascending, in the maps' dtype: [n_neg]. Filled image by image."""
    n_neg = masks.size - int(np.count_nonzero(masks))
    neg = np.empty(n_neg, dtype=maps.dtype)
    at = 0
    for amap, gt in zip(maps, masks):
        part = amap[~gt]
        neg[at : at + part.size] = part
        at += part.size
    neg.sort()
    return neg


# ----------------------------------------------------------------------------- image level


def image_auroc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC of image scores [M] against labels [M] (True / 1 = defective), in percent.

    Ties count one half (Mann-Whitney). Raises UndefinedMetricError when only one class is present.
    """
    s = _scores_1d(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(y.sum())
    if n_pos in (0, y.size):
        kind = "defective" if n_pos == 0 else "good"
        raise UndefinedMetricError(f"AUROC needs good and defective samples; there is no {kind} one")
    return float(roc_auc_score(y, s)) * 100.0


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over all thresholds of the PR curve: scores [M], labels [M] -> (F1 %, threshold).

    A sample is predicted defective when ``score >= threshold``; the threshold is one of the scores
    (the lowest one reaching the maximum, if several do).
    Raises UndefinedMetricError when there is no defective sample (F1 is then 0/0).
    """
    s = _scores_1d(scores)
    y = _binary_labels(labels, s.shape[0])
    if not y.any():
        raise UndefinedMetricError("F1 needs at least one defective sample")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # the last PR point (precision 1, recall 0) has no threshold
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]) * 100.0, float(thresholds[best])


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` curve points, evenly spaced along the curve's length.

    Index-uniform sampling would spend the budget where points are dense (flat tails); arc length
    on the [0, 1]-scaled axes keeps the bends. First and last points are always kept.
    """
    n = x.shape[0]
    if n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    span_x = float(np.ptp(x)) or 1.0
    span_y = float(np.ptp(y)) or 1.0
    step = np.hypot(np.diff(x) / span_x, np.diff(y) / span_y)
    length = np.concatenate(([0.0], np.cumsum(step)))
    targets = np.linspace(0.0, length[-1], max_points)
    idx = np.searchsorted(length, targets, side="left")
    idx[-1] = n - 1  # the last target may land on an earlier duplicate of the end point
    return np.unique(idx)


def roc_points(scores: Any, labels: Any, max_points: int = 500) -> dict[str, list[float]]:
    """ROC curve for plotting: scores [M], labels [M] -> {fpr, tpr, threshold}, each [<= max_points].

    ``threshold`` is the score above or at which a sample is called defective. The first point uses
    a threshold just above the highest score (nothing flagged), so every value is finite for JSON.
    """
    s = _scores_1d(scores)
    y = _binary_labels(labels, s.shape[0])
    if y.all() or not y.any():
        raise UndefinedMetricError("a ROC curve needs good and defective samples")
    fpr, tpr, thr = roc_curve(y, s)
    thr = thr.astype(np.float64)
    thr[0] = np.nextafter(float(s.max()), math.inf)
    keep = _downsample(fpr, tpr, max_points)
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "threshold": thr[keep].tolist()}


# ----------------------------------------------------------------------------- pixel level


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Exact ROC AUC over all pixels of all images, in percent: maps [M, H, W], masks [M, H, W].

    Mann-Whitney form: AUC = P(positive > negative) + P(equal) / 2, counted by locating each
    positive score in the sorted negatives, so only one copy of the negative scores is made.
    """
    a, g = _maps_masks(maps, masks)
    pos = np.sort(a[g])  # sorted queries keep searchsorted cache-friendly (about 10x faster)
    if pos.size in (0, g.size):
        kind = "defect" if pos.size == 0 else "normal"
        raise UndefinedMetricError(f"pixel AUROC needs defect and normal pixels; the masks have no {kind} pixel")
    neg = _sorted_negatives(a, g)
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_equal = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    # integer sums are exact; (below + below_or_equal) / 2 counts ties as one half
    return float((int(below) + int(below_or_equal)) / (2.0 * pos.size * neg.size)) * 100.0


def _regions(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Defect pixels with their region weights: -> (scores [n_pos], 1 / region size [n_pos], n_regions).

    Regions are 8-connected components of each image's mask, so a region never spans two images.
    """
    scores, weights, n_regions = [], [], 0
    for amap, gt in zip(maps, masks):
        lab, n = label(gt, connectivity=2, return_num=True)
        if n == 0:
            continue
        region_of_pixel = lab[gt]
        sizes = np.bincount(region_of_pixel, minlength=n + 1)
        scores.append(amap[gt])
        weights.append(1.0 / sizes[region_of_pixel])
        n_regions += n
    if n_regions == 0:
        return np.empty(0, maps.dtype), np.empty(0), 0
    return np.concatenate(scores), np.concatenate(weights), n_regions


def _pro_curve(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve with a threshold at every distinct score: -> (fpr [K], pro [K]), fpr ascending.

    PRO(t) = mean over regions r of |{p in r : s_p >= t}| / |r| = sum over defect pixels with
    s_p >= t of 1 / (|r(p)| * R), so the per-region overlaps are one weighted cumulative sum.
    Between two distinct defect scores only the FPR moves (a horizontal run), so the polyline
    through all thresholds equals the one through two points per distinct defect score p: just
    above p, (FPR(>p), PRO(>p)), and at p, (FPR(>=p), PRO(>=p)); plus (0, 0) and (1, 1).
    """
    a, g = _maps_masks(maps, masks)
    pos, weight, n_regions = _regions(g, a)
    if n_regions == 0:
        raise UndefinedMetricError("PRO needs at least one defect region; the masks are empty")
    if pos.size == g.size:
        raise UndefinedMetricError("PRO needs normal pixels for the FPR; the masks cover everything")
    neg = _sorted_negatives(a, g)

    order = np.argsort(pos, kind="stable")[::-1]
    pos = pos[order]
    pro_cum = np.cumsum(weight[order]) / n_regions
    first = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
    last = np.concatenate((first[1:] - 1, [pos.size - 1]))
    levels = pos[first]  # distinct defect scores, descending
    pro_ge = np.minimum(pro_cum[last], 1.0)
    pro_gt = np.concatenate(([0.0], pro_ge[:-1]))
    fpr_ge = (neg.size - np.searchsorted(neg, levels, side="left")) / neg.size
    fpr_gt = (neg.size - np.searchsorted(neg, levels, side="right")) / neg.size

    fpr = np.concatenate(([0.0], np.stack((fpr_gt, fpr_ge), axis=1).ravel(), [1.0]))
    pro = np.concatenate(([0.0], np.stack((pro_gt, pro_ge), axis=1).ravel(), [1.0]))
    return fpr, pro


def _clip_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Part of a polyline (x ascending) with x <= x_max, ending with a point interpolated at x_max."""
    if not 0.0 < x_max <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {x_max}")
    n = int(np.searchsorted(x, x_max, side="right"))
    if n == x.shape[0]:
        return x, y
    # x[n - 1] <= x_max < x[n], so the segment is not vertical
    y_at = y[n - 1] + (y[n] - y[n - 1]) * (x_max - x[n - 1]) / (x[n] - x[n - 1])
    return np.append(x[:n], x_max), np.append(y[:n], y_at)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Standard AU-PRO, in percent: maps [M, H, W], masks [M, H, W].

    Area under PRO(FPR) for FPR in [0, fpr_limit] (trapezoids through every distinct threshold,
    the point at the limit interpolated), divided by ``fpr_limit``. PRO is the unweighted mean over
    8-connected GT regions of each region's detected fraction; FPR is pooled over all GT-negative
    pixels, so defect-free images only add negatives.
    """
    fpr, pro = _clip_curve(*_pro_curve(maps, masks), fpr_limit)
    return float(np.trapezoid(pro, fpr) / fpr_limit) * 100.0


def pro_points(maps: Any, masks: Any, fpr_limit: float = 0.3, max_points: int = 300) -> dict[str, list[float]]:
    """The AU-PRO curve for plotting: -> {fpr, pro}, each [<= max_points], FPR in [0, fpr_limit]."""
    fpr, pro = _clip_curve(*_pro_curve(maps, masks), fpr_limit)
    keep = _downsample(fpr, pro, max_points)
    return {"fpr": fpr[keep].tolist(), "pro": pro[keep].tolist()}


def pro_official(maps: Any, masks: Any) -> float:
    """PRO as computed by the official HETMM code (spec section 7), in percent.

    300 thresholds ``linspace(min, max)`` over all maps; a pixel is flagged when ``score > t``.
    FPR is pooled over all GT-negative pixels; PRO is the unweighted mean over all 8-connected GT
    regions of their flagged fraction. Thresholds with FPR <= 0.3 are kept, then the kept FPRs
    *and* the kept PROs are each min-max rescaled, ``(v - min) / (max - min + 1e-5)``, and the
    trapezoid area is returned. The rescaling inflates the value: it is not comparable with
    :func:`aupro`; report both when parity with the paper matters.
    """
    a, g = _maps_masks(maps, masks)
    pos, weight, n_regions = _regions(g, a)
    if n_regions == 0:
        raise UndefinedMetricError("PRO needs at least one defect region; the masks are empty")
    n_neg = g.size - pos.size
    if n_neg == 0:
        raise UndefinedMetricError("PRO needs normal pixels for the FPR; the masks cover everything")
    lo = min(float(m.min()) for m in a)
    hi = max(float(m.max()) for m in a)
    thresholds = np.linspace(lo, hi, OFFICIAL_PRO_STEPS)
    if np.issubdtype(a.dtype, np.floating):
        thresholds = thresholds.astype(a.dtype)  # the official code compares in the maps' precision
    # a pixel is flagged at thresholds[k] iff k < searchsorted(thresholds, s, "left"), i.e. s > t_k;
    # counting pixels per bucket then a reversed cumulative sum replaces the 300 passes over the maps
    flagged_neg = np.zeros(OFFICIAL_PRO_STEPS + 1, dtype=np.int64)
    for amap, gt in zip(a, g):
        bucket = np.searchsorted(thresholds, amap[~gt], side="left")
        flagged_neg += np.bincount(bucket, minlength=OFFICIAL_PRO_STEPS + 1)
    pos_bucket = np.searchsorted(thresholds, pos, side="left")
    flagged_pro = np.bincount(pos_bucket, weights=weight, minlength=OFFICIAL_PRO_STEPS + 1)
    fpr = np.cumsum(flagged_neg[::-1])[::-1][1:] / n_neg  # [300], fpr[k] = share of negatives > t_k
    pro = np.cumsum(flagged_pro[::-1])[::-1][1:] / n_regions

    keep = fpr <= OFFICIAL_PRO_FPR_LIMIT
    fpr, pro = fpr[keep][::-1], pro[keep][::-1]  # thresholds descending -> FPR ascending
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min() + OFFICIAL_PRO_EPS)
    pro = (pro - pro.min()) / (pro.max() - pro.min() + OFFICIAL_PRO_EPS)
    return float(np.trapezoid(pro, fpr)) * 100.0


# ----------------------------------------------------------------------------- summary


def summarise(image_scores: Any, image_labels: Any, maps: Any = None, masks: Any = None) -> dict[str, Any]:
    """All headline metrics: image scores [M], labels [M], maps / masks [M, H, W] (both or neither).

    Returns ``{image_auroc, pixel_auroc, aupro, pro_official, f1_max, f1_threshold, n_images,
    n_defective, undefined}``; a metric that does not exist for these data is ``None`` and
    ``undefined[name]`` says why. Usage errors (shapes, NaNs) still raise.
    """
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks, or neither")
    labels = _binary_labels(image_labels, _scores_1d(image_scores).shape[0])
    out: dict[str, Any] = {"n_images": int(labels.size), "n_defective": int(labels.sum())}
    undefined: dict[str, str] = {}

    def attempt(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except UndefinedMetricError as exc:
            undefined[name] = str(exc)
            return None

    out["image_auroc"] = attempt("image_auroc", image_auroc, image_scores, image_labels)
    f1 = attempt("f1_max", f1_max, image_scores, image_labels)
    out["f1_max"], out["f1_threshold"] = f1 if f1 is not None else (None, None)
    if f1 is None:
        undefined["f1_threshold"] = undefined["f1_max"]
    pixel = {"pixel_auroc": pixel_auroc, "aupro": aupro, "pro_official": pro_official}
    for name, fn in pixel.items():
        if maps is None:
            out[name] = None
            undefined[name] = "no anomaly maps and masks were given"
        else:
            out[name] = attempt(name, fn, maps, masks)
    out["undefined"] = undefined
    return out
