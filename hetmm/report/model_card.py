"""Model cards: a report's facts (data and template hashes, settings, metrics, code version) as JSON and markdown.

:func:`decision_sections` says how the deployed thresholds were chosen, in words (:func:`decision`) and figures, so
that a reader can tell a deployable threshold (validation normals, synthetic defects, a given value) from an oracle
one (read off the test labels).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hetmm import __version__
from hetmm.core.thresholds import RULES
from hetmm.io import json_safe, write_json_atomic, write_text_atomic
from hetmm.modes import ThresholdRule


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_cell(value: Any) -> bool:
    """Fits in one table cell: a scalar, a flat list (a shape) or a flat dict (a confusion matrix)."""
    if isinstance(value, Mapping):
        return all(_is_scalar(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_scalar(v) for v in value)
    return _is_scalar(value)


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{_cell(k)}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """GitHub markdown table of dict rows; columns default to every key, in first-seen order.

    Numeric columns are right-aligned; None / NaN print as ``n/a``, a missing key as an empty cell.
    """
    rows = [json_safe(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if not columns:
        return ""
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |"]
    aligns = []
    for c in columns:
        present = [r[c] for r in rows if r.get(c) is not None]
        numeric = bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        aligns.append("---:" if numeric else "---")
    lines.append("| " + " | ".join(aligns) + " |")
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) if c in r else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def code_version(root: Path | None = None) -> str:
    """The commit of the source checkout ``root`` (default: the one holding this package), with
    `` (hetmm/ modified)`` when the package's own sources differ from it, else ``hetmm <version>``. Not
    ``git describe --dirty``: earlier stages rewrite dvc.lock during a run, which is not a change of code."""
    root = root or Path(__file__).resolve().parents[2]
    # only ask git when hetmm itself is a checkout; an installed copy could sit inside another repo
    if (root / ".git").exists():
        try:
            commit = _git_out(root, "rev-parse", "HEAD")
            modified = _git_out(root, "status", "--porcelain", "--untracked-files=all", "--", "hetmm")
            if commit:
                return commit + (" (hetmm/ modified)" if modified else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return f"hetmm {__version__}"


def _git_out(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


ORACLE_NOTE = "F1-max with the threshold read off the test labels: an optimistic figure, not deployable"


def decision(threshold: Mapping[str, Any], calibration: Mapping[str, Any]) -> str:
    """One sentence: the deployed rule, where its image threshold came from, and the pixel threshold's origin."""
    t, rule = threshold["threshold"], threshold["rule"]
    image = RULES[ThresholdRule(rule)].describe(threshold, calibration)
    f1 = calibration.get("pixel", {}).get("f1")
    return (f"rule {rule}: image threshold {_cell(float(t))}, {image}. Pixel threshold "
            f"{_cell(float(threshold['pixel_threshold']))}: F1-max over the pixels of the synthetic defects and "
            f"validation normals (F1 {'n/a' if f1 is None else f'{f1:.1f}'} %).")


