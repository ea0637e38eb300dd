"""MTD pipeline benchmark: `dvc repro` of the full MTD line (ALL and PTS-60), then the incremental case.

Each run happens in a throw-away copy of this repository (tracked files as they are in the working tree, less
``dvc.lock`` and committed pipeline outputs; a fresh `git init` and commit; an empty DVC cache), with the
venv's bin first on PATH, ``DVC_NO_ANALYTICS=1``, ``HETMM_MIRROR`` pointing at the MTD mirror and
``PYTHONPATH`` at the copy (so the copy's code runs even though the package is installed editable from this
checkout). The copy's ``params.yaml`` holds one line, ``mtd``,
pinned to the benchmark setting (source mtd, subset all; EfficientNet-Lite0, 256 px, blocks all, ImageNet
normalisation, layers 1-3, fwd 5/5/3, bwd 3/3/3, blur 4, image score max, threshold f1_max): the accuracy
tuning of params.yaml happens elsewhere, on the dev split, and nothing here is tuned.

Copy 1, full runs:
  1. ``dvc repro report@mtd`` with PTS-60: every stage from an empty copy (the *full run*).
  2. ``templates.kind: ALL`` in params.yaml, ``dvc repro report@mtd``: template, infer, report rerun.
Copy 2, incremental case (adding 10 good images to the MTD line), PTS-60:
  3. the committed split file with ``--hold-back`` train images (evenly spaced over the train list) removed,
     ``dvc repro report@mtd`` from an empty copy: the line as it was before the new images;
  4. the full split file restored (the "new upstream data": 10 more MT_Free train images), ``dvc repro``:
     download and validate rerun over the line, extract computes the 10 new images only, the template is
     hot-updated, infer and report rerun. Timed against run 1.
A second copy is used so that DVC's run-cache cannot restore any output of run 1 in run 4.
Copy 3 (unless --skip-all): steps 3 and 4 with an ALL template; its infer stage re-matches the test images
against the 10 new sheets only (hetmm/match_cache.py). Timed against step 3 of this copy (a full ALL run).

The stages run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy ''`` is given: on this shared
2-core machine libgomp's default spin-waiting made the infer stage 20x slower with 2 threads than with 1
(benchmarks/bench_inference.py measures the variants side by side).

Stage times are wall-clock from DVC's own output (the time between its "Running stage" lines, so a stage's
time includes DVC hashing and caching its outputs); the stages' internal seconds (reports/mtd/*.json) are
recorded too. Metrics are reports/mtd/metrics.json (image AUROC, pixel AUROC, AU-PRO per subset).

    .venv/bin/python benchmarks/bench_pipeline_mtd.py               # full MTD: writes results/pipeline_mtd.json
    .venv/bin/python benchmarks/bench_pipeline_mtd.py --limit 20    # smoke run: 20 train, <= 20 test per class
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "pipeline_mtd.json"
DEFAULT_MIRROR = "/work/shared/data/mtd"
SPLIT = Path("hetmm/resources/mtd_split.json")
TARGET_RATIO = 0.1
# Pipeline outputs (committed metrics and reports among them): left out of the copies, with dvc.lock.
GENERATED = ("data", "features", "models", "outputs", "reports")

LINE = {  # the benchmark setting (see the module docstring); keys as in README "Parameters"
    "data": {"source": "mtd", "subset": "all"},
    "features": {"backbone": "efficientnet_lite0", "layers": [1, 2, 3], "image_size": [256, 256],
                 "resize": "squash", "normalisation": "imagenet", "blocks": "all", "dtype": "float32",
                 "batch_size": 8},
    "templates": {"kind": "PTS", "size": 60, "hot_update": True},
    "matching": {"mode": "mutual", "forward_windows": [5, 5, 3], "backward_windows": [3, 3, 3],
                 "alphas": [0.5, 0.5, 0.5], "weights": [1.0, 1.0, 1.0]},
    "post": {"blur_sigma": 4.0, "image_score": "max"},
    "threshold": {"rule": "f1_max"},
    "report": {"overlays": 6, "ablation": False},
}


def split_file(limit: int | None, hold_back: int) -> tuple[dict, list[str]]:
    """The committed split, cut like ``data.limit`` would cut it, with ``hold_back`` train stems removed
    (evenly spaced). Returns (split, held-back stems)."""
    split = json.loads((REPO / SPLIT).read_text())
    if limit:
        split["train"] = split["train"][:limit]
        for part in ("dev", "holdout"):
            split[part] = {cls: stems[:limit] for cls, stems in split[part].items()}
    train = split["train"]
    if hold_back >= len(train):
        raise SystemExit(f"--hold-back {hold_back} leaves no train images (the line has {len(train)})")
    held = [train[min(len(train) - 1, round((i + 0.5) * len(train) / hold_back))] for i in range(hold_back)]
    split["train"] = [s for s in train if s not in set(held)]
    return split, held


def make_copy(dest: Path, split: dict, env: dict, line: dict = LINE) -> None:
    """Tracked files of this checkout (working-tree contents) except dvc.lock and pipeline outputs, a pinned
    params.yaml and ``split``; git init and commit."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if rel == "dvc.lock" or rel.split("/")[0] in GENERATED:
            continue  # committed pipeline results would let DVC skip stages of the "full" run
        if src.is_file():  # deleted-but-tracked files are skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    write_params(dest, line)
    (dest / SPLIT).write_text(json.dumps(split, indent=1) + "\n")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "benchmark copy"], cwd=dest, check=True, env=env)


