"""Shared helpers of the `dvc repro` benchmarks (bench_pipeline.py, bench_pipeline_mtd.py).

A benchmark run happens in a throw-away copy of this repository: the files of the working tree that git
tracks or would track (``git ls-files --cached --others --exclude-standard``) less ``.venv``, ``dvc.lock`` and
the pipeline outputs (data/, features/, models/, outputs/, reports/), a pinned ``params.yaml``, a fresh
``git init`` and commit, an empty DVC cache. The copies rely only on ``dvc repro``, ``params.yaml`` and
``dvc.yaml``: nothing here knows the stage commands; ``hetmm.pipeline.lines`` sets which lines the copy's dvc.yaml runs.
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
RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_MIRROR = "/work/shared/data/mtd"
# Left out of the copies: committed pipeline results would let DVC skip stages of a "full" run.
EXCLUDED_TOP = {".venv", "data", "features", "models", "outputs", "reports"}
EXCLUDED_FILES = {"dvc.lock"}

MTD_LINE = {  # the MTD benchmark setting (bench_pipeline_mtd.py docstring); keys as in README "Parameters"
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
MTD_LINE_ALL = {**MTD_LINE, "templates": {**MTD_LINE["templates"], "kind": "ALL"}}


# ----------------------------------------------------------------------------- environment and copies


def stage_env(mirror: str | None = None, omp_wait_policy: str = "PASSIVE") -> dict:
    """The stages' environment: the venv's bin first on PATH, no DVC analytics, unbuffered output;
    ``HETMM_MIRROR`` and ``OMP_WAIT_POLICY`` when given. ``repro`` adds ``PYTHONPATH`` = the copy."""
    venv_bin = REPO / ".venv" / "bin"
    if not venv_bin.is_dir():
        venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "PYTHONUNBUFFERED": "1"}
    if mirror:
        env["HETMM_MIRROR"] = str(Path(mirror).resolve())
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def source_files() -> list[str]:
    """Working-tree files git tracks or would track (not ignored), less the excluded ones; paths relative."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    rels = dict.fromkeys(filter(None, out.decode().split("\0")))  # ordered, deduplicated
    return [rel for rel in rels if rel not in EXCLUDED_FILES and rel.split("/")[0] not in EXCLUDED_TOP
            and (REPO / rel).is_file()]  # deleted-but-tracked files are skipped


def find_source(name: str) -> str:
    """The one source file called ``name`` (its path may move while the package is restructured)."""
    hits = [rel for rel in source_files() if rel.rsplit("/", 1)[-1] == name]
    if len(hits) != 1:
        raise SystemExit(f"expected one {name} in the checkout, found {hits or 'none'}")
    return hits[0]


def make_copy(dest: Path, lines: dict[str, dict], env: dict, files: dict[str, str] | None = None) -> None:
    """A fresh repository copy at ``dest`` with ``params.yaml`` holding ``lines`` and the text ``files``
    (relative path -> contents) written over the copied ones; git init and commit."""
    if dest.exists():
        shutil.rmtree(dest)
    for rel in source_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    write_params(dest, lines)
    for rel, text in (files or {}).items():
        (dest / rel).write_text(text)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "benchmark copy"], cwd=dest, check=True, env=env)


def write_params(dest: Path, lines: dict[str, dict]) -> None:
    """The copy's params.yaml holds ``lines`` only, and its dvc.yaml runs exactly those."""
    from hetmm.pipeline.lines import set_dvc_lines

    (dest / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "product_lines": lines}, sort_keys=False))
    set_dvc_lines(list(lines), dest / "dvc.yaml")


def evenly_spaced(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (the held-back images)."""
    if count >= len(items):
        raise SystemExit(f"holding back {count} images leaves none (the line has {len(items)})")
    n = len(items)
    return [items[min(n - 1, round((i + 0.5) * n / count))] for i in range(count)] if count else []


# ----------------------------------------------------------------------------- one dvc repro


def repro(dest: Path, line: str, env: dict, log: Path) -> dict:
    """``dvc repro report@<line>`` in ``dest``: wall time, per-stage wall times from DVC's output, stages run
    and skipped, and what the stages' own JSON records (reports/<line>/*.json written by this run) say."""
    env = {**env, "PYTHONPATH": str(dest)}
    started = time.time()
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    skipped: list[str] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro", f"report@{line}"], cwd=dest, env=env, stdout=subprocess.PIPE,
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
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"dvc repro report@{line} failed in {dest} (exit {code}); see {log}:\n{tail}")
    ends = [t for _, t in marks[1:]] + [total]
    stages = {name.split("@")[0]: round(end - begin, 2) for (name, begin), end in zip(marks, ends)}
    records = stage_records(dest / "reports" / line, since=started - 1)
    return {"seconds": round(total, 2), "stage_seconds": stages, "stages_run": [n for n, _ in marks],
            "stages_skipped": skipped, "before_first_stage_seconds": round(marks[0][1], 2) if marks else None,
            "stage_internal_seconds": internal_seconds(records, stages),
            "records": records, "metrics": metrics(dest / "reports" / line / "evaluation.json")}


