"""Pipeline benchmark: `dvc repro` full vs incremental runs, hazelnut folder line and MTD, in one run.

Every run happens in a throw-away copy of this repository (benchmarks/_pipeline_common.py: the files git
tracks or would track, less .venv, dvc.lock and the pipeline outputs; fresh `git init`; empty DVC cache), with
the venv's bin first on PATH, ``DVC_NO_ANALYTICS=1``, ``OMP_WAIT_POLICY=PASSIVE``, ``PYTHONPATH`` = the copy.
Only ``dvc repro``, ``params.yaml`` and ``dvc.yaml`` are relied on, never the stage commands.

1. Hazelnut (``/work/shared/data/hazelnut_toy``, MVTec layout, 28 train/good + 6 test/good + 17 test/colour
   images with masks): a ``hazelnut`` line, ``data: {source: folder, path: <a temp copy>}``, Lite0 256 px,
   an ALL template, matching/post/threshold/report as the demo line (ablation off). The temp dataset copy
   first lacks 3 train/good images (evenly spaced): ``dvc repro report@hazelnut`` (full run, 48 images); then
   the 3 images are copied back and ``dvc repro`` runs again (incremental). Target: incremental/full <= 0.4.
2. MTD (unless ``--skip-mtd``; ~10 min; mirror via ``HETMM_MIRROR``): +10 good images with PTS-60 and with
   ALL, as bench_pipeline_mtd.py describes. Target: incremental/full <= 0.2.

Per stage: wall time between DVC's "Running stage" lines, and the stage's own seconds from the
reports/<line>/*.json files that run wrote (where a record has them).

    .venv/bin/python benchmarks/bench_pipeline.py               # both cases: results/pipeline.json
    .venv/bin/python benchmarks/bench_pipeline.py --skip-mtd    # hazelnut only (~3-4 min)
    .venv/bin/python benchmarks/bench_pipeline.py --limit 20 --out /tmp/pipeline_smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import _pipeline_common as common

RESULTS = common.RESULTS_DIR / "pipeline.json"
HAZELNUT = "/work/shared/data/hazelnut_toy"
HAZELNUT_TARGET = 0.4
MTD_TARGET = 0.2
IMAGE_DIRS = ("train", "test", "ground_truth")


def hazelnut_line(path: Path) -> dict:
    """The hazelnut line: the demo line's sections with Lite0 at 256 px and an ALL template."""
    return {
        "data": {"source": "folder", "path": str(path.resolve())},
        "features": {"backbone": "efficientnet_lite0", "layers": [1, 2, 3], "image_size": [256, 256],
                     "resize": "squash", "normalisation": "imagenet", "blocks": "last", "dtype": "float32",
                     "batch_size": 8},
        "templates": {"kind": "ALL", "size": 10, "hot_update": True},
        "matching": {"mode": "mutual", "forward_windows": [5, 3, 3], "backward_windows": [3, 3, 1],
                     "alphas": [0.5, 0.5, 0.5], "weights": [1.0, 1.0, 0.5]},
        "post": {"blur_sigma": 2.0, "image_score": "max"},
        "threshold": {"rule": "f1_max"},
        "report": {"overlays": 6, "ablation": False},
    }


def dataset_files(source: Path, limit: int | None) -> list[str]:
    """Relative paths of the dataset's images and masks; with ``limit`` the first n of each image folder
    (sorted) and the masks of the defect images kept."""
    files = sorted(str(p.relative_to(source)) for d in IMAGE_DIRS for p in (source / d).rglob("*") if p.is_file())
    if not limit:
        return files
    images = [f for f in files if not f.startswith("ground_truth/")]
    kept = [f for folder in sorted({f.rsplit("/", 1)[0] for f in images})
            for f in [g for g in images if g.rsplit("/", 1)[0] == folder][:limit]]
    stems = {f.split("/", 1)[1].rsplit(".", 1)[0] for f in kept if f.startswith("test/")}
    return kept + [f for f in files if f.startswith("ground_truth/") and f.split("/", 1)[1].rsplit(".", 1)[0] in stems]


def copy_files(rels: list[str], source: Path, dest: Path) -> None:
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dest / rel)  # contents only: the shared originals may be read-only


