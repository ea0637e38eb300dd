"""Stage orchestration for one product line: download, validate, extract, template, infer, report.

Each function reads inputs from the line's folders, calls the library, and writes its outputs atomically.
The DVC stage scripts and the CLI call these; no model maths lives here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from hetmm.cache import FeatureCache, extract_to_cache
from hetmm.config import Params, ProductLine
from hetmm.data import load_mask, read_manifest
from hetmm.errors import DataError, HetmmError, TemplateMismatchError
from hetmm.features import FeatureExtractor
from hetmm.inspector import Inspector, pixel_major_, resolve_device
from hetmm.io import atomic_path, sha256_json, write_json_atomic
from hetmm.match_cache import MatchCache
from hetmm.scoring import match_plan
from hetmm.templates import TemplateSet, build_all, build_pts, hot_update, load_template, save_template


@dataclass(frozen=True)
class LinePaths:
    """Where a product line's artifacts live (relative to the repository root)."""

    data: Path
    features: Path
    models: Path
    outputs: Path
    reports: Path

    @classmethod
    def for_line(cls, name: str, root: str | Path = ".") -> "LinePaths":
        root = Path(root)
        return cls(root / "data" / name, root / "features" / name, root / "models" / name,
                   root / "outputs" / name, root / "reports" / name)

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.csv"

    @property
    def template(self) -> Path:
        return self.models / "template.pt"


def _manifest(paths: LinePaths) -> pd.DataFrame:
    if not paths.manifest.is_file():
        raise DataError(f"{paths.manifest}: no manifest; run the download stage first (`hetmm download <line>`)")
    return read_manifest(paths.manifest)


def _items(df: pd.DataFrame, paths: LinePaths) -> list[tuple[Path, str]]:
    return [(paths.data / p, sha) for p, sha in zip(df["path"], df["sha256"])]


# --------------------------------------------------------------------------- download / validate


def download(line: ProductLine, paths: LinePaths) -> dict:
    from hetmm.sources import fetch

    d = line.data
    options = {k: v for k, v in asdict(d).items() if k != "source" and v is not None}
    start = time.perf_counter()
    df = fetch(d.source, paths.data, **options)
    return {"images": len(df), "seconds": round(time.perf_counter() - start, 2)}


def validate(line: ProductLine, paths: LinePaths) -> None:
    from hetmm.validation import validate as run_suite

    result = run_suite(_manifest(paths), paths.data, paths.reports / "validation.json",
                       paths.reports / "validation.html")
    if not result.success:
        # one line (the CLI prints errors as one line); the report lists every failure
        listed = "; ".join(" ".join(str(f).split()) for f in result.failures[:5])
        more = f"; ... and {len(result.failures) - 5} more" if len(result.failures) > 5 else ""
        raise DataError(f"data validation failed for line {line.name!r}: {listed}{more} "
                        f"(details: {paths.reports / 'validation.html'})")


# --------------------------------------------------------------------------- extract


