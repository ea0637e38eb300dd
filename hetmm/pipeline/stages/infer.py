"""Stage ``infer``: score the line's test images with its model (HETMM template or TFA-Net).

Reads the model, the feature cache and the ``matching`` / ``post`` settings; writes ``outputs/<line>/scores.csv``,
``outputs/<line>/maps.npy``, ``outputs/<line>/matches.pt`` (persisted, methods with stored distances: ALL templates)
and ``reports/<line>/infer.json`` with ``speed``: images/s and ms per image at batch 1 and 8 measured on the test
images against ``inspection.min_images_per_second`` (:mod:`hetmm.pipeline.speed`; one warning line on stderr when
below it). Stored distances are reused only under the rules of
:mod:`hetmm.pipeline.match_cache` (same feature key, plan, dtype, code and old sheets); the record's
``matching.reason`` says what was reused and why.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from hetmm.core.scoring import match_plan
from hetmm.errors import DataError
from hetmm.io import atomic_path, spreadsheet_safe, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline import cluster, speed
from hetmm.pipeline.batch_scoring import score_cached
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import StageRun, split, validated_manifest
from hetmm.pipeline.match_cache import MatchCache
from hetmm.pipeline.models import load_scorer
from hetmm.pipeline.provenance import FeatureKey


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    test = split(validated_manifest(paths, line.name), "test")
    scorer, method = load_scorer(line, paths, ctx.device), spec(line.method)
    m = line.matching
    key = FeatureKey.of(line.features)
    matches = matcher = None
    if method.stored_distances:
        matches = MatchCache(scorer.template, match_plan(m.forward_windows, m.backward_windows, m.alphas,
                                                         m.weights, m.mode), key)
        matches.resume(paths.outputs / "matches.pt")
    if method.sharding and cluster.enabled(ctx.params.cluster):
        matcher = cluster.ShardedMatcher(scorer.template, line.matching, ctx.params.cluster)
    start = time.perf_counter()
    scores, maps = score_cached(scorer, FeatureCache(paths.features, key), list(test["sha256"]),
                                line.features.batch_size, ctx.progress, matches=matches, matcher=matcher)
    seconds = time.perf_counter() - start
    bad = np.flatnonzero(~np.isfinite(maps).all(axis=(1, 2)) | ~np.isfinite(scores))
    if len(bad):  # refused before anything is written: the previous outputs stay as they were
        raise DataError(f"{paths.data / test['path'][bad[0]]}: non-finite anomaly map ({len(bad)} test image(s)); "
                        f"re-run `hetmm extract {line.name}` (it re-checks the feature cache) and check the image")
    out = test[["path", "sha256", "label", "defect_type", "mask_path", "subset"]].copy()
    # float64 so the CSV holds each float32 score exactly: the threshold chosen from these values is then a score
    # the model can produce, and `score >= threshold` gives the same verdict in float32 (predict) and float64
    out["score"] = scores.astype(np.float64)
    paths.outputs.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.outputs / "scores.csv") as tmp:
        spreadsheet_safe(out).to_csv(tmp, index=False)
    with atomic_path(paths.outputs / "maps.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, maps)
    if matches is not None:
        matches.save(paths.outputs / "matches.pt")
    stats = {"images": len(test), "seconds": round(seconds, 2),
             "images_per_second": round(len(test) / max(seconds, 1e-9), 2), "method": str(line.method),
             "device": str(scorer.device), "model_hash": scorer.version,
             "matching": matches.summary() if matches is not None else {"reason": f"{line.method}: no stored "
                                                                                   "distances"}}
    if matcher is not None:
        stats["cluster"] = matcher.describe()
    if len(test):
        stats["speed"] = speed.measure(scorer, FeatureCache(paths.features, key), list(test["sha256"]),
                                       [paths.data / p for p in test["path"]])
        if (message := speed.warning(line.name, stats["speed"])) is not None:
            print(message, file=sys.stderr)
    write_json_atomic(paths.reports / "infer.json", stats)
    return stats
