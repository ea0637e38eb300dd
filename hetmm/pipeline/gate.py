"""The promotion gate: a new version of a line is compared with the last blessed one before it is deployed.

:func:`judge` is the decision alone (pure): on the labelled test images both versions scored (the same images, by
sha256), recall at each version's deployed threshold, the false-alarm rate on the good ones and image AUROC; the
``gate`` settings (:class:`hetmm.config.GateConfig`) turn them into a verdict:

* ``pass``: no check failed, or there is no previous version (``first``); ``off``: the gate does not check;
* ``warn``: a check failed and ``mode`` is ``warn``: the version is deployed, the verdict says what failed;
* ``fail``: a check failed and ``mode`` is ``fail``: the version is refused, naming the images it newly misses.

A blessed version (any verdict but ``fail``) becomes the next baseline: :func:`bless` saves ``models/<line>/
blessed.json`` (its model hash, threshold and test scores) and a hard link (or copy) of its model file under
``models/<line>/blessed/``. A refused one is recorded there (:func:`refuse`), so ``hetmm predict`` keeps the blessed
model and threshold (:func:`blessed_model`) while the line's model file holds the refused candidate.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hetmm.config import GateConfig, ProductLine
from hetmm.core.metrics import image_auroc
from hetmm.errors import DataError
from hetmm.io import atomic_path, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline.line import LinePaths

BLESSED = "blessed.json"


def figures(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Recall on the defects and false-alarm rate on the good images at ``threshold``, and image AUROC (%)."""
    flagged = scores >= threshold
    defects, good = labels.sum(), (~labels).sum()
    return {"recall": float(flagged[labels].mean()) if defects else None,
            "false_alarm_rate": float(flagged[~labels].mean()) if good else None,
            "image_auroc": image_auroc(scores, labels) if 0 < defects < len(labels) else None,
            "images": int(len(labels))}


def judge(gate: GateConfig, baseline: dict | None, current: dict[str, float], labels: dict[str, bool],
          threshold: float, names: dict[str, str]) -> dict[str, Any]:
    """The verdict on the version whose test scores (``current``: sha256 -> score, labelled images only) and deployed
    ``threshold`` are given, against ``baseline`` (:func:`load_baseline`, or None); ``names``: sha256 -> path."""
    now = np.array([current[s] for s in current])
    truth = np.array([labels[s] for s in current])
    out: dict[str, Any] = {"mode": gate.mode, "current": figures(now, truth, threshold), "checks": [],
                           "newly_missed": []}
    if baseline is not None:
        common = [s for s in current if s in baseline["scores"]]
        y = np.array([labels[s] for s in common], dtype=bool)
        new = np.array([current[s] for s in common])
        old = np.array([baseline["scores"][s] for s in common])
        before, after = figures(old, y, baseline["threshold"]), figures(new, y, threshold)
        missed = [names[s] for s, lab, o, n in zip(common, y, old, new, strict=True)
                  if lab and o >= baseline["threshold"] and n < threshold]
        out.update(baseline_model_hash=baseline["model_hash"], same_images=len(common), previous=before,
                   candidate=after, newly_missed=sorted(missed))
        if before["recall"] is not None and after["recall"] is not None:
            drop = before["recall"] - after["recall"]
            out["checks"].append({"check": "max_recall_drop", "limit": gate.max_recall_drop, "value": round(drop, 6),
                                  "ok": drop <= gate.max_recall_drop + 1e-12})
    if gate.max_false_alarm_rate is not None and out["current"]["false_alarm_rate"] is not None:
        rate = out["current"]["false_alarm_rate"]
        out["checks"].append({"check": "max_false_alarm_rate", "limit": gate.max_false_alarm_rate,
                              "value": round(rate, 6), "ok": rate <= gate.max_false_alarm_rate + 1e-12})
    failed = [c["check"] for c in out["checks"] if not c["ok"]]
    if gate.mode == "off":
        verdict = "off"
    elif failed:
        verdict = gate.mode
    else:
        verdict = "pass"
    out.update(verdict=verdict, failed=failed, blessed=verdict != "fail", first=baseline is None)
    out["summary"] = summary(out)
    return out


