"""Stage ``calibrate``: thresholds from good training images alone (no test labels), each scored by a model that did
not see it (:mod:`hetmm.pipeline.calibration`: leave-one-out for ALL templates, hash-stable folds for PTS / COVER,
TFA-Net's held-out share), and synthetic defects made on some of them. Writes ``models/<line>/calibration.json``:

* image thresholds: ``normal_fpr``, the split-conformal quantile of the n cross-fitted normal scores for the
  false-alarm rate ``threshold.value`` (default 1 %), with the ``guarantee`` it carries (:mod:`hetmm.core.conformal`:
  the rate promised, n, and whether n supports the rate asked for), and ``synthetic_f1`` (F1-max on normals +
  synthetic);
* ``normal_scores`` (every calibration normal, in the order of ``normals``): predict's p-values come from them;
* the pixel threshold for defect masks: F1-max over the pixels of the synthetic defects and their normals;
* ``min`` / ``max`` of those image scores, and the synthetic validation metrics (a label-free estimate);
* ``matching`` (ALL): how many images' leave-one-out distances were reused from the previous run
  (``models/<line>/calibration_matches.pt``, a cache outside DVC): after a hot update only the new sheets are matched.
"""

from __future__ import annotations

import time

import numpy as np

from hetmm.core import conformal
from hetmm.core.device import resolve_device
from hetmm.core.metrics import UndefinedMetricError, aupro, f1_max, image_auroc, pixel_auroc
from hetmm.core.thresholds import false_alarm_rate
from hetmm.io import write_json_atomic
from hetmm.pipeline.calibration import cross_fit
from hetmm.pipeline.line import StageRun, split, validated_manifest
from hetmm.pipeline.settings import calibration_key
from hetmm.report.progress import Phases


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    train = split(validated_manifest(paths, line.name), "train")
    start = time.perf_counter()
    phases = Phases(f"calibrate@{line.name}")  # phase lines even under `dvc repro` (--quiet)
    fit = cross_fit(line, paths, train, resolve_device(ctx.device), ctx.progress, phases)
    maps = np.concatenate([fit.base_maps, fit.defect_maps])
    masks = np.concatenate([np.zeros((len(fit.bases), *fit.masks.shape[1:]), dtype=bool), fit.masks])
    scores = np.concatenate([fit.base_scores, fit.defect_scores])
    labels = np.arange(len(scores)) >= len(fit.bases)
    record = _thresholds(line, fit.normal_scores, scores, labels, maps, masks)
    record.update(key=calibration_key(line, list(train["sha256"])), scheme=fit.scheme, models=fit.models,
                  normals=fit.normals, validation_normals=fit.bases, synthetic=len(fit.defect_scores),
                  families=fit.families, sheets=fit.sheets, seconds=round(time.perf_counter() - start, 2),
                  **({"matching": fit.reuse} if fit.reuse is not None else {}))
    write_json_atomic(paths.calibration, record)
    return {k: record[k] for k in ("image", "pixel", "synthetic_metrics")}


def _thresholds(line, normal: np.ndarray, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray,
                masks: np.ndarray) -> dict:
    """``normal``: every cross-fitted normal score (the conformal threshold); ``scores`` / ``labels`` / ``maps`` /
    ``masks``: the normals the defects were made on and the defects (F1 thresholds, synthetic metrics)."""
    rate = false_alarm_rate(line.threshold.rule, line.threshold.value)
    promise = conformal.guarantee(normal, rate)
    f1, by_f1 = f1_max(scores, labels)
    pixel_f1, pixel = f1_max(maps.ravel(), masks.ravel())
    metrics = {"image_auroc": image_auroc(scores, labels), "pixel_auroc": pixel_auroc(maps, masks)}
    try:
        metrics["aupro"] = aupro(maps, masks)
    except UndefinedMetricError:  # pragma: no cover - synthetic defects always have regions
        metrics["aupro"] = None
    return {
        "image": {"normal_fpr": promise["threshold"], "false_alarm_rate": rate, "guarantee": promise,
                  "synthetic_f1": float(by_f1),
                  "synthetic_f1_score": f1, "min": float(min(scores.min(), normal.min())),
                  "max": float(max(scores.max(), normal.max())),
                  "normal_scores": normal.tolist()},
        "pixel": {"threshold": float(pixel), "f1": pixel_f1},
        "synthetic_metrics": {k: (None if v is None else round(v, 4)) for k, v in metrics.items()},
    }
