"""MTD pipeline benchmark: `dvc repro` of the full MTD line (ALL and PTS-60), then the incremental case.

Each run happens in a throw-away copy of this repository (benchmarks/_pipeline_common.py: the files git tracks
or would track, less .venv, ``dvc.lock`` and pipeline outputs; a fresh `git init` and commit; an empty DVC
cache), with the venv's bin first on PATH, ``DVC_NO_ANALYTICS=1``, ``HETMM_MIRROR`` pointing at the MTD
mirror and ``PYTHONPATH`` at the copy (so the copy's code runs even though the package is installed editable from this
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
against the 10 new sheets only (the match cache). Timed against step 3 of this copy (a full ALL run).

The stages run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy ''`` is given: on this shared
2-core machine libgomp's default spin-waiting made the infer stage 20x slower with 2 threads than with 1
(benchmarks/bench_inference.py measures the variants side by side).

Stage times are wall-clock from DVC's own output (the time between its "Running stage" lines, so a stage's
time includes DVC hashing and caching its outputs); the stages' internal seconds (reports/mtd/*.json) are
recorded too. Metrics are reports/mtd/metrics.json (image AUROC, pixel AUROC, AU-PRO per subset).

    .venv/bin/python benchmarks/bench_pipeline_mtd.py               # full MTD: writes results/pipeline_mtd.json
    .venv/bin/python benchmarks/bench_pipeline_mtd.py --limit 20    # smoke run: 20 train, <= 20 test per class

bench_pipeline.py runs the same MTD case (target 0.2) next to the hazelnut folder line.
"""

from __future__ import annotations

import argparse

import _pipeline_common as common

RESULTS = common.RESULTS_DIR / "pipeline_mtd.json"
TARGET_RATIO = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/hetmm-bench-pipeline", help="the repository copies go here")
    parser.add_argument("--limit", type=int, default=None, help="cut the split like data.limit (smoke runs)")
    parser.add_argument("--hold-back", type=int, default=10, help="train images added in the incremental run")
    parser.add_argument("--skip-all", action="store_true", help="skip the ALL template run")
    args, work, env, load_before = common.start(parser)
    case = common.mtd_case(work, env, limit=args.limit, hold_back=args.hold_back, skip_all=args.skip_all,
                           target=TARGET_RATIO)
    command = "python benchmarks/bench_pipeline_mtd.py" + (f" --limit {args.limit}" if args.limit else "")
    common.write_results(RESULTS, "pipeline_mtd", command, args, env, load_before, {
        "incremental_ratio": "incremental_pts60.seconds / full_pts60.seconds",
        "incremental_ratio_all": "incremental_all.seconds / held_back_all.seconds (a full ALL run from an empty "
                                 "copy, 10 train images fewer)"}, case)


if __name__ == "__main__":
    main()
