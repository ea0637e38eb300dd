"""The paper's Table 8 for a line, run by the report stage when ``report.ablation`` is on.

Every matching mode (:class:`~hetmm.modes.MatchMode`) on the line's template, then an ALL template and PTS
templates and COVER templates of each ``report.ablation_sizes``, and nearest-patch matching over the COVER bank of
at most 60 sheets, all scored on the same cached test features. A TFA-Net line's table has the trained network and
HETMM (ALL template, the line's matching) side by side on the same features.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from hetmm.config import ProductLine
from hetmm.core.inspector import Inspector, Scorer
from hetmm.core.templates import TemplateSet
from hetmm.errors import ConfigError
from hetmm.methods import spec
from hetmm.modes import MatchMode, TemplateKind
from hetmm.pipeline.batch_scoring import score_cached
from hetmm.pipeline.evaluation import scopes, summarise_scoped
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths, manifest, split
from hetmm.pipeline.line_template import build_template
from hetmm.pipeline.models import load_scorer
from hetmm.pipeline.provenance import FeatureKey


def line_ablation(line: ProductLine, paths: LinePaths, device: str, test: pd.DataFrame, masks: np.ndarray,
                  progress: bool = True) -> list[dict]:
    """:func:`ablation` of the line's deployed model on its cached features and training images."""
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    train = list(split(manifest(paths), "train")["sha256"])
    return ablation(line, load_scorer(line, paths, device), cache, train, test, masks, progress)

def ablation(line: ProductLine, scorer: Scorer, cache: FeatureCache, train_shas: list[str],
             test: pd.DataFrame, masks: np.ndarray, progress: bool = True) -> list[dict]:
    """Rows (:data:`hetmm.pipeline.stages.report.ABLATION_COLUMNS`), one per variant, on ``report.ablation_subset``
    of the test images."""
    subset = line.report.ablation_subset
    if subset != "all":
        keep = (test["subset"] == subset).to_numpy()
        if not keep.any():
            raise ConfigError(f"product_lines.{line.name}.report.ablation_subset: no test images in subset {subset!r}")
        test, masks = test[keep].reset_index(drop=True), masks[keep]
    labels = (test["label"] == "defect").to_numpy()
    labelled, pixel = scopes(test)
    shas = list(test["sha256"])

    def row(name: str, variant: Scorer, build_seconds: float | None = None) -> dict:
        start = time.perf_counter()
        scores, maps = score_cached(variant, cache, shas, line.features.batch_size, progress, desc=name)
        metrics = summarise_scoped(scores, labels, maps.astype(np.float32), masks, labelled, pixel)
        return {"variant": name, "subset": subset, "sheets": variant.sheets,
                "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                "aupro": metrics["aupro"], "seconds": round(time.perf_counter() - start, 1),
                "build_seconds": build_seconds}

    train_layers, _ = cache.load(train_shas, pixel_major=True)

    def of_kind(kind: TemplateKind) -> ProductLine:
        return replace(line, templates=replace(line.templates, kind=kind))

    def built(kind: TemplateKind, size: int | None = None) -> tuple[TemplateSet, float]:
        start = time.perf_counter()
        tset = build_template(of_kind(kind), train_layers, train_shas, size, progress=progress)
        return tset, round(time.perf_counter() - start, 1)

    tset, seconds = built(TemplateKind.ALL)
    if not spec(line.method).template_variants:  # side by side with HETMM on the same features
        return [row(f"method={line.method}", scorer), row("method=hetmm template=ALL", Inspector(
            of_kind(TemplateKind.ALL), tset, scorer.device), seconds)]
    rows = [row(f"mode={mode}", scorer.with_settings(matching=replace(line.matching, mode=mode)))
            for mode in MatchMode]
    rows.append(row("template=ALL", scorer.with_settings(template=tset), seconds))
    covers = {}
    for kind in (TemplateKind.PTS, TemplateKind.COVER):
        for size in line.report.ablation_sizes:
            tset, seconds = built(kind, size)
            rows.append(row(f"template={kind}-{size}", scorer.with_settings(template=tset), seconds))
            if kind == TemplateKind.COVER:
                covers[size] = tset
    # nearest-patch matching over a covering bank instead of every training vector (PatchCore's coreset idea)
    size = max((k for k in covers if k <= 60), default=min(covers, default=0))
    if size:
        rows.append(row(f"mode=patch template=COVER-{size}", scorer.with_settings(
            template=covers[size], matching=replace(line.matching, mode=MatchMode.PATCH))))
    return rows