def stage_records(reports: Path, since: float, max_chars: int = 4000) -> dict:
    """The JSON files of ``reports`` written after ``since`` (stale files of skipped stages are left out):
    small ones whole, large ones (metrics, model card) as their seconds fields only. Unreadable ones: null."""
    records: dict[str, dict | None] = {}
    for path in sorted(reports.glob("*.json")) if reports.is_dir() else []:
        if path.stat().st_mtime < since:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            records[path.stem] = None
            continue
        small = len(json.dumps(data)) <= max_chars
        records[path.stem] = data if small and isinstance(data, dict) else {"seconds_fields": seconds_fields(data)}
    return records


def seconds_fields(data, prefix: str = "") -> dict[str, float]:
    """Numeric leaves whose key path mentions seconds or timing, flattened to ``a.b.c`` keys."""
    found: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if re.search(r"second|timing", path):
                    found[path] = value
            elif isinstance(value, dict):
                found.update(seconds_fields(value, path))
    return found


def internal_seconds(records: dict, stages: dict) -> dict[str, float]:
    """Each stage's own timer: ``seconds`` of reports/<line>/<stage>.json, else a seconds field named after
    the stage in any record (the model card's ``timings_seconds.report``), else the record's only seconds
    field. Stages without one are left out."""
    fields = {stem: rec["seconds_fields"] if rec and set(rec) == {"seconds_fields"} else seconds_fields(rec or {})
              for stem, rec in records.items()}
    found: dict[str, float] = {}
    for stage in stages:
        own = fields.get(stage, {})
        named = [v for f in fields.values() for k, v in f.items() if k.rsplit(".", 1)[-1] == stage]
        if "seconds" in own:
            found[stage] = own["seconds"]
        elif named:
            found[stage] = named[0]
        elif len(own) == 1:
            found[stage] = next(iter(own.values()))
    return found