def write_params(dest: Path, line: dict) -> None:
    (dest / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "product_lines": {"mtd": line}},
                                                     sort_keys=False))


def repro(dest: Path, env: dict, log: Path) -> dict:
    """``dvc repro report@mtd``; wall time, per-stage wall times from DVC's output, stages run / skipped."""
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    skipped: list[str] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro", "report@mtd"], cwd=dest, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for text in proc.stdout:
            now = time.perf_counter() - start
            out.write(f"[{now:8.2f}] {text}")
            if m := re.search(r"Running stage '([^']+)'", text):
                marks.append((m.group(1), now))
            elif m := re.search(r"Stage '([^']+)' (?:didn't change|is cached)", text):
                skipped.append(m.group(1))
        code = proc.wait()
    total = time.perf_counter() - start
    if code:
        raise SystemExit(f"dvc repro failed in {dest} (exit {code}); see {log}")
    ends = [t for _, t in marks[1:]] + [total]
    stages = {name.split("@")[0]: round(end - begin, 2) for (name, begin), end in zip(marks, ends)}
    reports = dest / "reports" / "mtd"
    card = _json(reports / "model_card.json")
    internal = {stage: _json(reports / f"{stage}.json").get("seconds") for stage in ("extract", "template", "infer")}
    internal["report"] = card.get("timings_seconds", {}).get("report")
    internal = {stage: value for stage, value in internal.items() if stage in stages}  # skipped: stale files
    return {"seconds": round(total, 2), "stage_seconds": stages, "stages_run": [n for n, _ in marks],
            "stages_skipped": skipped, "stage_internal_seconds": internal,
            "before_first_stage_seconds": round(marks[0][1], 2) if marks else None,
            **{stage: _json(reports / f"{stage}.json") if stage in stages else {"skipped": True}
               for stage in ("extract", "template", "infer")}, "metrics": metrics(reports)}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def metrics(reports: Path) -> dict:
    data = _json(reports / "metrics.json")
    keep = ("image_auroc", "pixel_auroc", "aupro")
    return {subset: {k: values.get(k) for k in keep} for subset, values in data.get("subsets", {}).items()}


