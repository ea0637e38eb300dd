"""Audit trail: which template version, made from which data and code, with which settings and threshold,
inspected which product line, and when; read from git history.

Each report run writes ``reports/<line>/model_card.json`` (kept in git, not in the DVC cache), holding the data
manifest hash, the template's content hash, the code version, the params, the deployed threshold and the metrics.
Walking the commits of a branch that touched those files lists every template version the line has had on it. A
version stays in use on a branch until the next one, so a period's versions on a branch are the ones committed in
it plus the one in use when it began. By default only the current branch is read; ``all_refs`` reads every branch,
tag and DVC experiment, each on its own (DVC's internal refs, ``refs/exps/exec/...`` and the like, never).
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import date, datetime, time, timezone
from pathlib import Path

from hetmm.errors import ConfigError, HetmmError

CARD = "model_card.json"
# the terminal view: every column capped so that a row fits 120 characters (``--json`` keeps every value whole)
TABLE = ("commit", "date", "author", "line", "template", "model_hash", "data_hash", "code", "threshold", "gate",
         "image_auroc", "pixel_auroc", "aupro")
HEADINGS = {"model_hash": "model#", "data_hash": "data#", "image_auroc": "img_auroc",
            "pixel_auroc": "px_auroc"}
WIDTHS = {"commit": 8, "date": 16, "author": 9, "ref": 14, "line": 9, "template": 8, "model_hash": 9,
          "data_hash": 8, "code": 8, "gate": 4}
# a DVC experiment as `dvc exp` names it: refs/exps/<2 hex>/<38 hex>/<name>; everything else under refs/exps is
# DVC's own bookkeeping (exec/EXEC_HEAD, stash, celery, ...)
EXPERIMENT_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+$")


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


def refs(root: str | Path = ".", all_refs: bool = False) -> list[str]:
    """The refs the audit reads: the current branch (``HEAD`` when detached), or every branch, remote branch, tag
    and DVC experiment, never DVC's internal refs."""
    current = _git(Path(root), "rev-parse", "--symbolic-full-name", "HEAD").strip() or "HEAD"
    if not all_refs:
        return [current]
    listed = [current]  # first, then branches, tags, remote branches and experiments
    for kind in ("refs/heads", "refs/tags", "refs/remotes", "refs/exps"):
        listed += [r for r in _git(Path(root), "for-each-ref", "--format=%(refname)", kind).split()
                   if r != current and not r.endswith("/HEAD") and (kind != "refs/exps" or EXPERIMENT_REF.match(r))]
    return listed


def audit_history(root: str | Path = ".", line: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, all_refs: bool = False, malformed: list[str] | None = None
                  ) -> list[dict]:
    """One row per committed model card (newest first) on the current branch (``all_refs``: on every branch, tag
    and experiment, one row per ref a version was in use on): full commit, author, date, the ref, the line, the
    template (kind, sheets, content hash), the data manifest hash, the code version, the params, the deployed
    threshold and rule, and the headline metrics. ``since`` / ``until`` keep the versions in use on the ref in
    that period (see the module docstring). A committed file that is no model card (not a JSON object) is left out
    and named in ``malformed`` (``<commit>:<path>``)."""
    root = Path(root)
    # The line name never reaches git (a name like ':(glob)**' or '-n1' is pathspec magic or an option); the
    # cards are filtered by their path instead.
    pattern = f"reports/*/{CARD}"
    wanted = None if line is None else f"reports/{line}/{CARD}"
    cards: dict[tuple[str, str], dict | None] = {}  # (commit, path) -> card, read once for all refs
    rows = []
    for ref in refs(root, all_refs):
        if not _git(root, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}").strip():
            continue  # a branch without commits yet
        per_ref = []
        log = _git(root, "log", ref, "--format=%H%x09%an <%ae>%x09%cI%x09%s", "--", pattern)
        for entry in filter(None, log.splitlines()):
            commit, author, when, subject = entry.split("\t", 3)
            for name in _git(root, "show", "--name-only", "--format=", commit, "--", pattern).split():
                if wanted is not None and name != wanted:
                    continue
                if (commit, name) not in cards:
                    cards[commit, name] = _card(root, commit, name, malformed)
                if cards[commit, name] is not None:
                    per_ref.append(_row(cards[commit, name], commit, author, when, _short(ref), subject))
        per_ref.sort(key=lambda r: datetime.fromisoformat(r["date"]), reverse=True)
        rows += _in_period(per_ref, since, until)
    merged: dict[tuple[str, str], dict] = {}  # a version in use on several refs: one row naming them all
    for row in rows:
        seen = merged.setdefault((row["commit"], row["line"]), row)
        if seen is not row:
            seen["ref"] += f", {row['ref']}"
    return sorted(merged.values(), key=lambda r: datetime.fromisoformat(r["date"]), reverse=True)


