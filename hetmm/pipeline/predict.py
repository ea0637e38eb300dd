"""``hetmm predict`` and ``hetmm update``: new images against a line's saved model, outside the DVC stages.

Both refuse a model (template set or TFA-Net) whose feature settings or code differ from the installed ones
(:func:`hetmm.pipeline.models.load_scorer`), naming what differs and
the command that rebuilds it. ``update`` is HETMM's hot update; a TFA-Net line is retrained instead.

``predict`` applies the decision the report stage saved in ``models/<line>/threshold.json`` for this very model:
a part is defective when its raw ``score >= threshold`` (``--threshold`` overrides that value only); its mask is the
map ``>= pixel_threshold`` (:func:`hetmm.pipeline.evaluation.predicted_mask`). Beside the raw score, ``p_value`` is the
conformal p-value of the score against the calibration normals saved with the threshold
(:func:`hetmm.core.conformal.p_values`: the share of them scoring at least as high, +1 corrected), so ``p_value <= a``
flags a good part with probability at most a; a threshold file written before the calibration scores were saved
gives no p-value (``null``) and says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hetmm.config import ClusterConfig, ProductLine
from hetmm.core.conformal import p_values
from hetmm.core.device import resolve_device
from hetmm.core.features import FeatureExtractor
from hetmm.core.templates import hot_update, save_template
from hetmm.data.images import IMAGE_EXTENSIONS, load_image
from hetmm.errors import ConfigError, DataError
from hetmm.io import atomic_path, remove_stale_temps, sha256_file, spreadsheet_safe, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline import cluster, deploy, gate
from hetmm.pipeline.evaluation import predicted_mask
from hetmm.pipeline.feature_cache import extract_images
from hetmm.pipeline.line import LinePaths, read_json
from hetmm.pipeline.line_template import load_current, record
from hetmm.pipeline.models import load_scorer, model_path
from hetmm.report.model_card import code_version
from hetmm.report.overlays import anchored_scale, panel


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files given directly or found (recursively, sorted) in the given folders."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():  # rglob does not follow links into folders, so a link loop is never walked
            named = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
            for odd in (p for p in named if not p.is_file()):  # a pipe would block the read for ever
                raise DataError(f"{odd}: not a regular file (a pipe, device or broken link) with an image name; "
                                "remove it or give the images one by one")
            found += named
        elif item.is_file():
            found.append(item)
        elif item.is_symlink():
            raise DataError(f"{item}: broken symbolic link to {item.readlink()} (the target does not exist); "
                            "restore the target or give the image itself")
        elif item.exists():  # a pipe or device would block the read or never end
            raise DataError(f"{item}: not a regular file or folder; give image files or folders")
        else:
            raise DataError(f"{item}: no such file or folder")
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} "
                        f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def saved_threshold(paths: LinePaths, line: str, model_hash: str) -> dict:
    """The report stage's decision (``threshold``, ``pixel_threshold``, ``rule``, calibration scores), refused unless
    it was made for this very model. Needed even with ``--threshold``: the pixel threshold and the score range
    come from it. Files written before the key was renamed name the model ``template_hash``."""
    rerun = f"run `dvc repro report@{line}` (or `hetmm infer {line}` and `hetmm report {line}`)"
    if not paths.threshold.is_file():
        raise DataError(f"{paths.threshold}: no saved threshold (predict reads the image and pixel thresholds and the "
                        f"score range from it); {rerun}")
    record = read_json(paths.threshold)
    chosen_for = record.get("model_hash", record.get("template_hash"))
    if chosen_for != model_hash:
        raise DataError(f"{paths.threshold}: the threshold was chosen for model {str(chosen_for)[:12]} "
                        f"but the line's model is {model_hash[:12]} (rebuilt since the last report); {rerun}")
    if "pixel_threshold" not in record:
        raise DataError(f"{paths.threshold}: written by an older report stage (no pixel threshold); {rerun}")
    values = (record.get("threshold"), record["pixel_threshold"])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
        raise DataError(f"{paths.threshold}: threshold and pixel_threshold must be finite numbers (a null or NaN "
                        f"would pass or flag every part); {rerun}")
    return record


def readable(files: Sequence[Path]) -> tuple[list[Path], list[dict]]:
    """The files that decode, and a failed record (path, error) per file that does not: one bad file must not stop
    the inspection of the others. Decoded once more by the extraction; a decode costs little next to the backbone."""
    good, failed = [], []
    for path in files:
        try:
            load_image(path)
        except (DataError, OSError, ValueError) as exc:
            failed.append({"path": str(path), "status": "failed", "error": str(exc)})
        else:
            good.append(path)
    return good, failed


def predict_images(line: ProductLine, paths: LinePaths, inputs: Sequence[Path], out: Path, *,
                   template_path: Path | None = None, threshold: float | None = None, device: str = "auto",
                   progress: bool = True, cluster_config: ClusterConfig | None = None) -> dict:
    """Score images; write predictions.csv/json, binary masks and overlays under ``out``. With an enabled
    ``cluster_config`` the features and the matching run on the cluster (:mod:`hetmm.pipeline.cluster`).

    Returns the summary with ``predictions``: one record per given image, in input order, ``status`` ``inspected``
    (verdict, score, p-value, defect area, mask and overlay files) or ``failed`` (the reason); a record is a
    flat mapping, so later fields (a p-value) add a key."""
    if threshold is not None and not np.isfinite(threshold):  # nan compares False: every part would pass
        raise ConfigError(f"--threshold: must be a finite score, got {threshold}")
    for folder in (out, out / "masks", out / "overlays"):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder}: --out names a folder for the predictions, but this is a file; choose another "
                            "--out")
    remove_stale_temps(*(d for d in (out, out / "masks", out / "overlays") if d.is_dir()), recursive=False)
    given = collect_images(inputs)
    files, failed = readable(given)
    if not files:
        raise DataError(f"none of the {len(failed)} images could be read; first: {failed[0]['path']}: "
                        f"{failed[0]['error']}")
    method = spec(line.method)
    model = template_path or model_path(line, paths)
    scorer = load_scorer(line, paths, device, model)
    refused = None
    if template_path is None and (blessed := gate.blessed_model(paths, scorer.version)) is not None:
        # the promotion gate refused the line's current model: keep deploying the last blessed one
        refused, model = scorer.version, blessed
        scorer = load_scorer(line, paths, device, model)
    extractor, match = scorer.extractor, scorer.match
    if cluster_config is not None and cluster.enabled(cluster_config):
        extractor = cluster.ExtractorPool(line.features, cluster_config)
        if method.sharding:  # a method without sharding (TFA-Net's small network) matches here
            match = cluster.ShardedMatcher(scorer.template, line.matching, cluster_config).match
    deploy.settle(paths, drop=False)  # a report killed after its commit point is finished first
    decision = saved_threshold(paths, line.name, scorer.version)
    rule = decision["rule"] if threshold is None else "--threshold"
    threshold = float(decision["threshold"]) if threshold is None else threshold
    pixel = float(decision["pixel_threshold"])
    reference = decision.get("calibration", {}).get("scores")
    vmin, vmax = anchored_scale(pixel)  # the same colours mean the same thing on every image
    version = scorer.version[:12]
    rows = []
    done = 0
    for table in (out / "predictions.json", out / "predictions.csv"):  # a killed run must not leave the previous
        table.unlink(missing_ok=True)  # run's table pointing at masks it overwrote; the table comes last
    for images, layers in extract_images(extractor, files, line.features.batch_size, progress, "predict"):
        scored = scorer.finish(match(layers), scorer.boxes(images))
        chunk = files[done : done + len(images)]
        done += len(images)
        for path, image, amap, score in zip(chunk, images, scored.maps.numpy(), scored.scores.numpy()):
            # back to the image's own geometry so masks line up with the file the user gave us
            full = np.asarray(Image.fromarray(amap).resize(image.size, Image.BILINEAR), dtype=np.float64)
            defective = float(score) >= threshold
            mask = predicted_mask(full, defective, pixel)
            stem = f"{len(rows):05d}_{path.stem}"
            with atomic_path(out / "masks" / f"{stem}.png") as tmp:
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
            verdict = "flagged" if defective else "passed"
            title = (f"{path.name}: {verdict}, score {score:.4g} vs threshold {threshold:.4g} "
                     f"({method.model_noun} {version})")
            with atomic_path(out / "overlays" / f"{stem}.png") as tmp:
                panel(image, full, None, None, title, pred_mask=mask, vmin=vmin, vmax=vmax,
                      threshold=pixel).save(tmp, format="PNG")
            p_value = float(p_values(np.array([score]), np.array(reference))[0]) if reference else None
            rows.append({"path": str(path), "status": "inspected", "verdict": "defective" if defective else "good",
                         "score": float(score), "p_value": p_value,
                         "defective": defective, "defect_area_fraction": float(mask.mean()),
                         "mask": f"masks/{stem}.png", "overlay": f"overlays/{stem}.png", "error": ""})
    order = {str(path): i for i, path in enumerate(given)}
    rows = sorted(rows + failed, key=lambda row: order[row["path"]])
    df = pd.DataFrame(rows)
    with atomic_path(out / "predictions.csv") as tmp:
        spreadsheet_safe(df).to_csv(tmp, index=False)
    inspected = df[df["status"] == "inspected"]
    summary = {"images": len(rows), "inspected": len(inspected), "failed": len(failed),
               "defective": int(inspected["defective"].astype(bool).sum()), "threshold": threshold,
               "threshold_rule": rule, "pixel_threshold": pixel, "guarantee": _guarantee(decision, rule),
               "calibration_normals": len(reference) if reference else None,
               "method": str(line.method), "model_hash": scorer.version, "model": str(model),
               **({"refused_model_hash": refused} if refused else {}),
               "code_version": code_version(), "out": str(out)}
    written = {row[kind] for row in rows for kind in ("mask", "overlay") if row.get(kind)}
    ours = "[0-9][0-9][0-9][0-9][0-9]_*.png"  # the names this function gives them
    for old in [*out.glob(f"masks/{ours}"), *out.glob(f"overlays/{ours}")]:
        if old.relative_to(out).as_posix() not in written:  # a previous run's image would look like this run's
            old.unlink()
    write_json_atomic(out / "predictions.json", {**summary, "predictions": rows})
    return {**summary, "predictions": rows}


def format_predictions(summary: dict) -> str:
    """The terminal answer: one line per image (verdict, score, conformal p-value, defect area, file; or why it
    failed), then the counts and what the threshold promises."""
    lines = [f"{'verdict':<9} {'score':>9} {'p':>6} {'area':>6}  image"]
    for row in summary["predictions"]:
        if row["status"] == "failed":
            said = row["error"] if row["error"].startswith(row["path"]) else f"{row['path']}: {row['error']}"
            lines.append(f"{'FAILED':<9} {'':>9} {'':>6} {'':>6}  {said}")
        else:
            p = "-" if row["p_value"] is None else f"{row['p_value']:.4f}"
            lines.append(f"{row['verdict']:<9} {row['score']:>9.4g} {p:>6} "
                         f"{100 * row['defect_area_fraction']:>5.1f}%  {row['path']}")
    lines.append(f"{summary['inspected']} inspected: {summary['defective']} defective, "
                 f"{summary['inspected'] - summary['defective']} good; {summary['failed']} could not be read. "
                 f"Threshold {summary['threshold']:.4g} ({summary['threshold_rule']}); masks, overlays and "
                 f"predictions.csv/json in {summary['out']}")
    lines.append(f"Promise: {summary['guarantee']}")
    return "\n".join(lines)


def _guarantee(decision: dict, rule: str) -> str:
    """What the deployed decision promises on good parts, in one sentence (printed by ``hetmm predict``)."""
    if rule == "--threshold":
        return "threshold given on the command line: no false-alarm rate is promised"
    if "guarantee" in decision:
        return decision["guarantee"]["statement"]
    if "calibration" not in decision:
        return (f"no stated false-alarm rate: {rule} threshold from a report written before calibration scores were "
                "saved (no p-values); rerun the report stage")
    return f"no stated false-alarm rate: rule {rule}; p-values compare with {decision['calibration']['n']} normals"


def update_template(line: ProductLine, paths: LinePaths, inputs: Sequence[Path], *,
                    template_path: Path | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Insert new good images into a saved template without rebuilding it (atomic replace)."""
    if not spec(line.method).hot_update:
        raise ConfigError(f"product_lines.{line.name}.method: {line.method} learns from its training images and has "
                          f"no template to hot-update; add the images to the line's data and run `dvc repro "
                          f"train@{line.name}`")
    files = collect_images(inputs)
    target = Path(template_path or paths.template)
    tset = load_current(line, target)
    known = set(tset.meta.get("sources", []))
    by_sha = {sha256_file(p): p for p in files}  # duplicates among the inputs count once
    fresh = [(sha, path) for sha, path in by_sha.items() if sha not in known]
    if not fresh:
        return {"template": str(target), "inserted": 0, "skipped_known": len(files)}
    start = time.perf_counter()
    extractor = FeatureExtractor(line.features, resolve_device(device))
    batches = [layers for _, layers in extract_images(extractor, [p for _, p in fresh], line.features.batch_size,
                                                      progress, "update")]
    layers = [torch.cat([b[j] for b in batches]).cpu() for j in range(len(batches[0]))]
    updated = hot_update(tset, layers, [sha for sha, _ in fresh])
    save_template(target, updated)
    if target.resolve() == paths.template.resolve():
        # the line's template changed outside the template stage: keep its record (read by the report and the
        # model card) describing the template that infer will now use
        write_json_atomic(paths.reports / "template.json", record(
            updated, "hot_update", "hetmm update: new good images given on the command line", len(fresh),
            round(time.perf_counter() - start, 2)))
    return {"template": str(target), "inserted": len(fresh), "skipped_known": len(files) - len(fresh),
            "sheets": int(updated.layers[0].shape[0]), "content_hash": updated.meta["content_hash"]}
