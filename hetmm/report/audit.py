"""Audit trail: which template version, made from which data and code, with which settings and threshold,
inspected which product line, and when; read from git history.

Each report run writes ``reports/<line>/model_card.json`` (kept in git, not in the DVC cache), holding the data
manifest hash, the template's content hash, the code version, the params, the deployed threshold and the metrics.
Walking every commit that touched those files, on every branch and DVC experiment ref, lists every template
version a line has had. A version stays in use on its ref until the next one, so a period's versions are the ones
committed in it plus, per ref, the one in use when it began.
"""

from __future__ import annotations

import json
import subprocess
from datetime import date, datetime, time, timezone
from pathlib import Path

from hetmm.errors import ConfigError, HetmmError

CARD = "model_card.json"
TABLE = ("commit", "date", "author", "ref", "line", "template", "model_hash", "data_hash", "code", "threshold",
         "gate", "image_auroc", "pixel_auroc", "aupro")


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HetmmError(f"{root}: cannot read git history ({exc}); audit needs a git checkout") from exc


def parse_when(text: str | None, option: str, end: bool = False) -> datetime | None:
    """An ISO date (``2026-12-01``: its start, or its end with ``end``) or date-time; naive means UTC."""
    if text is None:
        return None
    try:
        when = (datetime.combine(date.fromisoformat(text), time.max if end else time.min) if len(text) == 10
                else datetime.fromisoformat(text))
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not an ISO date or date-time (e.g. 2026-12-01 or "
                          "2026-12-01T08:00+01:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def audit_history(root: str | Path = ".", line: str | None = None, since: datetime | None = None,
                  until: datetime | None = None) -> list[dict]:
    """One row per committed model card (newest first), on every branch and experiment ref: full commit, author,
    date, the ref it was found on, the line, the template (kind, sheets, content hash), the data manifest hash,
    the code version, the params, the deployed threshold and rule, and the headline metrics. ``since`` /
    ``until`` keep the versions in use in that period (see the module docstring)."""
    root = Path(root)
    # The line name never reaches git (a name like ':(glob)**' or '-n1' is pathspec magic or an option); the
    # cards are filtered by their path instead.
    pattern = f"reports/*/{CARD}"
    wanted = None if line is None else f"reports/{line}/{CARD}"
    log = _git(root, "log", "--all", "--source", "--format=%H%x09%an <%ae>%x09%cI%x09%S%x09%s", "--", pattern)
    rows = []
    for entry in filter(None, log.splitlines()):
        commit, author, when, ref, subject = entry.split("\t", 4)
        for name in _git(root, "show", "--name-only", "--format=", commit, "--", pattern).split():
            if wanted is not None and name != wanted:
                continue
            try:
                card = json.loads(_git(root, "show", f"{commit}:{name}"))
            except (HetmmError, json.JSONDecodeError):
                continue  # the file was deleted in this commit
            rows.append(_row(card, commit, author, when, ref, subject))
    rows.sort(key=lambda r: datetime.fromisoformat(r["date"]), reverse=True)
    return _in_period(rows, since, until)


def _row(card: dict, commit: str, author: str, when: str, ref: str, subject: str) -> dict:
    template, threshold = card.get("template", {}), card.get("threshold", {})
    metrics = card.get("metrics", {}).get("all", {})
    params = card.get("params", {})
    return {
        "commit": commit, "date": when, "author": author, "ref": ref, "subject": subject,
        "line": card.get("product_line"), "template": f"{template.get('kind')}x{template.get('sheets')}",
        "model_hash": template.get("content_hash"), "template_action": template.get("action"),
        "data_hash": card.get("data", {}).get("manifest_sha256"), "code": card.get("code_version"),
        "threshold": threshold.get("threshold"), "threshold_rule": threshold.get("rule"),
        # the promotion gate's verdict (pass / warn / fail / off); cards from before the gate have none
        "gate": card.get("gate", {}).get("verdict"),
        "backbone": params.get("features", {}).get("backbone"),
        "image_auroc": metrics.get("image_auroc"), "pixel_auroc": metrics.get("pixel_auroc"),
        "aupro": metrics.get("aupro"), "params": params,
    }


def _in_period(rows: list[dict], since: datetime | None, until: datetime | None) -> list[dict]:
    """Rows (newest first) committed in [since, until], plus per line and ref the newest one before ``since``."""
    kept, started = [], set()
    for row in rows:
        when = datetime.fromisoformat(row["date"])
        if until is not None and when > until:
            continue
        if since is None or when >= since:
            kept.append(row)
        elif (row["line"], row["ref"]) not in started:  # in use on that ref when the period began
            kept.append(row)
            started.add((row["line"], row["ref"]))
    return kept


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no model cards in git history (commit reports/<line>/model_card.json after `dvc repro`)"
    short = {"commit": 10, "model_hash": 12, "data_hash": 12, "code": 12}
    cells = [[_cell(r[c], short.get(c)) for c in TABLE] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(TABLE)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value, width: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)[:width] if width else str(value)
