"""Evaluation for the report stage: ground-truth masks, metrics per subset and per defect type, the decision.

The deployed decision (:func:`choose_threshold`) is an image threshold plus a pixel threshold for defect masks and
the score range for normalised scores. The pixel threshold and the range always come from the calibrate stage
(``models/<line>/calibration.json``: validation normals and synthetic defects); the image threshold does too unless
the rule is ``manual`` or an oracle rule (:attr:`ThresholdRule.oracle <hetmm.modes.ThresholdRule.oracle>`, read off
the test labels, flagged ``oracle``); each rule is defined once in :data:`hetmm.core.thresholds.RULES`. A part is
flagged when ``score >= threshold``; a flagged part's mask is its map ``>= pixel_threshold``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from hetmm.config import ProductLine, ThresholdConfig
from hetmm.core.metrics import UndefinedMetricError, as_numpy, aupro, image_auroc, pixel_auroc, summarise
from hetmm.core.thresholds import RULES
from hetmm.data.images import load_mask
from hetmm.data.manifest import UNLABELLED
from hetmm.errors import DataError
from hetmm.modes import ThresholdRule
from hetmm.pipeline.settings import calibration_key

PIXEL_METRICS = ("pixel_auroc", "aupro", "pro_official")


def load_calibration(path: Path, line: ProductLine, train: list[str]) -> dict:
    """The calibrate stage's record, refused when missing, incomplete, or made for other settings or training
    images than ``line`` and ``train`` (sha256) now have."""
    fix = f"run `hetmm calibrate {line.name}` (or `dvc repro calibrate@{line.name}`)"
    if not path.is_file():
        raise DataError(f"{path}: no calibration (thresholds from validation normals and synthetic defects); {fix}")
    try:
        record = json.loads(path.read_text())
        for section, key in (("image", "normal_fpr"), ("image", "synthetic_f1"), ("image", "min"), ("image", "max"),
                             ("pixel", "threshold")):
            float(record[section][key])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable or incomplete calibration ({type(exc).__name__}: {exc}); {fix}") from None
    if record.get("key") != calibration_key(line, train):
        raise DataError(f"{path}: made for other settings or training images than line {line.name!r} has now; {fix}")
    return record


def choose_threshold(rule: ThresholdConfig, scores: np.ndarray, labels: np.ndarray, calibration: dict) -> dict:
    """The deployed decision: ``{rule, source, oracle, threshold, pixel_threshold, normalisation: {min, max}}``
    plus the rule's own figures. ``scores`` / ``labels`` (the test split) are read by the oracle rules only."""
    image = calibration["image"]
    chosen = ThresholdRule(rule.rule)
    out: dict[str, Any] = {"rule": chosen.value, "source": RULES[chosen].source, "oracle": chosen.oracle}
    out.update(RULES[chosen].choose(rule.value, scores, labels, image))
    out["pixel_threshold"] = float(calibration["pixel"]["threshold"])
    out["normalisation"] = {"min": float(image["min"]), "max": float(image["max"])}
    if "normals" in calibration:  # cross-fitted: every normal's score, for predict's p-values
        out["calibration"] = {"scheme": calibration.get("scheme"), "n": len(image["normal_scores"]),
                              "scores": sorted(float(v) for v in image["normal_scores"])}
    return out


def decide(rule: ThresholdConfig, scores: np.ndarray, labels: np.ndarray, calibration: dict,
           model_hash: str | None) -> dict:
    """``threshold.json``: :func:`choose_threshold` plus the test ``confusion`` at it and the model it is for."""
    out = choose_threshold(rule, scores, labels, calibration)
    out.update(confusion=confusion(scores, labels, out["threshold"]), model_hash=model_hash)
    return out


def headline(summary: dict, decision: dict) -> dict:
    """``metrics.json``'s top level: the threshold-free ``summary`` (:func:`~hetmm.core.metrics.summarise`), the
    deployed ``threshold`` / ``threshold_rule`` / ``pixel_threshold`` with the test ``confusion`` and
    ``f1_at_threshold`` there, and the oracle figures under their own names: ``oracle_f1_max`` /
    ``oracle_f1_threshold``, F1-max with the threshold read off the test labels (optimistic, not deployable;
    ``summary``'s ``f1_max`` / ``f1_threshold`` are the same figures)."""
    counts = decision["confusion"]
    out = {**summary, "threshold": decision["threshold"], "threshold_rule": decision["rule"],
           "pixel_threshold": decision["pixel_threshold"], "confusion": counts, "f1_at_threshold": f1_at(counts),
           "oracle_f1_max": summary["f1_max"], "oracle_f1_threshold": summary["f1_threshold"]}
    if "guarantee" in decision:
        out["false_alarm_guarantee"] = promise(decision["guarantee"])
    return out


def promise(guarantee: dict) -> dict:
    """The conformal guarantee as metrics: the rate asked for, the rate promised, the n behind it, the smallest rate
    n supports, and whether n supports the rate asked for."""
    return {"requested_rate": guarantee["rate"], "promised_rate": round(guarantee["promised_rate"], 6),
            "calibration_normals": guarantee["n"], "smallest_rate": round(guarantee["smallest_rate"], 6),
            "supported": guarantee["supported"]}


HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "pro_official", "f1_at_threshold", "oracle_f1_max", "threshold",
            "pixel_threshold")