def extract(line: ProductLine, paths: LinePaths, device: str = "auto", progress: bool = True) -> dict:
    """Fill the per-image feature cache for every image of the line; only new images are computed."""
    df = _manifest(paths)
    extractor = FeatureExtractor(line.features, resolve_device(device))
    cache = FeatureCache(paths.features, extractor.digest)
    start = time.perf_counter()
    items = _items(df, paths)
    computed, reused = extract_to_cache(extractor, cache, items, line.features.batch_size, progress)
    pruned = cache.prune(sha for _, sha in items)
    stats = {"computed": computed, "reused": reused, "pruned": pruned, "digest": extractor.digest,
             "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(paths.reports / "extract.json", stats)
    return stats


# --------------------------------------------------------------------------- template


def _feature_digest(line: ProductLine) -> str:
    return sha256_json(line.features.fingerprint())[:16]


def _cache(line: ProductLine, paths: LinePaths) -> FeatureCache:
    return FeatureCache(paths.features, _feature_digest(line))


def _dtype(line: ProductLine) -> torch.dtype:
    return torch.float16 if line.features.dtype == "float16" else torch.float32


def build_template(line: ProductLine, layers: list[torch.Tensor], sources: list[str], size: int | None = None,
                   progress: bool = True) -> TemplateSet:
    """ALL or PTS template from per-layer train features ``[N, C_j, H_j, W_j]``."""
    feature = line.features.fingerprint()
    if line.templates.kind == "ALL":
        return build_all(layers, sources, feature)
    return build_pts(layers, size or line.templates.size, sources, feature, progress=progress)


def _plan_update(line: ProductLine, paths: LinePaths, sources: list[str]) -> tuple[TemplateSet | None, str]:
    """Decide between reuse, hot update and rebuild; returns (existing template or None, reason)."""
    if not paths.template.is_file():
        return None, "no previous template"
    try:
        old = load_template(paths.template, expect=line.features.fingerprint())
    except TemplateMismatchError as exc:
        # the same error type covers torn files; say which it is in the recorded reason
        try:
            load_template(paths.template)
        except HetmmError:
            return None, f"previous template unusable ({exc})"
        return None, f"previous template does not match the settings ({exc})"
    except HetmmError as exc:
        return None, f"previous template unusable ({exc})"
    if not line.templates.hot_update:
        return None, "templates.hot_update is off"
    if old.meta.get("kind") != line.templates.kind or (
            line.templates.kind == "PTS" and old.meta.get("size") != line.templates.size):
        return None, "template kind or size changed"
    removed = set(old.meta.get("sources", [])) - set(sources)
    if removed:
        return None, f"{len(removed)} training image(s) were removed"
    return old, "previous template is a subset of the training images"


def template(line: ProductLine, paths: LinePaths, progress: bool = True) -> dict:
    df = _manifest(paths)
    sources = list(df.loc[df["split"] == "train", "sha256"])
    if not sources:
        raise DataError(f"{paths.manifest}: line {line.name!r} has no training (good) images")
    cache = _cache(line, paths)
    start = time.perf_counter()
    old, reason = _plan_update(line, paths, sources)
    if old is not None:
        known = set(old.meta.get("sources", []))
        new = [s for s in sources if s not in known]
        if not new:
            action, tset = "unchanged", old
        else:
            layers, _ = cache.load(new)
            action, tset = "hot_update", hot_update(old, layers, new)
    else:
        layers, _ = cache.load(sources, pixel_major=True)
        action, tset, new = "rebuild", build_template(line, layers, sources, progress=progress), sources
        del layers
    if action != "unchanged":
        save_template(paths.template, tset)
    info = {"action": action, "reason": reason, "kind": tset.meta["kind"], "sheets": int(tset.layers[0].shape[0]),
            "train_images": len(sources), "new_images": len(new) if action != "unchanged" else 0,
            "content_hash": tset.meta["content_hash"], "bytes": int(tset.nbytes),
            "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(paths.reports / "template.json", info)
    return info


# --------------------------------------------------------------------------- infer


def load_inspector(line: ProductLine, paths: LinePaths, device: str = "auto",
                   template_path: str | Path | None = None) -> Inspector:
    tset = load_template(template_path or paths.template, expect=line.features.fingerprint())
    # Re-laid out here, in place, while nothing else holds the loaded set: peak = template + one layer.
    return Inspector(line, pixel_major_(tset), resolve_device(device))


def score_cached(inspector: Inspector, cache: FeatureCache, shas: list[str], batch_size: int,
                 progress: bool = True, desc: str = "infer",
                 matches: MatchCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``[M]`` and float16 maps ``[M, H, W]`` for cached test images, batch by batch.

    With ``matches``, images whose earlier distances it holds are matched against the template's new sheets
    only (:mod:`hetmm.match_cache`), and this run's distances are added to it.
    """
    maps, scores = [], []
    for start in tqdm(range(0, len(shas), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = shas[start : start + batch_size]
        layers, boxes = cache.load(batch)
        found = matches.lookup(batch, inspector.device) if matches is not None else None
        if found is None:
            found = inspector.match(layers)
        elif matches.reuse < matches.sheets:
            found = found.merged(inspector.match(layers, first_sheet=matches.reuse))
        if matches is not None:
            matches.add(batch, found)
        out = inspector.finish(found, boxes)
        maps.append(out.maps.half().numpy())
        scores.append(out.scores.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def infer(line: ProductLine, paths: LinePaths, device: str = "auto", progress: bool = True) -> dict:
    df = _manifest(paths)
    test = df[df["split"] == "test"].reset_index(drop=True)
    inspector = load_inspector(line, paths, device)
    m = line.matching
    matches = MatchCache(inspector.template,
                         match_plan(m.forward_windows, m.backward_windows, m.alphas, m.weights, m.mode),
                         _feature_digest(line))
    matches.resume(paths.outputs / "matches.pt")
    start = time.perf_counter()
    scores, maps = score_cached(inspector, _cache(line, paths), list(test["sha256"]), line.features.batch_size,
                                progress, matches=matches)
    seconds = time.perf_counter() - start
    out = test[["path", "sha256", "label", "defect_type", "mask_path", "subset"]].copy()
    # float64 so the CSV holds each float32 score exactly: the threshold chosen from these values is then a score
    # the model can produce, and `score >= threshold` gives the same verdict in float32 (predict) and float64
    out["score"] = scores.astype(np.float64)
    paths.outputs.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.outputs / "scores.csv") as tmp:
        out.to_csv(tmp, index=False)
    with atomic_path(paths.outputs / "maps.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, maps)
    matches.save(paths.outputs / "matches.pt")
    stats = {"images": len(test), "seconds": round(seconds, 2),
             "images_per_second": round(len(test) / max(seconds, 1e-9), 2),
             "device": str(inspector.device), "template_hash": inspector.template.meta["content_hash"],
             "matching": matches.summary()}
    write_json_atomic(paths.reports / "infer.json", stats)
    return stats


# --------------------------------------------------------------------------- report helpers


def gt_masks(test: pd.DataFrame, paths: LinePaths, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth masks ``[M, H, W]`` bool at the model resolution (official: bilinear resize, >= 0.5)."""
    from PIL import Image

    height, width = size
    out = np.zeros((len(test), height, width), dtype=bool)
    for i, mask_path in enumerate(test["mask_path"]):
        if isinstance(mask_path, str) and mask_path:
            mask = load_mask(paths.data / mask_path)
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
            out[i] = np.asarray(resized) >= 128
    return out


def line_settings(params: Params, line: ProductLine) -> dict:
    return {"device": params.device, **json.loads(json.dumps(asdict(line), default=list))}


def environment() -> dict:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(),
            "host_cpus": os.cpu_count()}


# --------------------------------------------------------------------------- report


def report(params: Params, line: ProductLine, paths: LinePaths, device: str = "auto", progress: bool = True) -> dict:
    """metrics.json, thresholds, curves, overlays, per-defect table, optional ablation and the model card."""
    from hetmm import evaluation, reports
    from hetmm.data import manifest_hash
    from hetmm.metrics import pro_points, roc_points

    scores_path, maps_path = paths.outputs / "scores.csv", paths.outputs / "maps.npy"
    if not scores_path.is_file() or not maps_path.is_file():
        raise DataError(f"{paths.outputs}: no inference outputs; run the infer stage first")
    test = pd.read_csv(scores_path, keep_default_na=False)
    scores = test["score"].to_numpy(dtype=np.float64)
    maps = np.load(maps_path).astype(np.float32)
    labels = (test["label"] == "defect").to_numpy()
    masks = gt_masks(test, paths, line.features.image_size)
    start = time.perf_counter()

    by_subset = evaluation.metrics_by_subset(test, scores, maps, masks)
    threshold = evaluation.choose_threshold(line.threshold, scores, labels)
    threshold["confusion"] = evaluation.confusion(scores, labels, threshold["threshold"])
    threshold["template_hash"] = _read_json(paths.reports / "template.json").get("content_hash")
    metrics = {**by_subset["all"], "threshold": threshold["threshold"], "subsets": by_subset}
    write_json_atomic(paths.reports / "metrics.json", metrics)
    write_json_atomic(paths.models / "threshold.json", threshold)

    per_type = reports.per_group_metrics(scores, labels, test["defect_type"].to_numpy(), maps, masks)
    with atomic_path(paths.reports / "per_defect.csv") as tmp:
        pd.DataFrame(per_type).to_csv(tmp, index=False)

    roc = roc_points(scores, labels) if 0 < labels.sum() < len(labels) else {"fpr": [], "tpr": []}
    reports.write_plot_csv(paths.reports / "plots" / "roc.csv", {"fpr": roc["fpr"], "tpr": roc["tpr"]})
    reports.curve_png(paths.reports / "roc.png", {"image ROC": (roc["fpr"], roc["tpr"])},
                      "false positive rate", "true positive rate", f"{line.name}: image ROC")
    pro = pro_points(maps, masks) if masks.any() else {"fpr": [], "pro": []}  # no defect masks: empty curve
    reports.write_plot_csv(paths.reports / "plots" / "pro.csv", {"fpr": pro["fpr"], "pro": pro["pro"]})
    reports.curve_png(paths.reports / "pro.png", {"PRO": (pro["fpr"], pro["pro"])},
                      "false positive rate", "per-region overlap", f"{line.name}: PRO (FPR <= 0.3)")
    overlays = _write_overlays(line, paths, test, scores, maps, masks, threshold["threshold"])

    ablation_rows = []
    if line.report.ablation:
        inspector = load_inspector(line, paths, device)
        df = _manifest(paths)
        ablation_rows = evaluation.ablation(line, inspector, _cache(line, paths),
                                            list(df.loc[df["split"] == "train", "sha256"]), test, masks,
                                            build_template, progress)
    columns = ["variant", "subset", "sheets", "image_auroc", "pixel_auroc", "aupro", "seconds"]
    with atomic_path(paths.reports / "ablation.csv") as tmp:  # header only when report.ablation is off
        pd.DataFrame(ablation_rows, columns=columns).to_csv(tmp, index=False)

    timings = {stage: _read_json(paths.reports / f"{stage}.json").get("seconds")
               for stage in ("extract", "template", "infer")}
    timings["report"] = round(time.perf_counter() - start, 2)
    card = {
        "product_line": line.name,
        "code_version": reports.code_version(),
        "data": {"manifest_sha256": manifest_hash(_manifest(paths)), "images": int(len(_manifest(paths))),
                 "test_images": int(len(test)), "defective": int(labels.sum())},
        "template": _read_json(paths.reports / "template.json"),
        "threshold": threshold,
        "metrics": by_subset,
        "per_defect_type": per_type,
        "ablation": ablation_rows,
        "timings_seconds": timings,
        "inference": _read_json(paths.reports / "infer.json"),
        "environment": environment(),
        "params": line_settings(params, line),
        "overlays": [str(p.relative_to(paths.reports)) for p in overlays],
    }
    reports.model_card(paths.reports / "model_card.md", paths.reports / "model_card.json", card)
    return metrics


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_overlays(line: ProductLine, paths: LinePaths, test: pd.DataFrame, scores: np.ndarray,
                    maps: np.ndarray, masks: np.ndarray, threshold: float) -> list[Path]:
    """Heatmap panels for the worst cases (missed defects, false alarms) and the best (clearest) ones."""
    from hetmm import reports
    from hetmm.data import load_image

    count = line.report.overlays
    if count <= 0:
        return []
    labels = (test["label"] == "defect").to_numpy()
    order_def = [i for i in np.argsort(scores) if labels[i]]  # lowest-scoring defects first
    order_good = [i for i in np.argsort(-scores) if not labels[i]]  # highest-scoring good images first
    half = max(1, count // 2)
    picks = {"worst_defect": order_def[:half], "worst_good": order_good[:half],
             "best_defect": order_def[::-1][:half]}
    vmin, vmax = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    height, width = line.features.image_size
    out_dir = paths.reports / "overlays"
    if out_dir.is_dir():
        for old in out_dir.glob("*.png"):
            old.unlink()
    written = []
    for kind, indices in picks.items():
        for rank, i in enumerate(indices):
            image = load_image(paths.data / test["path"][i]).resize((width, height))
            pred = maps[i] >= threshold  # the image is flagged exactly where its map reaches the threshold
            panel = reports.panel(image, maps[i], masks[i], None,
                                  f"{kind} #{rank + 1}: {test['defect_type'][i]} score {scores[i]:.3f}",
                                  vmin=vmin, vmax=vmax, pred_mask=pred)
            path = out_dir / f"{kind}_{rank + 1}.png"
            with atomic_path(path) as tmp:
                panel.save(tmp, format="PNG")
            written.append(path)
    return written
