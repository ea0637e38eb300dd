"""``hetmm exp run`` and ``hetmm exp show``: DVC experiments for people.

``exp run`` is ``dvc exp run`` that leaves the params files as they were when the experiment fails.

DVC writes the ``-S`` values into ``params.yaml`` before the first stage runs and leaves them there when a stage
fails, so a failed trial would stay in the workspace and be committed with the next change. Here the files are read
before DVC starts and written back, byte for byte, when ``dvc exp run`` exits non-zero (a successful run keeps
DVC's result). The arguments go to DVC as a list, never through a shell.

``exp show`` reads ``dvc exp show --json`` and prints what a person compares: per experiment the params.yaml keys
that differ and, per product line, the headline metrics in one cell; DVC's own table has a column for every
params leaf, metric and dependency of every line (hundreds with a few lines).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hetmm.errors import HetmmError
from hetmm.io import atomic_path


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")  # the dvc of this environment first
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if found is None:
        raise HetmmError("dvc is not installed in this environment: `make setup` installs it")
    return found


def run_experiment(dvc_args: list[str], params_files: tuple[Path, ...] = (Path("params.yaml"),)) -> tuple[int, list]:
    """Run ``dvc exp run <dvc_args>``; returns its exit code and the files restored after a failure."""
    before = {path: path.read_bytes() for path in params_files if path.is_file()}
    code = subprocess.run([_dvc(), "exp", "run", *dvc_args]).returncode
    restored = []
    if code != 0:
        for path, content in before.items():
            if not path.is_file() or path.read_bytes() != content:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(content)
                restored.append(path)
    return code, restored


# ----------------------------------------------------------------------------- hetmm exp show

HEADLINE = ("image_auroc", "pixel_auroc", "aupro")  # one cell per line: "99.4/99.4/96.8"
VALUE_WIDTH = 20  # a param cell longer than this is cut (``--json`` keeps it whole)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def experiment_rows(shown: list[dict]) -> list[dict]:
    """``dvc exp show --json`` as rows: name, created, the leaves of params.yaml, each line's headline metrics
    (``reports/<line>/metrics.json``), or the error DVC gave for that revision."""
    def row(rev: dict, name: str, depth: int) -> dict:
        data = rev.get("data")
        if not data:
            return {"name": name, "depth": depth, "created": "", "params": {}, "metrics": {},
                    "error": (rev.get("error") or {}).get("msg", "no data")}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        metrics = {}
        for path, found in (data.get("metrics") or {}).items():
            parts = Path(path).parts
            if len(parts) == 3 and parts[0] == "reports" and parts[2] == "metrics.json":
                metrics[parts[1]] = {k: (found.get("data") or {}).get(k) for k in HEADLINE}
        stamp = data.get("timestamp") or ""
        return {"name": name, "depth": depth, "created": stamp[:16].replace("T", " "), "error": "",
                "params": {k.removeprefix("product_lines."): v for k, v in _leaves(params).items()},
                "metrics": metrics}

    rows = []
    for baseline in shown:
        rev = str(baseline.get("rev", ""))
        rows.append(row(baseline, baseline.get("name") or (rev if rev == "workspace" else rev[:7]), 0))
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            rows.append(row(rev, exp.get("name") or rev.get("name") or str(rev.get("rev", ""))[:7], 1))
    return rows


def experiment_table(rows: list[dict], all_lines: bool = False) -> tuple[list[str], list[list[str]]]:
    """Columns and cells: experiment, created, the params.yaml keys whose values differ between the rows, then one
    column per line (its image AUROC / pixel AUROC / AU-PRO): the lines whose metrics or params differ, every
    line when none does or with ``all_lines``."""
    def text(value: Any) -> str:
        cell = json.dumps(value) if isinstance(value, (list, dict)) else "-" if value is None else str(value)
        return cell if len(cell) <= VALUE_WIDTH else cell[: VALUE_WIDTH - 1] + "~"

    keys = sorted({k for r in rows for k in r["params"]})
    changed = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in rows if not r["error"]}) > 1]
    lines = sorted({line for r in rows for line in r["metrics"]})
    moved = {line for line in lines if len({json.dumps(r["metrics"].get(line)) for r in rows if not r["error"]}) > 1}
    moved |= {k.split(".")[0] for k in changed if k.split(".")[0] in lines}
    shown = lines if all_lines or not moved else [line for line in lines if line in moved]

    def figures(metric: dict | None) -> str:
        if not metric:
            return "-"
        return "/".join("-" if metric.get(k) is None else f"{metric[k]:.1f}" for k in HEADLINE)

    columns = ["experiment", "created", *changed, *shown]
    cells = []
    for r in rows:
        name = ("  " * r["depth"]) + r["name"]
        if r["error"]:
            cells.append([name, "", f"error: {r['error']}"[:80]])
            continue
        cells.append([name, r["created"], *(text(r["params"].get(k)) for k in changed),
                      *(figures(r["metrics"].get(line)) for line in shown)])
    return columns, cells


def format_experiments(rows: list[dict], all_lines: bool = False) -> str:
    columns, cells = experiment_table(rows, all_lines)
    widths = [max(len(c), *(len(row[i]) for row in cells if i < len(row))) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    out.append("(per line: image AUROC / pixel AUROC / AU-PRO; params: the keys that differ; --all-lines, "
               "`dvc exp show`)")
    return "\n".join(out)


def show_experiments(dvc_args: list[str]) -> list[dict]:
    """``dvc exp show --json <dvc_args>``, parsed."""
    proc = subprocess.run([_dvc(), "exp", "show", "--json", *dvc_args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HetmmError(f"dvc exp show failed: {(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    return experiment_rows(json.loads(proc.stdout))
