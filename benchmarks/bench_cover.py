"""Tiny template sets: COVER against PTS and ALL on the same cached features, measured in one run per line.

For each line: the report stage's ablation (:func:`hetmm.pipeline.ablation.ablation`): every matching mode on the
line's template, ALL, PTS-K and COVER-K for each size, and nearest-patch matching over the COVER bank of 60 sheets,
each with image AUROC, pixel AUROC, AU-PRO, its scoring seconds and its build seconds. The figures the issue asks
for are derived from those rows: the gap of each K-sheet set to ALL, build time against PTS at the same K, and the
inference speed-up over ALL (and of patch matching over the full bank).

* ``--root DIR --line NAME``: a repository root where the line's stages up to ``infer`` have run (the MTD line of
  this repository: its features, settings and the dev half of the test split, holdout untouched).
* ``--hazelnut DIR`` / ``--demo``: build the line from scratch in a temporary folder (default settings,
  no tuning), then the same table.

    .venv/bin/python benchmarks/bench_cover.py --root . --line mtd --demo --hazelnut ../shared/data/hazelnut_toy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from hetmm.config import load_params
from hetmm.io import write_json_atomic
from hetmm.pipeline.ablation import line_ablation
from hetmm.pipeline.line import StageRun
from hetmm.pipeline.stages import stage

RESULTS = Path(__file__).parent / "results" / "cover.json"
SIZES = [10, 20, 40, 60, 200]


def _table(root: Path, name: str, sizes: list[int], subset: str) -> list[dict]:
    ctx = StageRun.for_line(load_params(root / "params.yaml"), name, root, "cpu", progress=True, stage="report")
    report = replace(ctx.line.report, ablation=True, ablation_sizes=tuple(sizes), ablation_subset=subset)
    ctx = replace(ctx, line=replace(ctx.line, report=report))
    import pandas as pd

    from hetmm.pipeline import evaluation

    test = pd.read_csv(ctx.paths.outputs / "scores.csv", keep_default_na=False)
    masks = evaluation.gt_masks(test, ctx.paths.data, ctx.line.features.image_size)
    return line_ablation(ctx.line, ctx.paths, ctx.device, test, masks)


def _fresh(tmp: Path, name: str, data: dict) -> Path:
    root = tmp / name
    root.mkdir(parents=True)
    entry = {"data": data, "templates": {"kind": "ALL"}, "tune": {"enabled": False}, "report": {"overlays": 0}}
    (root / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "product_lines": {name: entry}}))
    params = load_params(root / "params.yaml")
    for name_ in ("download", "validate", "tune", "extract", "template", "calibrate", "infer"):
        stage(name_)(StageRun.for_line(params, name, root, "cpu", progress=False, stage=name_))
    return root


def _derived(rows: list[dict]) -> dict:
    by = {r["variant"]: r for r in rows}
    ref = by["template=ALL"]
    out: dict = {}
    for size in sorted({int(v.split("-")[-1]) for v in by if v.startswith("template=COVER-")}):
        cover, pts = by[f"template=COVER-{size}"], by.get(f"template=PTS-{size}")
        out[f"K={size}"] = {
            "cover_gap_to_all": {m: round(cover[m] - ref[m], 2) for m in ("image_auroc", "pixel_auroc", "aupro")},
            "pts_gap_to_all": {m: round(pts[m] - ref[m], 2) for m in ("image_auroc", "pixel_auroc", "aupro")},
            "build_cover_over_pts": round(cover["build_seconds"] / max(pts["build_seconds"], 1e-9), 3),
            "inference_speedup_over_all": round(ref["seconds"] / max(cover["seconds"], 1e-9), 2),
        }
    patch = [v for v in by if v.startswith("mode=patch template=COVER-")]
    if patch and "mode=patch" in by:
        full, bank = by["mode=patch"], by[patch[0]]
        out["patch"] = {"bank": patch[0],
                        "speedup_over_full_bank": round(full["seconds"] / max(bank["seconds"], 1e-9), 2),
                        "pixel_auroc_gap": round(bank["pixel_auroc"] - full["pixel_auroc"], 2),
                        "image_auroc_gap": round(bank["image_auroc"] - full["image_auroc"], 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--line", default="mtd")
    parser.add_argument("--subset", default="dev", help="test subset of --root's line (never the holdout)")
    parser.add_argument("--hazelnut", type=Path)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--recompute", action="store_true", help="rescore --root's line instead of reading its "
                        "committed reports/<line>/ablation.csv")
    args = parser.parse_args()
    result: dict = {"sizes": args.sizes, "command": " ".join(["benchmarks/bench_cover.py", *sys.argv[1:]])}
    if args.root is not None:  # the table `dvc repro report@<line>` committed, unless --recompute
        committed = args.root / "reports" / args.line / "ablation.csv"
        if args.recompute or not committed.is_file():
            rows = _table(args.root, args.line, args.sizes, args.subset)
        else:
            import pandas as pd

            rows = pd.read_csv(committed).to_dict("records")
        result[args.line] = {"subset": args.subset, "rows": rows, "derived": _derived(rows)}
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if args.hazelnut is not None:
            extra["hazelnut"] = {"source": "folder", "path": str(args.hazelnut)}
        if args.demo:
            extra["demo"] = {"source": "demo"}
        for name, data in extra.items():
            root = _fresh(Path(tmp), name, data)
            sizes = [k for k in args.sizes if k <= 60]  # these lines hold fewer training images
            rows = _table(root, name, sizes, "all")
            result[name] = {"subset": "all", "rows": rows, "derived": _derived(rows)}
    print(json.dumps({k: v.get("derived", v) if isinstance(v, dict) else v for k, v in result.items()}, indent=2))
    write_json_atomic(RESULTS, result)


if __name__ == "__main__":
    main()