def hazelnut_case(work: Path, env: dict, source: Path, *, limit: int | None, hold_back: int) -> dict:
    files = dataset_files(source, limit)
    train = [f for f in files if f.startswith("train/good/")]
    held = common.evenly_spaced(train, hold_back)
    data = work / "hazelnut_data"
    if data.exists():
        shutil.rmtree(data)
    copy_files([f for f in files if f not in set(held)], source, data)

    n_masks = sum(f.startswith("ground_truth/") for f in files)
    copy = work / "hazelnut"
    line = hazelnut_line(data)
    common.make_copy(copy, {"hazelnut": line}, env)
    runs = {"full": common.repro(copy, "hazelnut", env, work / "hazelnut_full.log")}
    common.print_run(f"hazelnut full run, {len(files) - n_masks - len(held)} images (ALL)", runs["full"])
    copy_files(held, source, data)
    runs["incremental"] = common.repro(copy, "hazelnut", env, work / "hazelnut_incremental.log")
    common.print_run(f"hazelnut incremental: +{len(held)} train/good images", runs["incremental"])
    ratio = common.ratio_line("hazelnut ALL", runs["incremental"], runs["full"], HAZELNUT_TARGET)
    return {
        "settings": line,
        "data": {"source": str(source), "train_images": len(train), "test_images": len(files) - len(train) - n_masks,
                 "masks": n_masks, "held_back_train_images": held},
        "runs": runs,
        "incremental_ratio": ratio["ratio"],
        "target": {"incremental_ratio_max": HAZELNUT_TARGET, "met": ratio["met"]},
    }


def print_table(results: dict) -> None:
    rows = [(f"{case} {name}", run)
            for case in ("hazelnut", "mtd") for name, run in results[case].get("runs", {}).items()]
    stages = list(dict.fromkeys(s for _, run in rows for s in run["stage_seconds"]))
    print("\n" + " | ".join(["run".ljust(24), "total".rjust(7), *(s.rjust(13) for s in stages)]))
    for name, run in rows:
        internal = run["stage_internal_seconds"]
        cells = [(f"{run['stage_seconds'][s]:.1f}"
                  + (f" ({internal[s]:.1f})" if isinstance(internal.get(s), (int, float)) else ""))
                 if s in run["stage_seconds"] else "-" for s in stages]
        print(" | ".join([name.ljust(24), f"{run['seconds']:7.1f}", *(c.rjust(13) for c in cells)]))
    print("(stage wall time between DVC's 'Running stage' lines; in brackets the stage's own timer)")
    for case in ("hazelnut", "mtd"):
        if "incremental_ratio" in results[case]:
            print(f"{case}: incremental / full = {results[case]['incremental_ratio']:.3f} "
                  f"(target <= {results[case]['target']['incremental_ratio_max']})"
                  + (f"; ALL {results[case]['incremental_ratio_all']:.3f}"
                     if results[case].get("incremental_ratio_all") is not None else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/hetmm-bench-pipeline-all", help="the copies go here")
    parser.add_argument("--hazelnut", default=HAZELNUT, help="the hazelnut toy dataset (MVTec layout)")
    parser.add_argument("--limit", type=int, default=None,
                        help="smoke runs: <= n images per hazelnut folder; the MTD split cut like data.limit")
    parser.add_argument("--hazelnut-hold-back", type=int, default=3, help="train images added back (hazelnut)")
    parser.add_argument("--mtd-hold-back", type=int, default=10, help="train images added back (MTD)")
    parser.add_argument("--skip-mtd", action="store_true", help="hazelnut case only (the MTD case takes ~10 min)")
    parser.add_argument("--skip-mtd-all", action="store_true", help="MTD: PTS-60 only, no ALL template runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file (smoke runs: elsewhere)")
    args, work, env, load_before = common.start(parser)
    results = {"hazelnut": hazelnut_case(work, env, Path(args.hazelnut), limit=args.limit,
                                         hold_back=args.hazelnut_hold_back)}
    results["mtd"] = {"skipped": True} if args.skip_mtd else common.mtd_case(
        work, env, limit=args.limit, hold_back=args.mtd_hold_back, skip_all=args.skip_mtd_all, target=MTD_TARGET)
    print_table(results)
    flags = [f"--limit {args.limit}" if args.limit else "", "--skip-mtd" if args.skip_mtd else "",
             "--skip-mtd-all" if args.skip_mtd_all else ""]
    command = " ".join(["python benchmarks/bench_pipeline.py", *filter(None, flags)])
    common.write_results(args.out, "pipeline", command, args, env, load_before, {
        "incremental_ratio": "hazelnut: incremental.seconds / full.seconds; mtd: incremental_pts60 / full_pts60 "
                             "(incremental_ratio_all: incremental_all / held_back_all)"}, results)


if __name__ == "__main__":
    main()