def _print_run(name: str, run: dict) -> None:
    stages = ", ".join(f"{k} {v:.0f}" for k, v in run["stage_seconds"].items())
    print(f"{name}: {run['seconds']:.0f} s ({stages}); template {run['template'].get('action')}, "
          f"extract computed {run['extract'].get('computed', 'skipped')}", flush=True)
    for subset, values in run["metrics"].items():
        print(f"    {subset:<8} image AUROC {values['image_auroc']:.4f}  pixel AUROC {values['pixel_auroc']:.4f}  "
              f"AU-PRO {values['aupro']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/hetmm-bench-pipeline", help="the repository copies go here")
    parser.add_argument("--mirror", default=os.environ.get("HETMM_MIRROR", DEFAULT_MIRROR))
    parser.add_argument("--limit", type=int, default=None, help="cut the split like data.limit (smoke runs)")
    parser.add_argument("--hold-back", type=int, default=10, help="train images added in the incremental run")
    parser.add_argument("--skip-all", action="store_true", help="skip the ALL template run")
    parser.add_argument("--keep", action="store_true", help="keep the repository copies")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the stages ('' = leave the environment as it is)")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "HETMM_MIRROR": str(Path(args.mirror).resolve()), "PYTHONUNBUFFERED": "1"}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    full_split, _ = split_file(args.limit, 0)
    partial_split, held = split_file(args.limit, args.hold_back)
    load_before = os.getloadavg()
    runs: dict[str, dict] = {}

    # Copy 1: full runs.
    full = work / "full"
    make_copy(full, full_split, {**env, "PYTHONPATH": str(full)})
    env_full = {**env, "PYTHONPATH": str(full)}
    runs["full_pts60"] = repro(full, env_full, work / "full_pts60.log")
    _print_run("full run, PTS-60", runs["full_pts60"])
    if not args.skip_all:
        write_params(full, {**LINE, "templates": {**LINE["templates"], "kind": "ALL"}})
        runs["all_template"] = repro(full, env_full, work / "all_template.log")
        _print_run("ALL template (template, infer, report rerun)", runs["all_template"])

    def incremental_case(copy: Path, tag: str, label: str, line: dict) -> None:
        """A fresh copy without the held-back images (full run), then with them (the incremental run)."""
        env_copy = {**env, "PYTHONPATH": str(copy)}
        make_copy(copy, partial_split, env_copy, line)
        runs[f"held_back_{tag}"] = repro(copy, env_copy, work / f"held_back_{tag}.log")
        _print_run(f"line without {len(held)} train images, {label}", runs[f"held_back_{tag}"])
        (copy / SPLIT).write_text(json.dumps(full_split, indent=1) + "\n")
        runs[f"incremental_{tag}"] = repro(copy, env_copy, work / f"incremental_{tag}.log")
        _print_run(f"incremental, {label}: +{len(held)} good images", runs[f"incremental_{tag}"])

    # Copy 2: PTS-60, timed against the full run of copy 1.
    incremental_case(work / "incremental", "pts60", "PTS-60", LINE)
    ratio = runs["incremental_pts60"]["seconds"] / runs["full_pts60"]["seconds"]
    print(f"incremental / full = {runs['incremental_pts60']['seconds']:.0f} / {runs['full_pts60']['seconds']:.0f} s "
          f"= {ratio:.3f} (target <= {TARGET_RATIO}): {'met' if ratio <= TARGET_RATIO else 'MISSED'}", flush=True)
    ratio_all = None
    if not args.skip_all:
        # Copy 3: ALL, whose infer re-matches only the new sheets (hetmm/match_cache.py); timed against its own
        # full run.
        incremental_case(work / "incremental_all", "all", "ALL",
                         {**LINE, "templates": {**LINE["templates"], "kind": "ALL"}})
        ratio_all = runs["incremental_all"]["seconds"] / runs["held_back_all"]["seconds"]
        print(f"ALL: incremental / full = {runs['incremental_all']['seconds']:.0f} / "
              f"{runs['held_back_all']['seconds']:.0f} s = {ratio_all:.3f}", flush=True)
    from hetmm.io import write_json_atomic

    write_json_atomic(RESULTS, {
        "benchmark": "pipeline_mtd",
        "command": "python benchmarks/bench_pipeline_mtd.py" + (f" --limit {args.limit}" if args.limit else ""),
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "settings": LINE,
        "environment": {k: env.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
        "data": {"train_images": len(full_split["train"]),
                 "test_images": sum(len(v) for part in ("dev", "holdout") for v in full_split[part].values()),
                 "held_back_train_stems": held},
        "definitions": {
            "seconds": "wall time of one `dvc repro report@mtd` (DVC start-up and hashing included)",
            "stage_seconds": "time between DVC's 'Running stage' lines (the stage command + DVC saving its outputs)",
            "stage_internal_seconds": "the stage's own timer (reports/mtd/<stage>.json; report: model card)",
            "incremental_ratio": "incremental_pts60.seconds / full_pts60.seconds",
            "incremental_ratio_all": "incremental_all.seconds / held_back_all.seconds (a full ALL run from an empty "
                                     "copy, 10 train images fewer)",
            "metrics": "reports/mtd/metrics.json subsets (all, dev, holdout); benchmark figures, not tuned",
        },
        "runs": runs,
        "incremental_ratio": round(ratio, 4),
        "incremental_ratio_all": None if ratio_all is None else round(ratio_all, 4),
        "target": {"incremental_ratio_max": TARGET_RATIO, "met": ratio <= TARGET_RATIO},
    })
    print(f"wrote {RESULTS}")
    if not args.keep:
        shutil.rmtree(full, ignore_errors=True)
        shutil.rmtree(work / "incremental", ignore_errors=True)
        shutil.rmtree(work / "incremental_all", ignore_errors=True)


if __name__ == "__main__":
    main()
