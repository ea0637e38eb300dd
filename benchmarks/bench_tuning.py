"""Label-free tuning against the defaults and hand-tuned profiles, per product line (issue: lines out of the box).

For each line it runs ``hetmm run`` in a fresh folder with three entries and prints one table row each:

* ``default``: the data block only, tuning off (the settings of ``hetmm/config.py``);
* ``auto``: the data block only (the tuner chooses; thresholds from calibration);
* ``auto_margin``: the same with ``tune.confidence: 0``, the acceptance rule before the paired bootstrap (a gain
  above the fixed margin suffices);
* ``hand``: the hand-tuned profile (demo: its profile before the tuner; mtd: the frozen profile of params.yaml,
  chosen on the dev half). hazelnut_toy has none.

Every variant deploys the default ``normal_fpr`` threshold; metrics are threshold-free except ``f1_deployed`` (F1 at
the deployed threshold) next to the oracle F1-max. MTD reports the dev and holdout halves separately; the tuner
reads the training images only. Each row also records the infer stage's measured speed (batch 8 and 1) against the
throughput contract (``inspection``, default 10 images/s on the CPU) and the cost model's estimate for the choice.
``--search-only`` runs download, validate and tune alone (the search's own cost on a line's full training set, e.g.
MTD's 761 images) and records it under ``search``. Writes ``benchmarks/results/tuning.json``.

    OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python benchmarks/bench_tuning.py [--lines demo hazelnut mtd] \
        [--variants auto] [--search-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results" / "tuning.json"
REPORT = {"overlays": 0, "ablation": False}

DEMO_HAND = {  # the demo line's profile before the tuner existed (params.yaml up to issue 10)
    "features": {"backbone": "efficientnet_lite0", "layers": [1, 2, 3], "image_size": [128, 128], "pool": 1,
                 "normalisation": "imagenet"},
    "templates": {"kind": "PTS", "size": 10},
    "matching": {"mode": "mutual", "forward_windows": [5, 3, 3], "backward_windows": [3, 3, 1],
                 "alphas": [0.5, 0.5, 0.5], "weights": [1.0, 1.0, 0.5]},
    "post": {"blur_sigma": 2.0},
}


def data_blocks() -> dict[str, dict]:
    return {"demo": {"source": "demo", "seed": 0},
            "hazelnut": {"source": "folder", "path": str(SHARED / "hazelnut_toy")},
            "mtd": {"source": "mtd", "subset": "all", "mirror": str(SHARED / "mtd")}}


def hand_profile(line: str) -> dict | None:
    if line == "demo":
        return DEMO_HAND
    if line == "mtd":
        entry = yaml.safe_load((REPO / "examples/mtd/params.yaml").read_text())["product_lines"]["mtd"]
        return {k: v for k, v in entry.items() if k not in ("data", "report", "threshold", "tune")}
    return None


def _hetmm(root: Path, *args: str) -> None:
    exe = Path(sys.executable).with_name("hetmm")
    proc = subprocess.run([str(exe), *args, "--quiet"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    if proc.returncode:
        raise SystemExit(f"hetmm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def search_only(line: str, entry: dict) -> dict:
    """download, validate and tune alone: what the search costs on the line's whole training set."""
    with tempfile.TemporaryDirectory(prefix=f"search-{line}-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "product_lines": {line: entry}}))
        for stage in ("download", "validate"):
            _hetmm(root, stage, line)
        start = time.perf_counter()
        _hetmm(root, "tune", line)
        wall = time.perf_counter() - start
        tuning = json.loads((root / "reports" / line / "tuning.json").read_text())
    candidates = tuning.get("candidates", [])
    return {"train_images": len(tuning.get("train", [])), "templates": tuning["validation"]["templates"],
            "validation_normals": len(tuning["validation"]["normals"]),
            "stage_wall_seconds": round(wall, 1), "search_seconds": tuning.get("seconds"),
            "work_seconds": tuning.get("work_seconds"), "stopped": tuning.get("stopped"),
            "candidates": len(candidates),
            "too_slow": sum(c.get("excluded", "").startswith("too slow") for c in candidates),
            "estimated_images_per_second": tuning["best"].get("images_per_second"), "tuned": tuning["chosen"]}


def run_variant(line: str, entry: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"tuning-{line}-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "product_lines": {line: entry}}))
        start = time.perf_counter()
        _hetmm(root, "run", line)
        wall = time.perf_counter() - start
        reports = root / "reports" / line
        metrics = json.loads((reports / "evaluation.json").read_text())
        tuning = json.loads((reports / "tuning.json").read_text())
        calibration = json.loads((root / "models" / line / "calibration.json").read_text())
        speed = json.loads((reports / "infer.json").read_text()).get("speed", {})
    subsets = {name: {k: round(v[k], 2) for k in ("image_auroc", "pixel_auroc", "aupro") if v.get(k) is not None}
               for name, v in metrics["subsets"].items()}
    return {"subsets": subsets, "f1_deployed": round(metrics["f1_at_threshold"], 2),
            "oracle_f1_max": round(metrics["oracle_f1_max"], 2), "threshold_rule": metrics["threshold_rule"],
            "tuning_seconds": tuning.get("seconds"), "tuning_work_seconds": tuning.get("work_seconds"),
            "tuned": tuning.get("chosen", {}),
            "synthetic_validation": calibration["synthetic_metrics"], "wall_seconds": round(wall, 1),
            "speed": {k: speed.get(k) for k in ("images_per_second", "images_per_second_batch_1",
                                                 "backbone_ms_per_image", "work_images_per_second",
                                                 "contract_met")},
            "estimated_images_per_second": speed.get("contract", {}).get("estimated_images_per_second")}


def table(results: dict) -> str:
    """Markdown: one row per line, variant and subset."""
    rows = ["| line | settings | test subset | image AUROC | pixel AUROC | AU-PRO | F1 deployed / oracle | "
            "tuning wall s (work s) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for line, variants in results.items():
        for name in ("default", "auto", "auto_margin", "hand"):
            if name not in variants:
                continue
            out = variants[name]
            spent = "" if out["tuning_seconds"] is None or not name.startswith("auto") else (
                f"{out['tuning_seconds']:.0f}" + (f" ({out['tuning_work_seconds']:.0f})"
                                                  if out.get("tuning_work_seconds") else ""))
            for subset, m in out["subsets"].items():
                rows.append(f"| {line} | {name} | {subset} | {m['image_auroc']:.2f} | {m['pixel_auroc']:.2f} | "
                            f"{m['aupro']:.2f} | {out['f1_deployed']:.2f} / {out['oracle_f1_max']:.2f} | {spent} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", nargs="+", default=["demo", "hazelnut", "mtd"], choices=list(data_blocks()))
    parser.add_argument("--variants", nargs="+", default=["default", "auto", "hand"],
                        choices=["default", "auto", "auto_margin", "hand"],
                        help="rerun these; the others keep their recorded rows")
    parser.add_argument("--table", action="store_true", help="print the recorded results as the README's table")
    parser.add_argument("--search-only", action="store_true", help="download, validate and tune only (`search`)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.table:
        print(table(results))
        return
    for line in args.lines:
        data = data_blocks()[line]
        variants = {"default": {"data": data, "report": REPORT, "tune": {"enabled": False}},
                    "auto": {"data": data, "report": REPORT},
                    "auto_margin": {"data": data, "report": REPORT, "tune": {"confidence": 0}}}
        if hand := hand_profile(line):
            variants["hand"] = {"data": data, "report": REPORT, **hand, "tune": {"enabled": False}}
        results.setdefault(line, {})
        if args.search_only:
            out = results[line]["search"] = search_only(line, variants["auto"])
            print(f"{line}: search {out}", flush=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            continue
        for name, entry in variants.items():
            if name not in args.variants:
                continue
            out = run_variant(line, entry)
            results[line][name] = out
            for subset, m in out["subsets"].items():
                print(f"| {line} | {name} | {subset} | {m.get('image_auroc')} | {m.get('pixel_auroc')} | "
                      f"{m.get('aupro')} | {out['f1_deployed']} / {out['oracle_f1_max']} | "
                      f"{out['tuning_seconds']} | {out['wall_seconds']} | {out['speed']} |", flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
