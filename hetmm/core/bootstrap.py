"""Paired cluster bootstrap of the tuning objective: does candidate B beat A beyond the validation set's noise?

A validation set is a few good images (clusters) and the synthetic defects made on each. Its metrics are noisy: a
setting can win by a few defects' ranks, and a search that keeps every such win drifts on noise. Here both
candidates are scored on the same resampled validation sets (clusters drawn with replacement, every image weighted by
how often its cluster was drawn), so their difference is measured pairwise, as in a paired bootstrap.

To make a few hundred resamples cheap, a candidate is first reduced to a :class:`Summary`: its image scores and
per-image (and per-defect-region) histograms of its map values over equal-mass bins. Weighted metrics are then
matrix products over images. They approximate the exact metrics of :mod:`hetmm.core.metrics` to the bin width (the
search's point estimates stay exact); only the decision reads them. Arrays in, arrays out; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BINS = 512  # equal-mass bins of a candidate's map values
FPR_LIMIT = 0.3  # AU-PRO integrates PRO over FPR in [0, FPR_LIMIT], as metrics.aupro
_GRID = np.linspace(0.0, FPR_LIMIT, 301)


@dataclass(frozen=True)
class Regions:
    """Defect regions of a validation set: 8-connected components of each mask. ``ids [Q, H, W]`` (0 = no
    region, else 1 + index into ``image [R]``, the image each region lies in) and ``size [R]`` (pixels)."""

    ids: np.ndarray
    image: np.ndarray
    size: np.ndarray

    @classmethod
    def of(cls, masks: np.ndarray) -> Regions:
        """``masks [Q, H, W]`` bool."""
        ids = np.zeros(masks.shape, dtype=np.int64)
        owner: list[int] = []
        for q, mask in enumerate(masks):
            lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
            ids[q][mask] = lab[mask] + len(owner)
            owner += [q] * n
        size = np.bincount(ids.ravel(), minlength=len(owner) + 1)[1:]
        return cls(ids, np.asarray(owner, dtype=np.int64), size)


@dataclass(frozen=True)
class Summary:
    """What the resampled metrics of one candidate need: image ``scores [Q]``, per image the counts of its normal
    and defect pixels per bin (``normal_hist``, ``defect_hist`` ``[Q, BINS]``) and per region ``region_hist
    [R, BINS]``."""

    scores: np.ndarray
    normal_hist: np.ndarray
    defect_hist: np.ndarray
    region_hist: np.ndarray


def summarise(maps: np.ndarray, scores: np.ndarray, regions: Regions, bins: int = BINS) -> Summary:
    """``maps [Q, H, W]`` and image ``scores [Q]`` of one candidate on a validation set with ``regions``."""
    q = maps.shape[0]
    sample = maps.reshape(-1)[:: max(1, maps.size // 200_000)]
    edges = np.quantile(sample, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    binned = np.searchsorted(edges, maps, side="right") + np.arange(q)[:, None, None] * bins
    defect = regions.ids > 0
    normal_hist = np.bincount(binned[~defect], minlength=q * bins).reshape(q, bins)
    defect_hist = np.bincount(binned[defect], minlength=q * bins).reshape(q, bins)
    r = len(regions.size)
    in_region = (regions.ids[defect] - 1) * bins + binned[defect] % bins
    region_hist = np.bincount(in_region, minlength=r * bins).reshape(r, bins)
    return Summary(np.asarray(scores, dtype=np.float64), normal_hist.astype(np.float64),
                   defect_hist.astype(np.float64), region_hist.astype(np.float64))


def cluster_weights(groups: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """``[draws, Q]``: image ``q``'s weight in each resample, the number of times its cluster ``groups[q]`` was
    drawn (clusters drawn with replacement, as many as there are)."""
    clusters, inverse = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(clusters), len(clusters)), minlength=len(clusters))
                       for _ in range(draws)])
    return counts[:, inverse].astype(np.float64)


def objective_draws(summary: Summary, labels: np.ndarray, regions: Regions, weights: np.ndarray) -> np.ndarray:
    """``[D]``: the objective (mean of image AUROC, pixel AUROC and AU-PRO, percent) on each resample of
    ``weights [D, Q]``; ``labels [Q]`` bool (True = defect)."""
    return (_image_auroc(summary.scores, labels, weights) + _pixel_auroc(summary, weights)
            + _aupro(summary, regions, weights)) / 3.0


def _image_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    wp, wn = weights[:, labels], weights[:, ~labels]
    return 100.0 * np.einsum("dp,pn,dn->d", wp, wins, wn) / (wp.sum(1) * wn.sum(1))


def _pixel_auroc(summary: Summary, weights: np.ndarray) -> np.ndarray:
    normal, defect = weights @ summary.normal_hist, weights @ summary.defect_hist  # [D, BINS]
    below = np.cumsum(normal, axis=1) - normal  # normal pixels in lower bins; ties within a bin count half
    wins = (defect * (below + 0.5 * normal)).sum(1)
    return 100.0 * wins / (defect.sum(1) * normal.sum(1))


def _tail(counts: np.ndarray) -> np.ndarray:
    """``[..., BINS]`` -> ``[..., BINS + 1]``: at k, the counts in bins >= k (what a threshold at bin k flags)."""
    return np.concatenate([np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1], np.zeros_like(counts[..., :1])], -1)


def _aupro(summary: Summary, regions: Regions, weights: np.ndarray) -> np.ndarray:
    normal = _tail(weights @ summary.normal_hist)  # [D, K]
    fpr = normal / normal[:, :1]
    overlap = _tail(summary.region_hist) / regions.size[:, None]  # [R, K]
    region_weight = weights[:, regions.image]  # [D, R]
    pro = region_weight @ overlap / region_weight.sum(1, keepdims=True)  # [D, K]
    # thresholds from the highest bin down: FPR ascends from 0 to 1
    curves = [np.interp(_GRID, f[::-1], p[::-1]) for f, p in zip(fpr, pro, strict=True)]
    return 100.0 * np.trapezoid(np.stack(curves), _GRID, axis=1) / FPR_LIMIT


def beats(new: Summary, current: Summary, labels: np.ndarray, regions: Regions, weights: np.ndarray) -> float:
    """Share of the resamples ``weights [D, Q]`` in which ``new``'s objective exceeds ``current``'s."""
    gain = objective_draws(new, labels, regions, weights) - objective_draws(current, labels, regions, weights)
    return float((gain > 0).mean())
