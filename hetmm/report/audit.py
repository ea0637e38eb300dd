"""Audit trail: which template version inspected which product line, read from git history.

Each report run writes ``reports/<line>/model_card.json`` (kept in git, not in the DVC cache), holding
the data manifest hash, the template's content hash, the params and the metrics. Walking the commits
that touched those files lists every template version a line has had.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hetmm.errors import HetmmError

CARD = "model_card.json"


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HetmmError(f"{root}: cannot read git history ({exc}); audit needs a git checkout") from exc


def audit_history(root: str | Path = ".", line: str | None = None) -> list[dict]:
    """Rows (newest first) of commit, date, line, template hash, data hash, kind/size and headline metrics."""
    root = Path(root)
    pattern = f"reports/{line or '*'}/{CARD}"
    log = _git(root, "log", "--format=%H%x09%cI%x09%s", "--", pattern)
    rows = []
    for entry in filter(None, log.splitlines()):
        commit, date, subject = entry.split("\t", 2)
        names = _git(root, "show", "--name-only", "--format=", commit, "--", pattern).split()
        for name in names:
            try:
                card = json.loads(_git(root, "show", f"{commit}:{name}"))
            except (HetmmError, json.JSONDecodeError):
                continue  # the file was deleted in this commit
            template = card.get("template", {})
            metrics = card.get("metrics", {}).get("all", {})
            rows.append({
                "commit": commit[:10], "date": date, "subject": subject, "line": card.get("product_line"),
                "template_hash": (template.get("content_hash") or "")[:12],
                "template": f"{template.get('kind')}x{template.get('sheets')}",
                "action": template.get("action"),
                "data_hash": (card.get("data", {}).get("manifest_sha256") or "")[:12],
                "backbone": card.get("params", {}).get("features", {}).get("backbone"),
                "image_auroc": metrics.get("image_auroc"), "pixel_auroc": metrics.get("pixel_auroc"),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no model cards in git history (commit reports/<line>/model_card.json after `dvc repro`)"
    columns = ["commit", "date", "line", "template", "template_hash", "action", "data_hash", "backbone",
               "image_auroc", "pixel_auroc"]
    cells = [[("" if r[c] is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