def metrics(path: Path) -> dict:
    """Image AUROC, pixel AUROC and AU-PRO per subset of a metrics.json, as far as its layout has them."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    subsets = data.get("subsets") if isinstance(data, dict) else None
    if not isinstance(subsets, dict):
        subsets = {"all": data} if isinstance(data, dict) else {}
    keep = ("image_auroc", "pixel_auroc", "aupro")
    return {name: {k: values.get(k) for k in keep} for name, values in subsets.items()
            if isinstance(values, dict) and any(k in values for k in keep)}


# ----------------------------------------------------------------------------- printing and results


def print_run(name: str, run: dict) -> None:
    internal = run["stage_internal_seconds"]
    stages = ", ".join(f"{k} {v:.1f}" + (f" ({internal[k]:.1f})" if isinstance(internal.get(k), (int, float)) else "")
                       for k, v in run["stage_seconds"].items())
    print(f"{name}: {run['seconds']:.1f} s [{stages}]", flush=True)
    for subset, values in run["metrics"].items():
        print("    " + f"{subset:<8} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()
                                                   if isinstance(v, (int, float))), flush=True)


def ratio_line(label: str, incremental: dict, full: dict, target: float) -> dict:
    ratio = incremental["seconds"] / full["seconds"]
    met = ratio <= target
    print(f"{label}: incremental / full = {incremental['seconds']:.1f} / {full['seconds']:.1f} s = {ratio:.3f} "
          f"(target <= {target}): {'met' if met else 'MISSED'}", flush=True)
    return {"ratio": round(ratio, 4), "target_max": target, "met": met}


def start(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path, dict, tuple]:
    """Add the options both scripts share, parse, make the work folder: (args, work folder, stage env, load)."""
    parser.add_argument("--mirror", default=os.environ.get("HETMM_MIRROR", DEFAULT_MIRROR), help="the MTD mirror")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the stages ('' = leave the environment as it is)")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    return args, work, stage_env(args.mirror, args.omp_wait_policy), os.getloadavg()


def write_results(path: Path, benchmark: str, command: str, args: argparse.Namespace, env: dict,
                  load_before: tuple, definitions: dict, body: dict) -> None:
    """The results file: a header (command, machine, environment, definitions) and ``body``; atomically."""
    data = {"benchmark": benchmark, "command": command, "args": vars(args),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
            "environment": {k: env.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
            "definitions": {**DEFINITIONS, **definitions}, **body}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # ignored by git while it exists
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- the MTD case


def mtd_split(limit: int | None, hold_back: int) -> tuple[str, dict, dict, list[str]]:
    """(split file path, full split cut like ``data.limit`` would cut it, that split less ``hold_back`` train
    stems evenly spaced, the held-back stems)."""
    rel = find_source("mtd_split.json")
    split = json.loads((REPO / rel).read_text())
    if limit:
        split["train"] = split["train"][:limit]
        for part in ("dev", "holdout"):
            split[part] = {cls: stems[:limit] for cls, stems in split[part].items()}
    held = evenly_spaced(split["train"], hold_back)
    partial = {**split, "train": [s for s in split["train"] if s not in set(held)]}
    return rel, split, partial, held


def mtd_case(work: Path, env: dict, *, limit: int | None, hold_back: int, skip_all: bool, target: float) -> dict:
    """The MTD line, +``hold_back`` good images (see bench_pipeline_mtd.py): copy 1 full PTS-60 run then an
    ALL template; copy 2 (own DVC run-cache) PTS-60 without then with the held-back images; copy 3 (unless
    ``skip_all``) the same with ALL. Returns the settings, data, runs and ratios."""
    rel, full_split, partial_split, held = mtd_split(limit, hold_back)
    dump = lambda split: {rel: json.dumps(split, indent=1) + "\n"}  # noqa: E731
    runs: dict[str, dict] = {}

    full = work / "mtd_full"
    make_copy(full, {"mtd": MTD_LINE}, env, dump(full_split))
    runs["full_pts60"] = repro(full, "mtd", env, work / "mtd_full_pts60.log")
    print_run("MTD full run, PTS-60", runs["full_pts60"])
    if not skip_all:
        write_params(full, {"mtd": MTD_LINE_ALL})
        runs["all_template"] = repro(full, "mtd", env, work / "mtd_all_template.log")
        print_run("MTD ALL template (template, infer, report rerun)", runs["all_template"])

    def incremental(tag: str, label: str, line: dict) -> None:
        copy = work / f"mtd_incremental_{tag}"
        make_copy(copy, {"mtd": line}, env, dump(partial_split))
        runs[f"held_back_{tag}"] = repro(copy, "mtd", env, work / f"mtd_held_back_{tag}.log")
        print_run(f"MTD without {len(held)} train images, {label}", runs[f"held_back_{tag}"])
        (copy / rel).write_text(dump(full_split)[rel])
        runs[f"incremental_{tag}"] = repro(copy, "mtd", env, work / f"mtd_incremental_{tag}.log")
        print_run(f"MTD incremental, {label}: +{len(held)} good images", runs[f"incremental_{tag}"])

    incremental("pts60", "PTS-60", MTD_LINE)
    ratio = ratio_line("MTD PTS-60", runs["incremental_pts60"], runs["full_pts60"], target)
    ratio_all = None
    if not skip_all:
        incremental("all", "ALL", MTD_LINE_ALL)
        ratio_all = ratio_line("MTD ALL", runs["incremental_all"], runs["held_back_all"], target)
    return {
        "settings": MTD_LINE,
        "data": {"split_file": rel, "train_images": len(full_split["train"]),
                 "test_images": sum(len(v) for part in ("dev", "holdout") for v in full_split[part].values()),
                 "held_back_train_stems": held},
        "runs": runs,
        "incremental_ratio": ratio["ratio"],
        "incremental_ratio_all": None if ratio_all is None else ratio_all["ratio"],
        "target": {"incremental_ratio_max": target, "met": ratio["met"],
                   "met_all": None if ratio_all is None else ratio_all["met"]},
    }


DEFINITIONS = {
    "seconds": "wall time of one `dvc repro report@<line>` (DVC start-up, hashing and caching included)",
    "stage_seconds": "time between DVC's 'Running stage' lines (the stage command + DVC saving its outputs)",
    "before_first_stage_seconds": "from starting dvc to its first 'Running stage' line",
    "stage_internal_seconds": "the stage's own timer from reports/<line>/*.json written by that run "
                              "(<stage>.json 'seconds'; report: model card timings); absent where no record has one",
    "records": "reports/<line>/*.json written by that run (large ones: their seconds fields only)",
    "metrics": "reports/<line>/metrics.json per subset; benchmark figures, not tuned",
}
