"""Evaluation for the report stage: metrics per subset, the decision threshold, and the ablation table."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from hetmm.cache import FeatureCache
from hetmm.config import ProductLine, ThresholdConfig
from hetmm.errors import ConfigError
from hetmm.inspector import Inspector
from hetmm.metrics import f1_max, summarise

ABLATION_MODES = ("pixel", "patch", "forward", "backward", "mutual")


def choose_threshold(rule: ThresholdConfig, scores: np.ndarray, labels: np.ndarray) -> dict:
    """The deployed image-score threshold and how it was chosen (predicted defective when score >= threshold)."""
    if rule.rule == "manual":
        return {"rule": "manual", "threshold": float(rule.value)}
    if rule.rule == "normal_quantile":
        good = scores[~labels]
        if good.size == 0:
            raise ValueError("threshold rule normal_quantile needs good test images")
        return {"rule": "normal_quantile", "quantile": rule.value,
                "threshold": float(np.quantile(good, rule.value))}
    if labels.all() or not labels.any():
        good = scores[~labels] if (~labels).any() else scores
        # Without both classes F1 is undefined; fall back to the highest normal score (documented in README).
        return {"rule": "f1_max", "threshold": float(good.max()), "note": "one class only: max normal score"}
    f1, threshold = f1_max(scores, labels)
    return {"rule": "f1_max", "threshold": float(threshold), "f1": f1}


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    return {"true_positive": int((pred & labels).sum()), "false_positive": int((pred & ~labels).sum()),
            "true_negative": int((~pred & ~labels).sum()), "false_negative": int((~pred & labels).sum())}


def metrics_by_subset(test: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> dict:
    """``summarise`` over every image and, when the split has them, over each subset (dev / holdout)."""
    labels = (test["label"] == "defect").to_numpy()
    out = {"all": summarise(scores, labels, maps, masks)}
    for subset in sorted(set(test["subset"]) - {"all"}):
        keep = (test["subset"] == subset).to_numpy()
        out[subset] = summarise(scores[keep], labels[keep], maps[keep], masks[keep])
    return out


def ablation(line: ProductLine, inspector: Inspector, cache: FeatureCache, train_shas: list[str],
             test: pd.DataFrame, masks: np.ndarray, build_template, progress: bool = True) -> list[dict]:
    """The paper's Table 8 for this line: matching variants on the line's template, then template sizes.

    ``build_template(line, layers, sources, size, progress)`` builds a template of the line's kind (injected to keep
    this module free of I/O). Every row is scored on the same cached test features.
    """
    from hetmm.pipeline import score_cached

    subset = line.report.ablation_subset
    if subset != "all":
        keep = (test["subset"] == subset).to_numpy()
        if not keep.any():
            raise ConfigError(f"report.ablation_subset: no test images in subset {subset!r}")
        test, masks = test[keep].reset_index(drop=True), masks[keep]
    labels = (test["label"] == "defect").to_numpy()
    shas = list(test["sha256"])
    batch = line.features.batch_size

    def row(name: str, variant: Inspector) -> dict:
        start = time.perf_counter()
        scores, maps = score_cached(variant, cache, shas, batch, progress, desc=name)
        metrics = summarise(scores, labels, maps.astype(np.float32), masks)
        return {"variant": name, "subset": subset, "sheets": int(variant.template.layers[0].shape[0]),
                "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                "aupro": metrics["aupro"], "seconds": round(time.perf_counter() - start, 1)}

    rows = [row(f"mode={mode}", inspector.with_settings(matching=replace(line.matching, mode=mode)))
            for mode in ABLATION_MODES]
    train_layers, _ = cache.load(train_shas, pixel_major=True)
    all_line = replace(line, templates=replace(line.templates, kind="ALL"))
    rows.append(row("template=ALL", inspector.with_settings(
        template=build_template(all_line, train_layers, train_shas, progress=progress))))
    pts_line = replace(line, templates=replace(line.templates, kind="PTS"))
    for size in line.report.ablation_sizes:
        tset = build_template(pts_line, train_layers, train_shas, size, progress=progress)
        rows.append(row(f"template=PTS-{size}", inspector.with_settings(template=tset)))
    return rows
