"""Stage ``report``: metrics, the deployed threshold, curves, overlays, per-defect table, ablation and model card.

Reads ``outputs/<line>/`` (scores and maps), the test masks, the stage records, ``models/<line>/calibration.json``
and the ``threshold`` / ``report`` settings; writes ``reports/<line>/`` (``metrics.json`` and ``evaluation.json``
(:func:`~hetmm.pipeline.evaluation.dvc_metrics`), ``plots/*.csv``,
``roc.png``, ``pro.png``, ``scores.png``, ``overlays/``, ``per_defect.csv``, ``ablation.csv``,
``model_card.{md,json}``) and
``models/<line>/threshold.json`` (read by ``hetmm predict``; both JSON files: :mod:`hetmm.pipeline.evaluation`).
Recomputes everything on every run (cheap); the ablation is the only part that reads the template and features
again. Every file is written to a staging folder and the version is committed as one unit
(:class:`hetmm.pipeline.deploy.Release`), so a failing or killed run leaves the previous report whole.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from importlib import metadata

import numpy as np
import pandas as pd

from hetmm.core.metrics import pro_points, roc_points
from hetmm.data.manifest import manifest_hash, read_source_record
from hetmm.errors import DataError
from hetmm.io import atomic_path, spreadsheet_safe, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline import deploy, evaluation, gate, panels
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
    verdict = gate.check(line, paths, test[labelled], scores[labelled], threshold["threshold"])
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

    release = deploy.Release(paths)  # every file below goes to staging; commit() puts them in place together
    reports = release.path(paths.reports / "metrics.json").parent
    write_json_atomic(reports / "evaluation.json", metrics)
    inference = read_json(paths.reports / "infer.json")
    write_json_atomic(reports / "metrics.json", {**evaluation.dvc_metrics(metrics),
                                                 **evaluation.speed_metrics(inference)})
    if verdict["blessed"]:  # a refused version leaves the last blessed threshold (and model, gate.bless) in place
        write_json_atomic(release.path(paths.threshold), threshold)
    with atomic_path(reports / "per_defect.csv") as tmp:
        spreadsheet_safe(pd.DataFrame(per_type)).to_csv(tmp, index=False)
    with atomic_path(reports / "ablation.csv") as tmp:  # header only when report.ablation is off
        spreadsheet_safe(pd.DataFrame(table, columns=ABLATION_COLUMNS)).to_csv(tmp, index=False)
    plots.report_curves(reports, line.name, roc, pro, metrics, s_l, y_l, threshold["threshold"])
    groups = {**panels.score_groups(test, scores),
              "calibration normals": np.asarray(calibration["image"].get("normal_scores", []), dtype=np.float64)}
    plots.score_histogram_png(reports / "scores.png", {k: v for k, v in groups.items() if len(v)},
                              threshold["threshold"], f"{line.name}: test image scores")
    written = panels.report_panels(ctx, test, scores, maps, masks, threshold,
                                   release.folder(paths.reports / "overlays"))

    timings = {"extract": read_json(paths.reports / "extract.json").get("seconds"),
               method.model_stage: model.get("seconds"),
               "infer": inference.get("seconds")}
    timings["report"] = round(time.perf_counter() - start, 2)
    df = manifest(paths)
    card = {
        "title": f"{method.title} model card",
        "product_line": line.name,
        "method": str(line.method),
        "code_version": model_card.code_version(),
        "data": {"source": read_source_record(paths.data) or "not recorded (copy made before hetmm recorded it)",
                 "manifest_sha256": manifest_hash(df), "images": int(len(df)), "test_images": int(len(test)),
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
        "throughput": model_card.throughput_section(inference.get("speed")),
        "inference": inference,
        "environment": _environment(),
        "params": {"device": ctx.params.device, **json.loads(json.dumps(asdict(line), default=list))},
        "overlays": [str(p.relative_to(reports)) for p in written],
    }
    model_card.model_card(reports / "model_card.md", reports / "model_card.json", card)
    release.commit()  # the report and (when blessed) the threshold, as one unit; then the gate's record
    gate.promote(line, paths, verdict, test[labelled], scores[labelled], threshold)
    return metrics


def _environment() -> dict:
    # versions from package metadata: importing torch here would cost seconds (the device is in ``inference``)
    return {"python": platform.python_version(), "torch": metadata.version("torch"), "host_cpus": os.cpu_count()}
