"""Stage ``report``: metrics, the deployed threshold, curves, overlays, per-defect table, ablation and model card.

Reads ``outputs/<line>/`` (scores and maps), the test masks, the stage records, ``models/<line>/calibration.json``
and the ``threshold`` / ``report`` settings; writes ``reports/<line>/`` (``metrics.json`` and ``evaluation.json``
(:func:`~hetmm.pipeline.evaluation.dvc_metrics`), ``plots/*.csv``,
``roc.png``, ``pro.png``, ``scores.png``, ``overlays/``, ``per_defect.csv``, ``ablation.csv``,
``model_card.{md,json}``) and
``models/<line>/threshold.json`` (read by ``hetmm predict``; both JSON files: :mod:`hetmm.pipeline.evaluation`).
Recomputes everything on every run (cheap); the ablation is the only part that reads the template and features
again. Every figure is computed before the first file is replaced, so a failing run leaves the previous report whole.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from hetmm.core.metrics import pro_points, roc_points
from hetmm.data.manifest import manifest_hash
from hetmm.errors import DataError
from hetmm.io import atomic_path, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline import evaluation, gate, panels
from hetmm.pipeline.line import StageRun, manifest, read_json, split
from hetmm.pipeline.settings import tuned_keys
from hetmm.report import model_card, plots

ABLATION_COLUMNS = ["variant", "subset", "sheets", "image_auroc", "pixel_auroc", "aupro", "seconds", "build_seconds"]

def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    scores_path, maps_path = paths.outputs / "scores.csv", paths.outputs / "maps.npy"
    if not scores_path.is_file() or not maps_path.is_file():
        raise DataError(f"{paths.outputs}: no inference outputs; run the infer stage first")
    test = pd.read_csv(scores_path, keep_default_na=False)
    scores = test["score"].to_numpy(dtype=np.float64)
    maps = np.load(maps_path).astype(np.float32)
    labels = (test["label"] == "defect").to_numpy()
    labelled, pixel = evaluation.scopes(test)  # unlabelled images are scored and shown, never in the metrics
    masks = evaluation.gt_masks(test, paths.data, line.features.image_size)
    calibration = evaluation.load_calibration(paths.calibration, line, list(split(manifest(paths), "train")["sha256"]))
    start = time.perf_counter()
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        raise DataError(f"{maps_path}: non-finite scores or maps; re-run `hetmm infer {line.name}`")

    # everything is computed before the first file is replaced, so a failure leaves the previous report whole
    by_subset = evaluation.metrics_by_subset(test, scores, maps, masks)
    method = spec(line.method)
    model = read_json(paths.reports / f"{method.model_file}.json")  # the model stage's record
    threshold = evaluation.decide(line.threshold, scores[labelled], labels[labelled], calibration,
                                  model.get("content_hash"))
    metrics = {**evaluation.headline(by_subset["all"], threshold), "subsets": by_subset}
    verdict = _gate(ctx, test[labelled], scores[labelled], threshold["threshold"])
    metrics["gate"] = {"verdict": verdict["verdict"], "blessed": verdict["blessed"],
                       "newly_missed": len(verdict["newly_missed"])}
    per_type = evaluation.per_group_metrics(scores[labelled], labels[labelled], test["defect_type"][labelled],
                                            maps[labelled], masks[labelled], pixel[labelled])
    s_l, y_l = scores[labelled], labels[labelled]
    roc = roc_points(s_l, y_l) if 0 < y_l.sum() < len(y_l) else {"fpr": [], "tpr": []}
    pro = pro_points(maps[pixel], masks[pixel]) if masks[pixel].any() else {"fpr": [], "pro": []}  # none: empty
    table = []
    if line.report.ablation:
        from hetmm.pipeline.ablation import line_ablation  # torch: only when the ablation runs

        table = line_ablation(line, paths, ctx.device, test, masks, ctx.progress)

    write_json_atomic(paths.reports / "evaluation.json", metrics)
    write_json_atomic(paths.reports / "metrics.json", evaluation.dvc_metrics(metrics))
    if verdict["blessed"]:  # a refused version leaves the last blessed threshold (and model, gate.bless) in place
        write_json_atomic(paths.threshold, threshold)
    with atomic_path(paths.reports / "per_defect.csv") as tmp:
        pd.DataFrame(per_type).to_csv(tmp, index=False)
    with atomic_path(paths.reports / "ablation.csv") as tmp:  # header only when report.ablation is off
        pd.DataFrame(table, columns=ABLATION_COLUMNS).to_csv(tmp, index=False)
    plots.report_curves(paths.reports, line.name, roc, pro, metrics, s_l, y_l, threshold["threshold"])
    groups = {**panels.score_groups(test, scores),
              "calibration normals": np.asarray(calibration["image"].get("normal_scores", []), dtype=np.float64)}
    plots.score_histogram_png(paths.reports / "scores.png", {k: v for k, v in groups.items() if len(v)},
                              threshold["threshold"], f"{line.name}: test image scores")
    written = panels.report_panels(ctx, test, scores, maps, masks, threshold)

    timings = {"extract": read_json(paths.reports / "extract.json").get("seconds"),
               method.model_stage: model.get("seconds"),
               "infer": read_json(paths.reports / "infer.json").get("seconds")}
    timings["report"] = round(time.perf_counter() - start, 2)
    df = manifest(paths)
    card = {
        "title": f"{method.title} model card",
        "product_line": line.name,
        "method": str(line.method),
        "code_version": model_card.code_version(),
        "data": {"manifest_sha256": manifest_hash(df), "images": int(len(df)), "test_images": int(len(test)),
                 "defective": int(labels.sum()), "defective_with_mask": int((labels & pixel).sum()),
                 "unlabelled": int((~labelled).sum()),
                 "unlabelled_flagged": int((scores[~labelled] >= threshold["threshold"]).sum())},
        "template": model,  # the template set's record, or TFA-Net's (kind tfa_net, one template image)
        "gate": verdict,
        **model_card.decision_sections(threshold, calibration, by_subset["all"], tuned_keys(paths.settings)),
        "metrics": by_subset,
        "per_defect_type": per_type,
        "ablation": table,
        "timings_seconds": timings,
        "inference": read_json(paths.reports / "infer.json"),
        "environment": _environment(),
        "params": {"device": ctx.params.device, **json.loads(json.dumps(asdict(line), default=list))},
        "overlays": [str(p.relative_to(paths.reports)) for p in written],
    }
    model_card.model_card(paths.reports / "model_card.md", paths.reports / "model_card.json", card)
    _promote(ctx, verdict, test[labelled], scores[labelled], threshold)
    return metrics


def _gate(ctx: StageRun, test: pd.DataFrame, scores: np.ndarray, threshold: float) -> dict:
    """The promotion gate's verdict on this version (labelled test images only), printed as one line."""
    current = dict(zip(test["sha256"], scores.tolist(), strict=True))
    verdict = gate.judge(ctx.line.gate, gate.load_baseline(ctx.paths), current,
                         dict(zip(test["sha256"], (test["label"] == "defect").tolist(), strict=True)), threshold,
                         dict(zip(test["sha256"], test["path"], strict=True)))
    print(f"{ctx.line.name}: {verdict['summary']}", file=sys.stderr)
    return verdict


def _promote(ctx: StageRun, verdict: dict, test: pd.DataFrame, scores: np.ndarray, threshold: dict) -> None:
    """Bless this version (the next baseline), or refuse it: exit 1 naming the images it newly misses."""
    paths, model_hash = ctx.paths, threshold["model_hash"]
    if verdict["blessed"]:
        gate.bless(paths, paths.models / f"{spec(ctx.line.method).model_file}.pt", model_hash, threshold["threshold"],
                   dict(zip(test["sha256"], scores.tolist(), strict=True)))
        return
    gate.refuse(paths, gate.load_baseline(paths) or {}, verdict, model_hash)
    raise DataError(f"{paths.models / gate.BLESSED}: {ctx.line.name} version {str(model_hash)[:12]} not deployed, "
                    f"{verdict['summary']}; predict keeps the last blessed version (fix the cause, or set "
                    "gate.mode to warn to deploy it anyway)")


def _environment() -> dict:
    # versions from package metadata: importing torch here would cost seconds (the device is in ``inference``)
    return {"python": platform.python_version(), "torch": metadata.version("torch"), "host_cpus": os.cpu_count()}
