"""Stage ``calibrate``: thresholds and score normalisation from good training images alone (no test labels).

The validation normals (the tuner's seeded share of the training images, :func:`hetmm.data.splits.validation_split`)
are scored against a template of the *other* training images, built like the line's own (same kind and size), or
by the line's TFA-Net (trained on those other images only), and so are synthetic defects made on them
(:mod:`hetmm.pipeline.validation_set`). Writes ``models/<line>/calibration.json``:

* image thresholds: ``normal_fpr`` (the ``1 - tune rate`` quantile of the normals' scores: the false-alarm rate
  allowed on good parts, ``threshold.value``, default 1 %) and ``synthetic_f1`` (F1-max on normals + synthetic);
* the pixel threshold for defect masks: F1-max over the pixels of the synthetic defects and the normals;
* ``min`` / ``max`` of those image scores, for the normalised score of ``hetmm predict``;
* the synthetic validation metrics of the deployed settings (a label-free estimate of how well the line works).

A template without the normals scores them as a new good part would be scored; the deployed template has more
sheets, so its scores are at most as high and the thresholds err toward fewer false alarms.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hetmm.core.device import resolve_device
from hetmm.core.inspector import Inspector, Scorer
from hetmm.core.metrics import UndefinedMetricError, aupro, f1_max, image_auroc, pixel_auroc
from hetmm.core.thresholds import false_alarm_rate
from hetmm.data.splits import validation_split
from hetmm.errors import DataError
from hetmm.io import write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import StageRun, split, validated_manifest
from hetmm.pipeline.line_template import build_template
from hetmm.pipeline.models import load_tfa_scorer, model_path
from hetmm.pipeline.provenance import FeatureKey
from hetmm.pipeline.settings import calibration_key
from hetmm.pipeline.validation_set import validation_images
from hetmm.report.progress import Phases

BATCH = 8


def run(ctx: StageRun) -> dict:
    line, paths, tune = ctx.line, ctx.paths, ctx.line.tune
    train = split(validated_manifest(paths, line.name), "train")
    templates, normals = validation_split(list(train["sha256"]), tune.validation_share, tune.max_validation,
                                          tune.seed)
    if not normals:
        raise DataError(f"{paths.manifest}: line {line.name!r} has {len(templates)} training image(s); calibration "
                        "holds some out and needs >= 2 (add good images, or set threshold.rule to manual)")
    start = time.perf_counter()
    key = FeatureKey.of(line.features)
    cache = FeatureCache(paths.features, key)
    phases = Phases(f"calibrate@{line.name}")  # phase lines even under `dvc repro` (--quiet)
    with phases.phase("scorer without the validation normals", len(templates), "training images") as phase:
        scorer, sheets = _scorer(ctx, cache, templates)
        phase.advance(len(templates))
    with phases.phase("validation normals", len(normals)) as phase:
        good_layers, boxes = cache.load(normals)
        good = scorer.score_features(good_layers, boxes)
        phase.advance(len(normals))
    with phases.phase("synthetic defects") as phase:
        synthetic = validation_images(line, paths, train, normals)
        images, defect_masks, families = synthetic.defects, synthetic.masks, synthetic.families
        phase.advance(len(images))
    maps, scores = [good.maps], [good.scores]
    with phases.phase("scoring synthetic defects", len(images)) as phase:
        for i in range(0, len(images), BATCH):
            out = scorer.predict(images[i : i + BATCH])
            maps.append(out.maps)
            scores.append(out.scores)
            phase.advance(len(out.scores))
    all_maps, all_scores = torch.cat(maps).numpy(), torch.cat(scores).numpy().astype(np.float64)
    masks = np.concatenate([np.zeros((len(normals), *defect_masks.shape[1:]), dtype=bool), defect_masks])
    labels = np.arange(len(all_scores)) >= len(normals)
    record = _thresholds(line, all_scores, labels, all_maps, masks)
    record.update(key=calibration_key(line, list(train["sha256"])), validation_normals=normals, templates=len(templates), synthetic=len(images),
                  families=families, sheets=sheets,
                  seconds=round(time.perf_counter() - start, 2))
    write_json_atomic(paths.calibration, record)
    return {k: record[k] for k in ("image", "pixel", "synthetic_metrics")}


def _scorer(ctx: StageRun, cache: FeatureCache, templates: list[str]) -> tuple[Scorer, int | None]:
    """The scorer of the validation normals, which must never have seen them: a HETMM template of the other
    training images (built like the line's), or the line's trained TFA-Net (trained on those same images)."""
    line, device = ctx.line, resolve_device(ctx.device)
    if spec(line.method).trained:  # fitted on the other training images already
        return load_tfa_scorer(line, model_path(line, ctx.paths), device, expect_images=templates), None
    layers, _ = cache.load(templates, pixel_major=True)
    tset = build_template(line, layers, templates, progress=ctx.progress)
    return Inspector(line, tset, device), int(tset.layers[0].shape[0])


def _thresholds(line, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> dict:
    normal = scores[~labels]
    rate = false_alarm_rate(line.threshold.rule, line.threshold.value)
    # "higher": an observed score, so no more than `rate` of the normals lie above it (with few normals, the max)
    by_fpr = float(np.quantile(normal, 1.0 - rate, method="higher"))
    f1, by_f1 = f1_max(scores, labels)
    pixel_f1, pixel = f1_max(maps.ravel(), masks.ravel())
    metrics = {"image_auroc": image_auroc(scores, labels), "pixel_auroc": pixel_auroc(maps, masks)}
    try:
        metrics["aupro"] = aupro(maps, masks)
    except UndefinedMetricError:  # pragma: no cover - synthetic defects always have regions
        metrics["aupro"] = None
    return {
        "image": {"normal_fpr": by_fpr, "false_alarm_rate": rate, "synthetic_f1": float(by_f1),
                  "synthetic_f1_score": f1, "min": float(scores.min()), "max": float(scores.max()),
                  "normal_scores": normal.tolist()},
        "pixel": {"threshold": float(pixel), "f1": pixel_f1},
        "synthetic_metrics": {k: (None if v is None else round(v, 4)) for k, v in metrics.items()},
    }
