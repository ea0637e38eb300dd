"""Peak memory (RSS) of building templates and of inference on the MTD line, each phase in a fresh process.

Target (issue): peak RSS while building a template or inferring <= the template's size + 1 GiB.

Setup (not measured): the real ``download`` and ``extract`` stage functions (``hetmm.pipeline``) fill a work
folder with the MTD line (mirror, subset all: 761 train, 583 test) and its per-image feature cache at 256 px
with EfficientNet-Lite0 (``--blocks``, default the mtd line's ``all``: 48/80/576 channels). Then each phase
runs in its own Python process, which first imports torch and hetmm and loads the backbone (the *baseline*),
resets its RSS high-water mark (``/proc/self/clear_refs``: loading the backbone has a transient peak of its own),
then does the phase; its peak is the process's ``VmHWM`` read at the end (``ru_maxrss``, which cannot be reset,
is reported as the lifetime peak).

Phases:

* ``baseline``     nothing more.
* ``build_all``    the ``template`` stage with ``templates.kind: ALL`` (rebuild): load the N train images'
                   cached features, stack them, build, save. Template = the stacked features (N sheets).
* ``build_pts``    the same with PTS-60. Its *input* is the same stacked ALL-sized features; the template
                   written is K = 60 sheets.
* ``infer_all``/``infer_pts``      ``hetmm.pipeline.models.load_scorer`` + ``score_cached`` (the DVC infer
                   stage's path: cached query features) over ``--infer-images`` test images.
* ``predict_all``/``predict_pts``  ``load_scorer`` + ``Inspector.predict`` on decoded test images (backbone
                   + matching) over the same images, batch ``features.batch_size``.

"Template size" is the in-memory size of the template tensors (``TemplateSet.nbytes``: float32 layers plus,
for PTS, the small easy-seed maps). For ``build_pts`` the table also gives the input size (the ALL size).

    .venv/bin/python benchmarks/bench_memory.py                 # writes benchmarks/results/memory.json
    .venv/bin/python benchmarks/bench_memory.py --limit 40      # smoke run: 40 train, <= 40 test per class
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory.json"
DEFAULT_MIRROR = "/work/shared/data/mtd"
GIB = 1 << 30
MIB = 1 << 20
PHASES = ("baseline", "build_all", "build_pts", "infer_all", "infer_pts", "predict_all", "predict_pts")


# --------------------------------------------------------------------------- worker side


def _rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lifetime_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for entry in handle:
            if entry.startswith(key + ":"):
                return int(entry.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    """RSS high-water mark since the last :func:`_reset_peak` (VmHWM), else over the process lifetime."""
    try:
        return _status("VmHWM")
    except (OSError, KeyError):
        return _lifetime_peak()


def _line(args: argparse.Namespace, kind: str | None = None):
    """The MTD benchmark line, pinned here (params.yaml is tuned separately): Lite0 at 256 px, ImageNet
    normalisation, layers 1-3, fwd 5/5/3, bwd 3/3/3, blur sigma 4, image score max."""
    from hetmm.config import DataConfig, FeatureConfig, MatchingConfig, PostConfig, ProductLine, TemplateConfig

    return ProductLine(
        name="mtd",
        data=DataConfig(source="mtd", subset="all", mirror=args.mirror, limit=args.limit),
        features=FeatureConfig(backbone="efficientnet_lite0", layers=(1, 2, 3), image_size=(256, 256),
                               resize="squash", normalisation="imagenet", blocks=args.blocks, dtype="float32",
                               batch_size=8),
        templates=TemplateConfig(kind=kind or "PTS", size=args.k),
        matching=MatchingConfig(mode="mutual", forward_windows=(5, 5, 3), backward_windows=(3, 3, 3),
                                alphas=(0.5, 0.5, 0.5), weights=(1.0, 1.0, 1.0)),
        post=PostConfig(blur_sigma=4.0, image_score="max"),
    )


def _run(line, paths):
    """The stage context of the benchmark's line (CPU, no progress bars)."""
    from hetmm.config import Params
    from hetmm.pipeline.line import StageRun

    return StageRun(Params(product_lines={line.name: line}, device="cpu"), line, paths, "cpu", progress=False)