def calibration_summary(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibrate stage's record for a card: counts instead of the per-image lists."""
    out = {k: v for k, v in calibration.items() if k not in ("validation_normals", "normals")}
    out = {"validation_normals": len(calibration.get("validation_normals", [])),
           **({"calibration_normals": len(calibration["normals"])} if "normals" in calibration else {}), **out}
    if "image" in out:
        out["image"] = {k: v for k, v in out["image"].items() if k != "normal_scores"}
    return out


def decision_sections(threshold: Mapping[str, Any], calibration: Mapping[str, Any], summary: Mapping[str, Any],
                      tuned: Sequence[str]) -> dict[str, Any]:
    """The card's account of the decision: the :func:`decision` sentence, the ``threshold.json`` record, the
    oracle F1 (named as such), the calibration it came from and the keys the tuner chose."""
    shown = {k: v for k, v in threshold.items() if k != "calibration"}  # the per-normal scores stay in the file
    return {"decision": decision(threshold, calibration), "threshold": shown,
            "oracle": {"f1_max": summary.get("f1_max"), "f1_threshold": summary.get("f1_threshold"),
                       "note": ORACLE_NOTE},
            "calibration": calibration_summary(calibration), "tuned_keys": list(tuned)}


def throughput_section(speed: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card's throughput: the contract (floor and the device it is for), the cost model's estimate and the
    speed the infer stage measured, with a verdict sentence."""
    if not speed:
        return {"verdict": "not measured (no test images)"}
    c = speed["contract"]
    floor, met = c["min_images_per_second"], speed.get("contract_met")
    measured = (f"measured {speed['work_images_per_second']} images/s of its own work at batch 8 on {speed['device']} "
                f"({speed['images_per_second']} wall)")
    if not floor:
        verdict = f"no contract (inspection.min_images_per_second is 0); {measured}"
    elif met is None:
        verdict = f"contract >= {floor} images/s on {c['device']}, not checked: {measured}"
    else:
        verdict = (f"contract >= {floor} images/s on {c['device']} {'MET' if met else 'NOT MET'}: {measured}"
                   + ("" if met else " (the infer stage warned)"))
    estimate = c.get("estimated_images_per_second")
    model = (f"{estimate} images/s estimated by the cost model (device profile hetmm/resources/device_profile.json), "
             "the figure the search holds candidates to" if estimate is not None else
             "no cost-model estimate for this method")
    return {"verdict": verdict, "cost_model": model, "contract_device": c["device"],
            "contract_met": met, "measured": {k: v for k, v in speed.items() if k != "contract"}}


def _title(key: str) -> str:
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def _render(value: Any, level: int) -> list[str]:
    """Markdown lines for one card value; nesting that does not fit a table becomes sub-headings."""
    if isinstance(value, (Mapping, list)) and not value:
        return ["(none)", ""]
    if _is_scalar(value):
        return [_cell(value), ""]
    if isinstance(value, Mapping):
        if all(isinstance(v, Mapping) and all(_is_cell(x) for x in v.values()) for v in value.values()):
            return [markdown_table([{"name": k, **v} for k, v in value.items()])]
        lines: list[str] = []
        cells = {k: v for k, v in value.items() if _is_cell(v)}
        if cells:
            lines.append(markdown_table([{"key": k, "value": v} for k, v in cells.items()]))
        for k, v in value.items():
            if k not in cells:
                lines += ["#" * min(level, 6) + " " + _title(k), "", *_render(v, level + 1)]
        return lines
    if all(isinstance(v, Mapping) for v in value):
        return [markdown_table(value)]
    if all(_is_scalar(v) for v in value):
        return [*(f"- {_cell(v)}" for v in value), ""]
    return ["```json", json.dumps(value, indent=2), "```", ""]


def model_card(path_md: str | Path, path_json: str | Path, info: Mapping[str, Any]) -> None:
    """Write ``info`` as a JSON model card and as markdown, both atomically.

    The markdown is generic: top-level scalars (hashes, threshold, code version, ...) form the
    first table, then one section per remaining key, with key / value tables for dicts, row
    tables for dicts of dicts and lists of dicts, and sub-headings for deeper nesting; flat lists
    and dicts inside a table are written inline. ``code_version`` is filled in when missing.
    ``title`` (optional) becomes the heading. No timestamp is added, so that an unchanged run
    reproduces byte-identical files (DVC would otherwise see a new output every time).
    """
    card = json_safe(info)
    if "code_version" not in card:
        card["code_version"] = code_version()
    title = card.pop("title", "HETMM model card")
    lines = [f"# {title}", ""]
    scalars = {k: v for k, v in card.items() if _is_scalar(v)}
    if scalars:
        lines.append(markdown_table([{"field": k, "value": v} for k, v in scalars.items()]))
    for key, value in card.items():
        if not _is_scalar(value):
            lines += [f"## {_title(key)}", "", *_render(value, 3)]
    write_text_atomic(path_md, "\n".join(lines).rstrip() + "\n")
    write_json_atomic(path_json, {"title": title, **card})