def dvc_metrics(evaluation: dict) -> dict:
    """``metrics.json``, the DVC metric that ``dvc exp show`` / ``metrics diff`` compare: the numeric headline
    figures and image AUROC, pixel AUROC and AU-PRO per test subset (dev / holdout); the full record, with counts,
    confusion and the reasons of undefined metrics, is ``evaluation.json``."""
    subsets = {name: {k: values[k] for k in HEADLINE[:3]}
               for name, values in evaluation["subsets"].items() if name != "all"}
    extra = {k: evaluation[k] for k in ("false_alarm_guarantee", "gate") if k in evaluation}
    return {**{k: evaluation[k] for k in HEADLINE}, **extra, **({"subsets": subsets} if subsets else {})}


SPEED_METRICS = ("images_per_second", "images_per_second_batch_1", "ms_per_image_batch_1", "ms_per_image_batch_8",
                 "backbone_ms_per_image", "work_images_per_second", "contract_met")


def speed_metrics(inference: dict) -> dict:
    """The infer stage's measured speed (:mod:`hetmm.pipeline.speed`) as ``metrics.json``'s ``speed`` block, so
    ``dvc exp show`` / ``metrics diff`` put it beside the accuracy; none when the record has no speed."""
    measured = inference.get("speed")
    return {"speed": {k: measured.get(k) for k in SPEED_METRICS}} if measured else {}


def predicted_mask(amap: np.ndarray, defective: bool, pixel_threshold: float) -> np.ndarray:
    """A part's defect mask: empty when it passed; else its map ``>= pixel_threshold``, and at least its peak
    (resizing, or a pixel threshold above the map, must not leave a flagged part without a region)."""
    if not defective:
        return np.zeros(amap.shape, dtype=bool)
    return amap >= min(pixel_threshold, float(amap.max()))


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    return {"true_positive": int((pred & labels).sum()), "false_positive": int((pred & ~labels).sum()),
            "true_negative": int((~pred & ~labels).sum()), "false_negative": int((~pred & labels).sum())}


def f1_at(counts: dict) -> float | None:
    """F1 (%) of the confusion counts at one threshold; None when there is no defect and no alarm."""
    tp = counts["true_positive"]
    denom = 2 * tp + counts["false_positive"] + counts["false_negative"]
    return 200.0 * tp / denom if denom else None


def scopes(test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(labelled, pixel)``, both [M] bool: the images with a good / defect label (the image metrics), and the
    labelled images whose pixels are known (the pixel metrics): good images and defect images with a mask."""
    labelled = (test["label"] != UNLABELLED).to_numpy()
    defect = (test["label"] == "defect").to_numpy()
    masked = (test["mask_path"].astype(str) != "").to_numpy()
    return labelled, labelled & (~defect | masked)


def summarise_scoped(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                     labelled: np.ndarray, pixel: np.ndarray) -> dict:
    """:func:`~hetmm.core.metrics.summarise` with the image metrics over ``labelled`` images and the pixel metrics
    over ``pixel`` images (:func:`scopes`; all [M]), plus ``n_masked_defects``, ``n_unmasked_defects`` and
    ``n_unlabelled``. A defect image without a mask would count all its pixels as normal, so it is left out."""
    out = summarise(scores[labelled], labels[labelled])
    masked = int((labels & pixel).sum())
    unmasked = int((labels & labelled).sum()) - masked
    pix = summarise(scores[pixel], labels[pixel], maps[pixel], masks[pixel])
    for name in PIXEL_METRICS:
        out[name] = pix[name]
        out["undefined"].pop(name, None)
        if name in pix["undefined"]:
            out["undefined"][name] = (f"none of the {unmasked} defect image(s) has a mask"
                                      if masked == 0 and unmasked else pix["undefined"][name])
    return {**out, "n_masked_defects": masked, "n_unmasked_defects": unmasked,
            "n_unlabelled": int((~labelled).sum())}


def metrics_by_subset(test: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> dict:
    """:func:`summarise_scoped` over every image and, when the split has them, over each subset (dev / holdout)."""
    labels = (test["label"] == "defect").to_numpy()
    labelled, pixel = scopes(test)
    out = {"all": summarise_scoped(scores, labels, maps, masks, labelled, pixel)}
    for subset in sorted(set(test["subset"]) - {"all"}):
        k = (test["subset"] == subset).to_numpy()
        out[subset] = summarise_scoped(scores[k], labels[k], maps[k], masks[k], labelled[k], pixel[k])
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
    scores: Any, labels: Any, groups: Sequence[str], maps: Any = None, masks: Any = None, pixel_ok: Any = None
) -> list[dict[str, Any]]:
    """Per defect type: that type's defective images against *all* good images.

    scores [M], labels [M] (True = defective), groups [M] (defect type per image; ignored for good
    images), optional maps / masks [M, H, W] and ``pixel_ok`` [M] (the images the pixel metrics may use, default
    all). Returns rows sorted by group: ``{group, n_images, n_good, image_auroc[, pixel_auroc, aupro]}``; a
    metric undefined on the subset is None.
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
    ok = np.ones_like(y) if pixel_ok is None else np.asarray(pixel_ok, dtype=bool)

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
            row["pixel_auroc"] = safe(pixel_auroc, a[subset & ok], m[subset & ok])
            row["aupro"] = safe(aupro, a[subset & ok], m[subset & ok])
        rows.append(row)
    return rows
