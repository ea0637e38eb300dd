"""Evaluation for the report stage: ground-truth masks, metrics per subset and per defect type, the threshold."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from hetmm.config import ThresholdConfig
from hetmm.core.metrics import UndefinedMetricError, as_numpy, aupro, f1_max, image_auroc, pixel_auroc, summarise
from hetmm.data.images import load_mask


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


def gt_masks(test: pd.DataFrame, data: Path, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth masks ``[M, H, W]`` bool at the model resolution (official: bilinear resize, >= 0.5)."""
    height, width = size
    out = np.zeros((len(test), height, width), dtype=bool)
    for i, mask_path in enumerate(test["mask_path"]):
        if isinstance(mask_path, str) and mask_path:
            mask = load_mask(data / mask_path)
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
            out[i] = np.asarray(resized) >= 128
    return out


def per_group_metrics(
    scores: Any, labels: Any, groups: Sequence[str], maps: Any = None, masks: Any = None
) -> list[dict[str, Any]]:
    """Per defect type: that type's defective images against *all* good images.

    scores [M], labels [M] (True = defective), groups [M] (defect type per image; ignored for good
    images), optional maps / masks [M, H, W]. Returns rows sorted by group: ``{group, n_images,
    n_good, image_auroc[, pixel_auroc, aupro]}``; a metric undefined on the subset is None.
    """
    s = as_numpy(scores).reshape(-1)
    y = as_numpy(labels).reshape(-1).astype(bool)
    g = np.asarray(list(groups), dtype=object)
    if not (s.shape == y.shape == g.shape):
        raise ValueError(f"scores, labels and groups must have one entry per image: {s.shape}, {y.shape}, {g.shape}")
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks, or neither")
    a = None if maps is None else as_numpy(maps)
    m = None if masks is None else as_numpy(masks)

    def safe(fn: Any, *args: Any) -> float | None:
        try:
            return fn(*args)
        except UndefinedMetricError:
            return None

    rows = []
    for group in sorted(set(g[y].tolist())):
        subset = (y & (g == group)) | ~y
        row: dict[str, Any] = {
            "group": group,
            "n_images": int(np.count_nonzero(y & (g == group))),
            "n_good": int(np.count_nonzero(~y)),
            "image_auroc": safe(image_auroc, s[subset], y[subset]),
        }
        if a is not None:
            row["pixel_auroc"] = safe(pixel_auroc, a[subset], m[subset])
            row["aupro"] = safe(aupro, a[subset], m[subset])
        rows.append(row)
    return rows
