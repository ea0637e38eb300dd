"""HETMM and TFA-Net side by side: image AUROC, pixel AUROC, AU-PRO, training time and inference speed per line.

* ``--root DIR --line NAME``: a repository where ``dvc repro`` ran the ``method: tfa_net`` line ``NAME`` (and,
  with ``--hetmm-line``, the HETMM line on the same data). Its figures are read from the committed reports: the
  TFA-Net line's ablation table (TFA-Net and HETMM-ALL on the same cached features and test subset), its evaluation
  per subset (MTD: dev and holdout), ``tfa_net.json`` (training) and ``infer.json``; the HETMM line's evaluation.
* ``--hazelnut DIR``: a TFA-Net line with default settings (256 px, the CPU preset) built from scratch in a
  temporary folder: every stage, its report's ablation (HETMM-ALL beside it) and its timings.
* ``--timing N``: the CPU preset's training time on an MTD line of ``N`` training images at 256 px (``--mirror``).

    .venv/bin/python benchmarks/bench_tfa.py --root . --line demo_tfa --hetmm-line demo \\
        --line mtd_tfa --hetmm-line mtd --hazelnut ../shared/data/hazelnut_toy --timing 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from hetmm.config import load_params
from hetmm.io import write_json_atomic
from hetmm.pipeline.line import StageRun
from hetmm.pipeline.stages import stage, stages_for

RESULTS = Path(__file__).parent / "results" / "tfa.json"
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _line(root: Path, name: str, hetmm: str | None) -> dict:
    reports = root / "reports" / name
    rows = pd.read_csv(reports / "ablation.csv").to_dict("records")
    training, infer = _read(reports / "tfa_net.json"), _read(reports / "infer.json")
    out = {"ablation": rows, "training_seconds": training.get("seconds"), "steps": training.get("steps"),
           "train_images": training.get("train_images"), "parameters": training.get("parameters"),
           "tfa_images_per_second": infer.get("images_per_second")}
    by = {r["variant"]: r for r in rows}
    if "method=hetmm template=ALL" in by:  # the ablation scores each variant on the same images: a fair ratio
        out["tfa_over_hetmm_inference_speed"] = round(by["method=hetmm template=ALL"]["seconds"] /
                                                      max(by["method=tfa_net"]["seconds"], 1e-9), 2)
    out["tfa_net"] = _subsets(_read(reports / "evaluation.json"))
    if hetmm is not None:
        out["hetmm"] = _subsets(_read(root / "reports" / hetmm / "evaluation.json"))
        out["hetmm"]["images_per_second"] = _read(root / "reports" / hetmm / "infer.json").get("images_per_second")
    return out


def _subsets(evaluation: dict) -> dict:
    return {name: {m: body.get(m) for m in METRICS} for name, body in (evaluation.get("subsets") or {}).items()}


def _fresh(tmp: Path, name: str, entry: dict, stages: tuple[str, ...]) -> tuple[Path, dict]:
    root = tmp / name
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "product_lines": {name: entry}}))
    params = load_params(root / "params.yaml")
    out = {}
    for name_ in stages:
        start = time.perf_counter()
        out[name_] = stage(name_)(StageRun.for_line(params, name, root, "cpu", progress=True, stage=name_))
        out[name_]["stage_seconds"] = round(time.perf_counter() - start, 1)
    return root, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--line", action="append", default=[], help="a method: tfa_net line of --root")
    parser.add_argument("--hetmm-line", action="append", default=[], help="the HETMM line on the same data, "
                        "one per --line")
    parser.add_argument("--hazelnut", type=Path)
    parser.add_argument("--timing", type=int, help="training images of the timed MTD line")
    parser.add_argument("--mirror", default="/work/shared/data/mtd")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result: dict = {"command": " ".join(["benchmarks/bench_tfa.py", *sys.argv[1:]])}
    for name, hetmm in zip(args.line, args.hetmm_line + [None] * len(args.line)):
        result[name] = _line(args.root, name, hetmm)
    with tempfile.TemporaryDirectory() as tmp:
        if args.hazelnut is not None:
            entry = {"method": "tfa_net", "data": {"source": "folder", "path": str(args.hazelnut.resolve())},
                     "report": {"overlays": 0, "ablation": True}}
            root, _ = _fresh(Path(tmp), "hazelnut", entry, stages_for("tfa_net"))
            result["hazelnut"] = _line(root, "hazelnut", None)
        if args.timing is not None:
            entry = {"method": "tfa_net", "data": {"source": "mtd", "mirror": args.mirror, "limit": args.timing,
                                                  "subset": "dev"}}
            _, out = _fresh(Path(tmp), "timing", entry, ("download", "validate", "tune", "extract", "train"))
            result["timing"] = {k: out["train"].get(k) for k in ("train_images", "steps", "epochs", "seconds",
                                                                 "parameters", "settings")}
            result["timing"]["extract_seconds"] = out["extract"]["stage_seconds"]
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "ablation"} if isinstance(v, dict) else v)
                      for k, v in result.items()}, indent=2))
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