def _short(ref: str) -> str:
    """``main``, ``origin/main``, ``v1.0``, or an experiment's name (``exp:<name>``)."""
    if ref.startswith("refs/exps/"):
        return "exp:" + ref.rsplit("/", 1)[1]
    for prefix in ("refs/heads/", "refs/remotes/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


def _card(root: Path, commit: str, name: str, malformed: list[str] | None) -> dict | None:
    """The committed card, or None: deleted in this commit, or not a JSON object (named in ``malformed``)."""
    try:
        card = json.loads(_git(root, "show", f"{commit}:{name}"))
    except HetmmError:
        return None  # the file was deleted in this commit
    except json.JSONDecodeError:
        card = None
    if not isinstance(card, dict):
        if malformed is not None and f"{commit[:12]}:{name}" not in malformed:
            malformed.append(f"{commit[:12]}:{name}")
        return None
    return card


def _part(value) -> dict:
    return value if isinstance(value, dict) else {}  # a hand-edited card may hold anything


def _row(card: dict, commit: str, author: str, when: str, ref: str, subject: str) -> dict:
    template, threshold = _part(card.get("template")), _part(card.get("threshold"))
    metrics = _part(_part(card.get("metrics")).get("all"))
    params = _part(card.get("params"))
    return {
        "commit": commit, "date": when, "author": author, "ref": ref, "subject": subject,
        "line": card.get("product_line"), "template": f"{template.get('kind')}x{template.get('sheets')}",
        "model_hash": template.get("content_hash"), "template_action": template.get("action"),
        "data_hash": _part(card.get("data")).get("manifest_sha256"), "code": card.get("code_version"),
        "threshold": threshold.get("threshold"), "threshold_rule": threshold.get("rule"),
        # the promotion gate's verdict (pass / warn / fail / off); cards from before the gate have none
        "gate": _part(card.get("gate")).get("verdict"),
        "backbone": _part(params.get("features")).get("backbone"),
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


def format_table(rows: list[dict], all_refs: bool = False) -> str:
    """The rows as a table of at most 120 characters a line (with ``all_refs`` a ``ref`` column is added); under it
    the ref it was read from."""
    if not rows:
        return "no model cards in git history (commit reports/<line>/model_card.json after `dvc repro`)"
    columns = ("ref", *TABLE) if all_refs else TABLE
    values = [{**r, "date": datetime.fromisoformat(r["date"]).strftime("%Y-%m-%d %H:%M"),
               "author": r["author"].split(" <")[0]} for r in rows]
    cells = [[_cell(v[c], WIDTHS.get(c)) for c in columns] for v in values]
    heads = [HEADINGS.get(c, c) for c in columns]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    lines = [" ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += [" ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    if not all_refs:
        lines.append(f"(versions in use on {rows[0]['ref']}; --all-refs: every branch and experiment; --json: "
                     "every value whole)")
    return "\n".join(lines)


def _cell(value, width: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)[:width] if width else str(value)