def summary(verdict: dict) -> str:
    """One line for the console, the model card and the error of a refused version."""
    head = {"pass": "passed", "off": "off (not checked)", "warn": "WARNING", "fail": "REFUSED"}[verdict["verdict"]]
    if verdict["first"] and verdict["verdict"] in ("pass", "off"):
        return f"gate {head}: no previous blessed version to compare with; this one becomes the baseline"
    parts = [f"{c['check']} {c['value']:.4g} > {c['limit']:.4g}" for c in verdict["checks"] if not c["ok"]]
    text = f"gate {head}" + (f": {'; '.join(parts)}" if parts else "")
    if "previous" in verdict:
        p, c = verdict["previous"], verdict["candidate"]
        text += (f" (on {verdict['same_images']} test images: recall {_pct(p['recall'])} -> {_pct(c['recall'])}, "
                 f"false alarms {_pct(p['false_alarm_rate'])} -> {_pct(c['false_alarm_rate'])})")
    if verdict["newly_missed"]:
        text += f"; newly missed: {', '.join(verdict['newly_missed'])}"
    return text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def load_baseline(paths: LinePaths) -> dict | None:
    """The last blessed version's record, or None (first version, or a record no longer readable)."""
    path = paths.models / BLESSED
    try:
        record = json.loads(path.read_text())
        return record if {"model_hash", "threshold", "scores"} <= set(record) else None
    except (OSError, ValueError):
        return None


def bless(paths: LinePaths, model: Path, model_hash: str, threshold: float, scores: dict[str, float]) -> None:
    """Make this version the baseline: a link (or copy) of its model file and its record, each replaced atomically."""
    copy = paths.models / "blessed" / model.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    if model.is_file():
        with atomic_path(copy) as tmp:
            tmp.unlink()
            try:
                os.link(model, tmp)  # the model stages replace their file atomically, so a link keeps this version
            except OSError:
                shutil.copy2(model, tmp)
    write_json_atomic(paths.models / BLESSED, {"model_hash": model_hash, "threshold": threshold,
                                               "model_copy": str(copy.relative_to(paths.models)), "scores": scores,
                                               "refused": None})


def refuse(paths: LinePaths, baseline: dict, verdict: dict, model_hash: str) -> None:
    """Record the refused candidate beside the baseline (which stays as it is)."""
    write_json_atomic(paths.models / BLESSED, {**baseline, "refused": {
        "model_hash": model_hash, "newly_missed": verdict["newly_missed"], "failed": verdict["failed"]}})


def blessed_model(paths: LinePaths, model_hash: str) -> Path | None:
    """The blessed model file to use instead of the line's model when the gate refused that model, else None."""
    record = load_baseline(paths)
    if not record or (record.get("refused") or {}).get("model_hash") != model_hash:
        return None
    copy = paths.models / record["model_copy"]
    return copy if copy.is_file() else None


def check(line: ProductLine, paths: LinePaths, test: pd.DataFrame, scores: np.ndarray, threshold: float) -> dict:
    """The report stage's verdict on this version (labelled test rows ``test`` and their ``scores``)."""
    current = dict(zip(test["sha256"], scores.tolist(), strict=True))
    verdict = judge(line.gate, load_baseline(paths), current,
                    dict(zip(test["sha256"], (test["label"] == "defect").tolist(), strict=True)), threshold,
                    dict(zip(test["sha256"], test["path"], strict=True)))
    return verdict


def promote(line: ProductLine, paths: LinePaths, verdict: dict, test: pd.DataFrame, scores: np.ndarray,
            threshold: dict) -> None:
    """Bless this version (the next baseline) and print the verdict in one line, or refuse it: exit 1 naming the
    images it newly misses. Called once the report is in place, so a report that failed says nothing of a gate."""
    model_hash = threshold["model_hash"]
    if verdict["blessed"]:
        print(f"{line.name}: {verdict['summary']}", file=sys.stderr)
        bless(paths, paths.models / f"{spec(line.method).model_file}.pt", model_hash, threshold["threshold"],
              dict(zip(test["sha256"], scores.tolist(), strict=True)))
        return
    refuse(paths, load_baseline(paths) or {}, verdict, model_hash)
    raise DataError(f"{paths.models / BLESSED}: {line.name} version {str(model_hash)[:12]} not deployed, "
                    f"{verdict['summary']}; predict keeps the last blessed version (fix the cause, or set "
                    "gate.mode to warn to deploy it anyway)")
