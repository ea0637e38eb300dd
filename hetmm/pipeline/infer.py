"""Stage ``infer``: score the line's test images with its model (HETMM template or TFA-Net).

Reads the model, the feature cache and the ``matching`` / ``post`` settings; writes ``outputs/<line>/scores.csv``,
``outputs/<line>/maps.npy``, ``outputs/<line>/matches.pt`` (persisted, ALL templates only) and
``reports/<line>/infer.json``. Stored distances (HETMM) are reused only under the rules of :mod:`hetmm.pipeline.match_cache`
(same feature key, plan, dtype, code and old sheets); the record's ``matching.reason`` says what was reused and why.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hetmm.config import ProductLine
from hetmm.core.device import resolve_device
from hetmm.core.inspector import Inspector, Scorer
from hetmm.core.modes import Method
from hetmm.core.scoring import LayerMatches, match_plan
from hetmm.errors import DataError
from hetmm.io import atomic_path, spreadsheet_safe, write_json_atomic
from hetmm.pipeline import cluster
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths, StageRun, split, validated_manifest
from hetmm.pipeline.match_cache import MatchCache
from hetmm.pipeline.provenance import FeatureKey
from hetmm.pipeline.template import load_current
from hetmm.pipeline.tfa_model import load_model


def load_inspector(line: ProductLine, template: str | Path, device: str = "auto") -> Inspector:
    """The line's template (checked against the installed feature code) and settings, on ``device``."""
    return Inspector(line, load_current(line, template), resolve_device(device))


def load_scorer(line: ProductLine, paths: LinePaths, device: str = "auto", model: Path | None = None) -> Scorer:
    """The line's model, by its method: the HETMM template or the trained TFA-Net (``model`` overrides the file)."""
    if line.method == Method.TFA_NET:
        return load_model(line, model or paths.tfa_net, resolve_device(device))
    return load_inspector(line, model or paths.template, device)


class LocalMatcher:
    """Matching in this process; the interface :func:`score_cached` drives (shared with
    :class:`hetmm.pipeline.cluster.ShardedMatcher`): ``submit`` starts one batch, ``collect`` returns its matches."""

    depth = 1  # batches in flight

    def __init__(self, inspector: Scorer) -> None:
        self.inspector = inspector

    def submit(self, features: Sequence[torch.Tensor], first_sheet: int = 0) -> Any:
        if first_sheet:  # only a HETMM template's stored matches ask for its new sheets alone
            return self.inspector.match(features, first_sheet=first_sheet)
        return self.inspector.match(features)

    def collect(self, handle: LayerMatches) -> LayerMatches:
        return handle


def score_cached(inspector: Scorer, cache: FeatureCache, shas: list[str], batch_size: int,
                 progress: bool = True, desc: str = "infer", matches: MatchCache | None = None,
                 matcher: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``[M]`` and float16 maps ``[M, H, W]`` for cached test images, batch by batch.

    With ``matches``, images whose earlier distances it holds are matched against the template's new sheets
    only, and this run's distances are added to it. ``matcher`` (default :class:`LocalMatcher`) computes the
    distances; with ``depth`` > 1 that many batches are in flight at once (a cluster's replicas).
    """
    matcher = matcher or LocalMatcher(inspector)
    maps, scores = [], []
    pending: deque = deque()

    def finish_one() -> None:
        batch, boxes, found, handle = pending.popleft()
        if handle is not None:
            fresh = matcher.collect(handle)
            found = fresh if found is None else found.merged(fresh)
        if matches is not None:
            matches.add(batch, found)
        out = inspector.finish(found, boxes)
        maps.append(out.maps.half().numpy())
        scores.append(out.scores.numpy())

    for start in tqdm(range(0, len(shas), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = shas[start : start + batch_size]
        layers, boxes = cache.load(batch)
        found = matches.lookup(batch, inspector.device) if matches is not None else None
        handle = None
        if found is None:
            handle = matcher.submit(layers)
        elif matches.reuse < matches.sheets:
            handle = matcher.submit(layers, first_sheet=matches.reuse)
        pending.append((batch, boxes, found, handle))
        if len(pending) >= matcher.depth:
            finish_one()
    while pending:
        finish_one()
    return np.concatenate(scores), np.concatenate(maps)


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    test = split(validated_manifest(paths, line.name), "test")
    inspector = load_scorer(line, paths, ctx.device)
    m = line.matching
    key = FeatureKey.of(line.features)
    matches = matcher = None
    if isinstance(inspector, Inspector):  # stored distances and sharded matching are HETMM's
        matches = MatchCache(inspector.template, match_plan(m.forward_windows, m.backward_windows, m.alphas,
                                                            m.weights, m.mode), key)
        matches.resume(paths.outputs / "matches.pt")
        if cluster.enabled(ctx.params.cluster):
            matcher = cluster.ShardedMatcher(inspector.template, line.matching, ctx.params.cluster)
    start = time.perf_counter()
    scores, maps = score_cached(inspector, FeatureCache(paths.features, key), list(test["sha256"]),
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
    # template_hash: the content hash of the line's model (a template set or a trained TFA-Net)
    stats = {"images": len(test), "seconds": round(seconds, 2),
             "images_per_second": round(len(test) / max(seconds, 1e-9), 2), "method": str(line.method),
             "device": str(inspector.device), "template_hash": inspector.version,
             "matching": matches.summary() if matches is not None else {"reason": f"{line.method}: no stored "
                                                                                   "distances"}}
    if matcher is not None:
        stats["cluster"] = matcher.describe()
    write_json_atomic(paths.reports / "infer.json", stats)
    return stats
