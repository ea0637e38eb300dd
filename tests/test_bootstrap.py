"""The paired cluster bootstrap behind the tuner's acceptance rule (hetmm.core.bootstrap)."""

import numpy as np
import pytest

from hetmm.core import bootstrap
from hetmm.core.metrics import aupro, image_auroc, pixel_auroc


def _validation(seed: int = 0, normals: int = 8, per_normal: int = 4, side: int = 48):
    """Normals, then ``per_normal`` defects (a square or two) made on each; groups = the normal's index."""
    rng = np.random.default_rng(seed)
    q = normals * (1 + per_normal)
    masks = np.zeros((q, side, side), dtype=bool)
    for i in range(normals, q):
        for _ in range(1 + i % 2):  # some images hold two regions
            y, x, s = *rng.integers(2, side - 14, 2), rng.integers(3, 12)
            masks[i, y:y + s, x:x + s] = True
    groups = np.concatenate([np.arange(normals), np.repeat(np.arange(normals), per_normal)])
    labels = masks.reshape(q, -1).any(1)
    return masks, labels, groups


def _maps(masks: np.ndarray, signal: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=masks.shape) + signal * masks).astype(np.float32)


def test_unit_weights_reproduce_the_exact_metrics_to_the_bin_width():
    masks, labels, groups = _validation()
    maps = _maps(masks, 1.5, 1)
    scores = maps.reshape(len(maps), -1).max(1)
    regions = bootstrap.Regions.of(masks)
    assert len(regions.size) > labels.sum()  # some images hold two regions
    summary = bootstrap.summarise(maps, scores, regions)
    ones = np.ones((1, len(maps)))
    exact = (image_auroc(scores, labels) + pixel_auroc(maps, masks) + aupro(maps, masks)) / 3
    approx = bootstrap.objective_draws(summary, labels, regions, ones)[0]
    assert approx == pytest.approx(exact, abs=0.3)


def test_cluster_weights_draw_whole_clusters_with_replacement():
    groups = np.array([0, 1, 2, 0, 0, 1, 1, 2, 2])
    w = bootstrap.cluster_weights(groups, draws=50, seed=3)
    assert w.shape == (50, 9)
    assert np.array_equal(w, bootstrap.cluster_weights(groups, draws=50, seed=3))  # seeded
    for g in range(3):  # a cluster's images share one weight: how often it was drawn
        members = w[:, groups == g]
        assert (members == members[:, :1]).all()
    assert (w[:, [0, 1, 2]].sum(1) == 3).all()  # three clusters drawn per resample
    assert (w == 0).any() and (w >= 2).any()


def test_a_real_gain_wins_almost_every_resample_and_noise_does_not():
    masks, labels, groups = _validation(normals=10)
    regions = bootstrap.Regions.of(masks)
    weights = bootstrap.cluster_weights(groups, draws=200, seed=0)

    def summary(maps):
        return bootstrap.summarise(maps, maps.reshape(len(maps), -1).max(1), regions)

    current = _maps(masks, 1.0, 5)
    clearly_better = summary(_maps(masks, 3.0, 5))
    assert bootstrap.beats(clearly_better, summary(current), labels, regions, weights) >= 0.99
    assert bootstrap.beats(summary(current), summary(current), labels, regions, weights) == 0.0
    # the same signal with other noise: sometimes ahead, sometimes behind, never reliably better
    wins = [bootstrap.beats(summary(_maps(masks, 1.0, s)), summary(current), labels, regions, weights)
            for s in (6, 7, 8, 9)]
    assert all(w < 0.9 for w in wins), wins
    # better on one cluster only: the cluster bootstrap is not convinced
    one = _maps(masks, 1.0, 5)
    first = groups == 0
    one[first] += 2.0 * masks[first]
    assert bootstrap.beats(summary(one), summary(current), labels, regions, weights) < 0.9
