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
from hetmm.modes import MatchMode, TemplateKind
from hetmm.core.templates import TemplateSet
from hetmm.errors import ConfigError
from hetmm.pipeline.evaluation import scopes, summarise_scoped
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.infer import score_cached
from hetmm.pipeline.template import build_template

def ablation(line: ProductLine, inspector: Scorer, cache: FeatureCache, train_shas: list[str],
             test: pd.DataFrame, masks: np.ndarray, progress: bool = True) -> list[dict]:
    """Rows (:data:`hetmm.pipeline.report.ABLATION_COLUMNS`), one per variant, on ``report.ablation_subset`` of the test images."""
    subset = line.report.ablation_subset
    if subset != "all":
        keep = (test["subset"] == subset).to_numpy()
        if not keep.any():
            raise ConfigError(f"product_lines.{line.name}.report.ablation_subset: no test images in subset {subset!r}")
        test, masks = test[keep].reset_index(drop=True), masks[keep]
    labels = (test["label"] == "defect").to_numpy()
    labelled, pixel = scopes(test)
    shas = list(test["sha256"])

    def row(name: str, variant: Inspector, build_seconds: float | None = None) -> dict:
        start = time.perf_counter()
        scores, maps = score_cached(variant, cache, shas, line.features.batch_size, progress, desc=name)
        metrics = summarise_scoped(scores, labels, maps.astype(np.float32), masks, labelled, pixel)
        sheets = int(variant.template.layers[0].shape[0]) if isinstance(variant, Inspector) else 1
        return {"variant": name, "subset": subset, "sheets": sheets,
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
    if not isinstance(inspector, Inspector):
        return [row(f"method={line.method}", inspector), row("method=hetmm template=ALL", Inspector(
            of_kind(TemplateKind.ALL), tset, inspector.device), seconds)]
    rows = [row(f"mode={mode}", inspector.with_settings(matching=replace(line.matching, mode=mode)))
            for mode in MatchMode]
    rows.append(row("template=ALL", inspector.with_settings(template=tset), seconds))
    covers = {}
    for kind in (TemplateKind.PTS, TemplateKind.COVER):
        for size in line.report.ablation_sizes:
            tset, seconds = built(kind, size)
            rows.append(row(f"template={kind}-{size}", inspector.with_settings(template=tset), seconds))
            if kind == TemplateKind.COVER:
                covers[size] = tset
    # nearest-patch matching over a covering bank instead of every training vector (PatchCore's coreset idea)
    size = max((k for k in covers if k <= 60), default=min(covers, default=0))
    if size:
        rows.append(row(f"mode=patch template=COVER-{size}", inspector.with_settings(
            template=covers[size], matching=replace(line.matching, mode=MatchMode.PATCH))))
    return rows