def _paths(args: argparse.Namespace, kind: str | None = None):
    from hetmm.pipeline.line import LinePaths

    work = Path(args.workdir) / args.blocks
    suffix = f"_{kind.lower()}" if kind else ""
    return LinePaths(data=work / "data", features=work / "features", models=work / f"models{suffix}",
                     outputs=work / f"outputs{suffix}", reports=work / f"reports{suffix}")


def _test_rows(paths, count: int):
    from hetmm.data.manifest import read_manifest

    df = read_manifest(paths.manifest)
    test = df[df["split"] == "test"].reset_index(drop=True)
    step = max(1, len(test) // max(1, count))
    return test.iloc[::step].head(count)


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from hetmm.core.features import FeatureExtractor
    from hetmm.pipeline.batch_scoring import score_cached
    from hetmm.pipeline.feature_cache import FeatureCache
    from hetmm.pipeline.models import load_scorer
    from hetmm.pipeline.provenance import FeatureKey
    from hetmm.pipeline.stages import stage

    phase = args.phase
    kind = {"all": "ALL", "pts": "PTS"}.get(phase.rsplit("_", 1)[-1])
    line, paths = _line(args, kind), _paths(args, kind)
    extractor = FeatureExtractor(line.features, "cpu")  # the baseline: torch imported, backbone loaded
    import gc

    gc.collect()
    # Loading the backbone has a transient peak above the resting baseline; reset the high-water mark so the
    # phase's own peak is measured (the lifetime ru_maxrss is reported too).
    out = {"phase": phase, "baseline_rss": _rss(), "baseline_lifetime_peak": _lifetime_peak(),
           "peak_reset": _reset_peak()}
    start = time.perf_counter()
    if phase.startswith("build"):
        info = stage("template")(_run(line, paths))
        out.update(template_bytes=info["bytes"], action=info["action"], train_images=info["train_images"])
    elif phase.startswith("infer"):
        inspector = load_scorer(line, paths, "cpu")
        out["after_load_rss"] = _rss()
        shas = list(_test_rows(paths, args.infer_images)["sha256"])
        cache = FeatureCache(paths.features, FeatureKey.of(line.features))
        scores, maps = score_cached(inspector, cache, shas, line.features.batch_size, progress=False)
        out.update(template_bytes=int(inspector.template.nbytes), images=len(scores), maps_bytes=int(maps.nbytes))
    elif phase.startswith("predict"):
        from hetmm.data.images import load_image

        inspector = load_scorer(line, paths, "cpu")
        inspector._extractor = extractor
        out["after_load_rss"] = _rss()
        rows = _test_rows(paths, args.infer_images)
        batch = line.features.batch_size
        count = 0
        for lo in range(0, len(rows), batch):
            images = [load_image(paths.data / p) for p in rows["path"].iloc[lo : lo + batch]]
            count += len(inspector.predict(images).scores)
        out.update(template_bytes=int(inspector.template.nbytes), images=count)
    elif phase != "baseline":
        raise SystemExit(f"unknown phase {phase!r}")
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["end_rss"] = _rss()
    out["peak"] = _peak()
    out["lifetime_peak"] = _lifetime_peak()
    return out


# --------------------------------------------------------------------------- parent side


def setup(args: argparse.Namespace) -> dict:
    """Download the MTD line and fill its feature cache with the real stage functions (not measured)."""
    import torch

    torch.set_num_threads(args.threads)
    from hetmm.pipeline.stages import stage

    line, paths = _line(args), _paths(args)
    info = {}
    if not paths.manifest.is_file():
        info["download"] = stage("download")(_run(line, paths))
    info["extract"] = stage("extract")(_run(line, paths))
    for kind in ("ALL", "PTS"):  # every build phase is a full rebuild
        shutil.rmtree(_paths(args, kind).models, ignore_errors=True)
    return info


def run_phase(args: argparse.Namespace, phase: str) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--workdir", args.workdir, "--blocks", args.blocks,
               "--mirror", args.mirror, "--k", str(args.k), "--infer-images", str(args.infer_images),
               "--threads", str(args.threads)]
    if args.limit:
        command += ["--limit", str(args.limit)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise SystemExit(f"phase {phase} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/hetmm-bench-memory", help="data and feature cache (reused)")
    parser.add_argument("--mirror", default=os.environ.get("HETMM_MIRROR", DEFAULT_MIRROR))
    parser.add_argument("--blocks", default="all", choices=["last", "all"])
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--infer-images", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="mtd data.limit (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase and print its JSON
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(worker(args)))
        return

    start = time.perf_counter()
    prepared = setup(args)
    print(f"setup ({args.blocks} blocks, limit {args.limit}): {json.dumps(prepared)} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    rows = {}
    for phase in args.phases:
        rows[phase] = run_phase(args, phase)
    sizes = {kind: next((r["template_bytes"] for p, r in rows.items() if p.endswith(kind) and "template_bytes" in r),
                        None) for kind in ("all", "pts")}
    table = []
    print(f"{'phase':<12} {'template':>9} {'input':>9} {'baseline':>9} {'peak':>9} {'peak-base':>10} "
          f"{'peak-tmpl':>10} {'limit':>9} {'met':>5} {'seconds':>8}   (MiB; limit = template + 1 GiB)")
    for phase, r in rows.items():
        kind = phase.rsplit("_", 1)[-1] if phase != "baseline" else None
        template = sizes.get(kind) if kind else None
        row = {"phase": phase, "template_bytes": template, "baseline_rss_bytes": r["baseline_rss"],
               "peak_rss_bytes": r["peak"], "peak_minus_baseline_bytes": r["peak"] - r["baseline_rss"],
               "lifetime_peak_rss_bytes": r["lifetime_peak"], "peak_reset": r["peak_reset"],
               "seconds": r["seconds"]}
        if phase.startswith("build"):
            row["input_bytes"] = sizes["all"]  # stacked train features = the ALL template
            row["template_means"] = ("the ALL template = the stacked input features" if kind == "all" else
                                     f"the PTS-{args.k} template written; input = stacked ALL-sized features")
        elif phase.startswith(("infer", "predict")):
            row["images"] = r["images"]
            row["after_load_rss_bytes"] = r["after_load_rss"]
            row["template_means"] = "the template loaded for matching"
        if template is not None:
            row["limit_bytes"] = template + GIB
            row["peak_minus_template_bytes"] = r["peak"] - template
            row["target_met"] = r["peak"] <= template + GIB
        if phase == "build_pts" and sizes["all"]:  # the input it must hold is ALL-sized
            row["limit_vs_input_bytes"] = sizes["all"] + GIB
            row["target_met_vs_input"] = r["peak"] <= sizes["all"] + GIB
        table.append(row)

        def mib(v: int | None) -> str:
            return f"{v / MIB:9.0f}" if v is not None else f"{'-':>9}"

        print(f"{phase:<12} {mib(template)} {mib(row.get('input_bytes'))} {mib(r['baseline_rss'])} {mib(r['peak'])} "
              f"{(r['peak'] - r['baseline_rss']) / MIB:10.0f} "
              f"{(mib(r['peak'] - template) if template else f'{chr(45):>9}'):>10} {mib(row.get('limit_bytes'))} "
              f"{str(row.get('target_met', '-')):>5} {r['seconds']:8.1f}"
              + (f"   (vs input + 1 GiB = {mib(row['limit_vs_input_bytes']).strip()}: "
                 f"{row['target_met_vs_input']})" if "limit_vs_input_bytes" in row else ""), flush=True)

    from hetmm.io import write_json_atomic

    write_json_atomic(RESULTS, {
        "benchmark": "memory",
        "command": "python benchmarks/bench_memory.py" + (f" --limit {args.limit}" if args.limit else "")
                   + (f" --blocks {args.blocks}" if args.blocks != "all" else ""),
        "args": {k: v for k, v in vars(args).items() if k != "phase"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "setup": prepared,
        "definitions": {
            "baseline_rss": "RSS of the phase's process after importing torch + hetmm and loading the backbone",
            "peak_rss": "VmHWM of the phase's own process, reset (clear_refs 5) after the baseline: the phase's "
                        "peak RSS, baseline pages included",
            "lifetime_peak_rss": "ru_maxrss of that process, including the transient of loading the backbone",
            "template_bytes": "TemplateSet.nbytes: float32 template layers (+ PTS easy-seed maps)",
            "input_bytes": "build phases: the stacked train features loaded from the per-image cache (= ALL size)",
            "target": "peak_rss <= template_bytes + 1 GiB (build_pts also against input_bytes + 1 GiB)",
        },
        "phases": table,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
