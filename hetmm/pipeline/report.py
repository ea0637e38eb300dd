"""Stage ``report``: metrics, the deployed threshold, curves, overlays, per-defect table, ablation and model card.

Reads ``outputs/<line>/`` (scores and maps), the test masks, the stage records, ``models/<line>/calibration.json``
and the ``threshold`` / ``report`` settings; writes ``reports/<line>/`` (``metrics.json``, ``plots/*.csv``,
``roc.png``, ``pro.png``, ``overlays/``, ``per_defect.csv``, ``ablation.csv``, ``model_card.{md,json}``) and
``models/<line>/threshold.json`` (read by ``hetmm predict``; both JSON files: :mod:`hetmm.pipeline.evaluation`).
Recomputes everything on every run (cheap); the ablation is the only part that reads the template and features
again. Every figure is computed before the first file is replaced, so a failing run leaves the previous report whole.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from hetmm.core.metrics import pro_points, roc_points
from hetmm.data.images import load_image
from hetmm.data.manifest import manifest_hash
from hetmm.errors import DataError
from hetmm.io import atomic_path, write_json_atomic
from hetmm.pipeline import evaluation
from hetmm.pipeline.line import StageRun, manifest, read_json, split
from hetmm.pipeline.settings import tuned_keys
from hetmm.report import model_card, overlays, plots

OVERLAY_GROUPS = ("worst_defect", "worst_good", "best_defect")
ABLATION_COLUMNS = ["variant", "subset", "sheets", "image_auroc", "pixel_auroc", "aupro", "seconds"]


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    scores_path, maps_path = paths.outputs / "scores.csv", paths.outputs / "maps.npy"
    if not scores_path.is_file() or not maps_path.is_file():
        raise DataError(f"{paths.outputs}: no inference outputs; run the infer stage first")
    test = pd.read_csv(scores_path, keep_default_na=False)
    scores = test["score"].to_numpy(dtype=np.float64)
    maps = np.load(maps_path).astype(np.float32)
    labels = (test["label"] == "defect").to_numpy()
    masks = evaluation.gt_masks(test, paths.data, line.features.image_size)
    calibration = evaluation.load_calibration(paths.calibration, line, list(split(manifest(paths), "train")["sha256"]))
    start = time.perf_counter()
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        raise DataError(f"{maps_path}: non-finite scores or maps; re-run `hetmm infer {line.name}`")

    # everything is computed before the first file is replaced, so a failure leaves the previous report whole
    by_subset = evaluation.metrics_by_subset(test, scores, maps, masks)
    threshold = evaluation.decide(line.threshold, scores, labels, calibration,
                                  read_json(paths.reports / "template.json").get("content_hash"))
    metrics = {**evaluation.headline(by_subset["all"], threshold), "subsets": by_subset}
    per_type = evaluation.per_group_metrics(scores, labels, test["defect_type"].to_numpy(), maps, masks)
    roc = roc_points(scores, labels) if 0 < labels.sum() < len(labels) else {"fpr": [], "tpr": []}
    pro = pro_points(maps, masks) if masks.any() else {"fpr": [], "pro": []}  # no defect masks: empty curve
    ablation_rows = _ablation(ctx, test, masks)

    write_json_atomic(paths.reports / "metrics.json", metrics)
    write_json_atomic(paths.threshold, threshold)
    with atomic_path(paths.reports / "per_defect.csv") as tmp:
        pd.DataFrame(per_type).to_csv(tmp, index=False)
    with atomic_path(paths.reports / "ablation.csv") as tmp:  # header only when report.ablation is off
        pd.DataFrame(ablation_rows, columns=ABLATION_COLUMNS).to_csv(tmp, index=False)
    plots.report_curves(paths.reports, line.name, roc, pro, metrics, scores, labels, threshold["threshold"])
    written = _overlays(ctx, test, scores, maps, masks, threshold)

    timings = {stage: read_json(paths.reports / f"{stage}.json").get("seconds")
               for stage in ("extract", "template", "infer")}
    timings["report"] = round(time.perf_counter() - start, 2)
    df = manifest(paths)
    card = {
        "product_line": line.name,
        "code_version": model_card.code_version(),
        "data": {"manifest_sha256": manifest_hash(df), "images": int(len(df)), "test_images": int(len(test)),
                 "defective": int(labels.sum())},
        "template": read_json(paths.reports / "template.json"),
        **model_card.decision_sections(threshold, calibration, by_subset["all"], tuned_keys(paths.settings)),
        "metrics": by_subset,
        "per_defect_type": per_type,
        "ablation": ablation_rows,
        "timings_seconds": timings,
        "inference": read_json(paths.reports / "infer.json"),
        "environment": _environment(),
        "params": {"device": ctx.params.device, **json.loads(json.dumps(asdict(line), default=list))},
        "overlays": [str(p.relative_to(paths.reports)) for p in written],
    }
    model_card.model_card(paths.reports / "model_card.md", paths.reports / "model_card.json", card)
    return metrics


def _overlays(ctx: StageRun, test: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
              decision: dict) -> list[Path]:
    """Panels (replacing the old) of the worst cases (missed defects, false alarms) and the best, as deployed."""
    out_dir = ctx.paths.reports / "overlays"
    for old in out_dir.glob("*.png") if out_dir.is_dir() else []:
        old.unlink()
    count = ctx.line.report.overlays
    if count <= 0:
        return []
    labels = (test["label"] == "defect").to_numpy()
    lowest_defects = [i for i in np.argsort(scores) if labels[i]]
    highest_good = [i for i in np.argsort(-scores) if not labels[i]]
    picks = dict(zip(OVERLAY_GROUPS, overlays.picks(count, lowest_defects, highest_good)))
    height, width = ctx.line.features.image_size
    flagged, pixel = scores >= decision["threshold"], decision["pixel_threshold"]
    cases = [overlays.OverlayCase(
        name=f"{group}_{rank + 1}", image=load_image(ctx.paths.data / test["path"][i]).resize((width, height)),
        amap=maps[i], mask=masks[i], score=None, pred_mask=evaluation.predicted_mask(maps[i], flagged[i], pixel),
        title=f"{group} #{rank + 1}: {test['defect_type'][i]} score {scores[i]:.3f} "
              f"{'flagged' if flagged[i] else 'passed'} (threshold {decision['threshold']:.3f})")
        for group, indices in picks.items() for rank, i in enumerate(indices)]
    vmin, vmax = overlays.anchored_scale(pixel)  # one scale for every panel, the pixel threshold in the middle
    return overlays.save_overlays(out_dir, cases, vmin=vmin, vmax=vmax, kind="panel", bar_threshold=pixel)


def _ablation(ctx: StageRun, test: pd.DataFrame, masks: np.ndarray) -> list[dict]:
    """The ablation table's rows (none when ``report.ablation`` is off)."""
    if not ctx.line.report.ablation:
        return []
    from hetmm.pipeline.ablation import ablation  # imported here: the rest of the report stage needs no torch
    from hetmm.pipeline.feature_cache import FeatureCache
    from hetmm.pipeline.infer import load_inspector
    from hetmm.pipeline.provenance import FeatureKey

    inspector = load_inspector(ctx.line, ctx.paths.template, ctx.device)
    cache = FeatureCache(ctx.paths.features, FeatureKey.of(ctx.line.features))
    train = list(split(manifest(ctx.paths), "train")["sha256"])
    return ablation(ctx.line, inspector, cache, train, test, masks, ctx.progress)


def _environment() -> dict:
    # versions from package metadata: importing torch here would cost seconds (the device is in ``inference``)
    return {"python": platform.python_version(), "torch": metadata.version("torch"), "host_cpus": os.cpu_count()}
