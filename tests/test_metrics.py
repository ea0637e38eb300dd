"""Metrics against hand-computed values and against slow, obviously-correct reference loops."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from skimage.measure import label
from sklearn.metrics import roc_auc_score

from hetmm.core import metrics
from hetmm.core.metrics import UndefinedMetricError

# ----------------------------------------------------------------------------- slow references


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global ids of the 8-connected GT regions [M, H, W] (0 = background) and region sizes [R + 1]."""
    ids = np.zeros(masks.shape, dtype=np.int64)
    for i, m in enumerate(masks):
        lab = label(m, connectivity=2)
        ids[i] = np.where(lab > 0, lab + ids.max(), 0)
    return ids, np.bincount(ids.ravel())


def _overlap(flagged: np.ndarray, ids: np.ndarray, sizes: np.ndarray) -> float:
    """Unweighted mean over regions of the flagged fraction of each region."""
    hits = np.bincount(ids[flagged], minlength=sizes.size)
    return float(np.mean(hits[1:] / sizes[1:]))


def _slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Threshold at every distinct score, one full pass per threshold, interpolate at the limit."""
    ids, sizes = _region_ids(masks)
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        points.append((float(np.mean(flagged[~masks])), _overlap(flagged, ids, sizes)))
    area = 0.0
    for (x0, y0), (x1, y1) in pairwise(points):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit * 100


def _slow_pro_official(maps: np.ndarray, masks: np.ndarray) -> float:
    """The official procedure written out literally: 300 passes over the maps."""
    ids, sizes = _region_ids(masks)
    fprs, pros = [], []
    for t in np.linspace(maps.min(), maps.max(), 300):
        flagged = maps > t
        fprs.append(np.logical_and(flagged, ~masks).sum() / (~masks).sum())
        pros.append(_overlap(flagged, ids, sizes))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= 0.3
    f, p = fprs[keep], pros[keep]
    f = (f - f.min()) / (f.max() - f.min() + 1e-5)
    p = (p - p.min()) / (p.max() - p.min() + 1e-5)
    # f falls as the threshold rises; like sklearn's auc, integrate along threshold order
    return float(-np.trapezoid(p, f)) * 100


def _random_case(seed: int, quantise: int | None) -> tuple[np.ndarray, np.ndarray]:
    """maps [5, 24, 24] with random rectangular and blob-shaped defects; quantised maps have ties."""
    rng = np.random.default_rng(seed)
    maps = rng.random((5, 24, 24)).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    for i in range(4):  # image 4 stays defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 20, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = True
        masks[i] |= rng.random((24, 24)) > 0.97  # isolated pixels and diagonal neighbours
    maps = maps + masks * rng.random(maps.shape).astype(np.float32) * 0.8
    if quantise:
        maps = np.round(maps * quantise) / quantise
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------------------- image level


def test_image_auroc_hand_computed_and_ties() -> None:
    # positives {0.35, 0.8} beat negatives {0.1, 0.4} in 3 of 4 pairs
    assert metrics.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(75.0)
    # positives {1, 2} vs negative {1}: one tie (1/2) and one win
    assert metrics.image_auroc([1, 1, 2], [False, True, True]) == pytest.approx(75.0)
    assert metrics.image_auroc([5, 5, 5, 5], [0, 1, 0, 1]) == pytest.approx(50.0)


def test_image_auroc_perfect_inverted_and_errors() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert metrics.image_auroc(scores, labels) == 100.0
    assert metrics.image_auroc(-scores, labels) == 0.0
    assert isinstance(metrics.image_auroc(torch.tensor(scores), torch.tensor(labels)), float)
    with pytest.raises(ValueError, match="no defective"):
        metrics.image_auroc(scores, np.zeros(5))
    with pytest.raises(ValueError, match="bool or 0/1"):
        metrics.image_auroc(scores, [0, 1, 2, 1, 0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0.1, np.nan], [0, 1])


def test_f1_max_hand_computed() -> None:
    # t=0.8: P=1, R=1/2 -> 2/3; t=0.4: 1/2; t=0.35: P=2/3, R=1 -> 0.8; t=0.1: P=1/2, R=1 -> 2/3
    f1, threshold = metrics.f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert f1 == pytest.approx(80.0)
    assert threshold == pytest.approx(0.35)
    assert metrics.f1_max([0.1, 0.2, 0.9], [0, 0, 1]) == (100.0, pytest.approx(0.9))
    with pytest.raises(UndefinedMetricError):
        metrics.f1_max([0.1, 0.2], [0, 0])


def test_roc_points_downsampled_and_finite() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.3
    scores = rng.normal(size=5000) + labels
    pts = metrics.roc_points(scores, labels, max_points=50)
    assert 2 < len(pts["fpr"]) <= 50 and len(pts["fpr"]) == len(pts["tpr"]) == len(pts["threshold"])
    assert (pts["fpr"][0], pts["tpr"][0]) == (0.0, 0.0) and (pts["fpr"][-1], pts["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(pts["fpr"]) >= 0) and np.all(np.diff(pts["threshold"]) <= 0)
    assert np.isfinite(pts["threshold"]).all() and pts["threshold"][0] > scores.max()
    # the sampled polyline still gives the AUROC to within a fraction of a percent
    auc = np.trapezoid(pts["tpr"], pts["fpr"]) * 100
    assert auc == pytest.approx(metrics.image_auroc(scores, labels), abs=0.5)


# ----------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("quantise", [None, 10])
def test_pixel_auroc_equals_sklearn(quantise: int | None) -> None:
    maps, masks = _random_case(1, quantise)
    expected = roc_auc_score(masks.ravel(), maps.ravel()) * 100
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-9)
    # torch input, and {0, 255} masks binarised at 0.5
    got = metrics.pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.uint8) * 255))
    assert got == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_perfect_inverted_and_undefined() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps = masks.astype(np.float32)
    assert metrics.pixel_auroc(maps, masks) == 100.0
    assert metrics.pixel_auroc(-maps, masks) == 0.0
    with pytest.raises(UndefinedMetricError):
        metrics.pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="same shape"):
        metrics.pixel_auroc(maps, masks[:1])


# ----------------------------------------------------------------------------- AU-PRO


def test_aupro_single_region_threshold_sweep() -> None:
    # region {0.9, 0.5}; negatives {0.8, 0.4, 0.1 x6}. Curve: (0,0) (0,.5) (.125,.5) (.125,1) (.25,1) (1,1)
    maps = np.array([[[0.9, 0.5, 0.8, 0.4] + [0.1] * 6]], dtype=np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, :2] = True
    assert metrics.aupro(maps, masks) == pytest.approx((0.125 * 0.5 + 0.175 * 1.0) / 0.3 * 100)
    assert metrics.aupro(maps, masks, fpr_limit=0.1) == pytest.approx(50.0)
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx((0.0625 + 0.875) * 100)


def test_aupro_interpolates_at_the_fpr_limit() -> None:
    # region of 4 pixels at 0.5 tied with 4 of 10 negatives: one diagonal step (0,0) -> (0.4, 1);
    # at FPR 0.3 the PRO is 0.75, so the area is 0.3 * 0.75 / 2 (dropping the segment would give 0)
    maps = np.array([[[0.5] * 8 + [0.0] * 6]], dtype=np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, :4] = True
    assert metrics.aupro(maps, masks) == pytest.approx(0.1125 / 0.3 * 100)
    pts = metrics.pro_points(maps, masks)
    assert pts["fpr"][-1] == pytest.approx(0.3) and pts["pro"][-1] == pytest.approx(0.75)


def test_aupro_unweighted_mean_over_regions() -> None:
    # region A: 1 pixel at 1.0; region B: 9 pixels at 0.0; negatives at 0.5.
    # For t in (0.5, 1]: PRO = (1 + 0) / 2 = 0.5 at FPR 0 (a pixel-weighted overlap would be 0.1)
    maps = np.full((1, 6, 6), 0.5, dtype=np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    maps[0, 0, 0], masks[0, 0, 0] = 1.0, True
    maps[0, 2:5, 2:5], masks[0, 2:5, 2:5] = 0.0, True
    assert metrics.aupro(maps, masks) == pytest.approx(50.0)


def test_aupro_regions_are_8_connected_and_per_image() -> None:
    # (0,0) and (0,1) detected, (1,2) touches (0,1) diagonally: one region, PRO 2/3 (4-conn: 1/2).
    # Negatives at -1 and the missed pixel at -2, so PRO stays flat up to FPR 1
    maps = np.full((2, 4, 4), -1.0, dtype=np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, :2] = masks[0, 1, 2] = True
    maps[0, 0, :2], maps[0, 1, 2] = 1.0, -2.0
    assert metrics.aupro(maps, masks) == pytest.approx(200 / 3)
    # the same pixels in a second image form a second region, missed entirely: PRO (2/3 + 0) / 2
    masks[1] = masks[0]
    maps[1][masks[1]] = -2.0
    assert metrics.aupro(maps, masks) == pytest.approx(100 / 3)


def test_aupro_perfect_inverted_and_undefined() -> None:
    maps, masks = _random_case(2, None)
    assert metrics.aupro(masks.astype(np.float32), masks) == pytest.approx(100.0)
    assert metrics.aupro(-masks.astype(np.float32), masks) == pytest.approx(0.0)
    with pytest.raises(UndefinedMetricError):
        metrics.aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(maps, masks, fpr_limit=0.0)


@pytest.mark.parametrize(("seed", "quantise"), [(3, None), (4, 7), (5, 25)])
@pytest.mark.parametrize("limit", [0.05, 0.3])
def test_aupro_matches_slow_reference(seed: int, quantise: int | None, limit: float) -> None:
    maps, masks = _random_case(seed, quantise)
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(_slow_aupro(maps, masks, limit), abs=1e-6)


def test_pro_points_trace_the_aupro_curve() -> None:
    maps, masks = _random_case(6, None)
    pts = metrics.pro_points(maps, masks, max_points=40)
    assert len(pts["fpr"]) <= 40 and pts["fpr"][0] == 0.0 and pts["fpr"][-1] == pytest.approx(0.3)
    assert np.all(np.diff(pts["fpr"]) >= 0) and np.all(np.diff(pts["pro"]) >= -1e-12)
    area = np.trapezoid(pts["pro"], pts["fpr"]) / 0.3 * 100
    assert area == pytest.approx(metrics.aupro(maps, masks), abs=1.0)


# ----------------------------------------------------------------------------- official PRO


def test_pro_official_hand_computed() -> None:
    # levels 0, 0.5, 1; a pixel is flagged when score > t, t = linspace(0, 1, 300).
    # region [1, 1, .5, 0]; negatives [1, .5 x4, 0 x7]
    #   t < .5      : FPR 5/12 > 0.3 -> dropped
    #   .5 <= t < 1 : FPR 1/12, PRO 1/2
    #   t = 1       : FPR 0,    PRO 0
    # rescaled: one segment (0, 0) -> (f, p) with f = (1/12)/(1/12 + 1e-5), p = .5/(.5 + 1e-5)
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, :2, :2] = True
    maps[0, 0, :2] = 1.0
    maps[0, 1, 0] = 0.5
    maps[0, 3, 3] = 1.0
    maps[0, 2, :4] = 0.5
    f = (1 / 12) / (1 / 12 + 1e-5)
    p = 0.5 / (0.5 + 1e-5)
    assert metrics.pro_official(maps, masks) == pytest.approx(0.5 * f * p * 100, rel=1e-9)
    assert metrics.pro_official(maps, masks) == pytest.approx(_slow_pro_official(maps, masks), rel=1e-9)


@pytest.mark.parametrize(("seed", "quantise"), [(7, None), (8, 9)])
def test_pro_official_matches_literal_loop_and_exceeds_aupro(seed: int, quantise: int | None) -> None:
    maps, masks = _random_case(seed, quantise)
    official = metrics.pro_official(maps, masks)
    assert official == pytest.approx(_slow_pro_official(maps, masks), abs=1e-9)
    assert official > metrics.aupro(maps, masks)  # the rescaling inflates it


# ----------------------------------------------------------------------------- summary


def test_summarise_keys_and_undefined_reasons() -> None:
    maps, masks = _random_case(9, None)
    labels = masks.reshape(5, -1).any(axis=1)
    scores = maps.reshape(5, -1).max(axis=1)
    out = metrics.summarise(scores, labels, maps, masks)
    for key in ("image_auroc", "pixel_auroc", "aupro", "pro_official", "f1_max", "f1_threshold"):
        assert isinstance(out[key], float), key
    assert out["undefined"] == {} and out["n_images"] == 5 and out["n_defective"] == 4

    good = metrics.summarise(scores, np.zeros(5), maps, np.zeros_like(masks))
    assert good["image_auroc"] is None and good["aupro"] is None and good["f1_threshold"] is None
    assert "defective" in good["undefined"]["image_auroc"] and "empty" in good["undefined"]["aupro"]

    no_maps = metrics.summarise(scores, labels)
    assert no_maps["pixel_auroc"] is None and "no anomaly maps" in no_maps["undefined"]["pixel_auroc"]
    with pytest.raises(ValueError, match="same shape"):
        metrics.summarise(scores, labels, maps, masks[:2])
