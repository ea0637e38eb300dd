"""Stage ``tune``: choose the line's unpinned settings on its good training images; write the effective settings.

Reads ``data/<line>/`` (train split only: no test image, label or mask is ever opened) and the line's
``params.yaml`` entry; writes ``models/<line>/settings.yaml`` (the effective settings every later stage reads,
:mod:`hetmm.pipeline.settings`), ``reports/<line>/tuning.json`` (every candidate, its scores and the choice) and
``reports/<line>/tuning.png``. A search (:mod:`hetmm.pipeline.tuning`) runs only when the line has tunable keys and
its key (tuning inputs: settings, pinned keys, code, the device profile) differs from the last search's, or when more
than ``tune.rerun_share`` of the training images it searched on were added or removed since; otherwise the recorded
choice is reused, so a change to, say, ``report.overlays`` or a few new good images cost no search.
"""

from __future__ import annotations

import time

from hetmm.config import TUNABLE
from hetmm.data.images import load_image
from hetmm.data.splits import seeded_sample, validation_split
from hetmm.io import sha256_json, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline import settings
from hetmm.pipeline.line import StageRun, read_json, split, validated_manifest
from hetmm.pipeline.provenance import tuning_code
from hetmm.pipeline.search_progress import SearchLines
from hetmm.pipeline.throughput import profile
from hetmm.report import plots

# Sections that cannot change what the search sees (the threshold and the report come after it).
_NOT_TUNING = ("threshold", "report")


# The parts of a search's key, as a rerun's reason names them.
_KEY_PARTS = {"settings": "the line's settings", "pinned": "the keys pinned in params.yaml",
              "code": "the tuning code", "device": "the device profile"}


def search_key(line) -> dict[str, str]:
    """What a search result depends on besides its training images (:func:`changed_share` covers those): a digest
    per part of :data:`_KEY_PARTS`."""
    used = {k: v for k, v in settings.sections(line).items() if k not in _NOT_TUNING}
    used["tune"] = {k: v for k, v in used["tune"].items() if k != "rerun_share"}  # decides when, not what
    device = profile(line.inspection.device) if line.inspection.min_images_per_second > 0 else None
    pinned = sorted(set(line.pinned) & set(TUNABLE))  # what the search may not change (the rest is in settings)
    parts = {"settings": used, "pinned": pinned, "code": tuning_code(), "device": device}
    return {name: sha256_json(value) for name, value in parts.items()}


def rerun_reason(previous: dict, key: dict[str, str], changed: float, rerun_share: float) -> str | None:
    """Why the recorded search cannot be reused (None: it can)."""
    if previous.get("action") not in ("searched", "reused"):
        return "no recorded search"
    old = previous.get("key")
    if not isinstance(old, dict):
        return "the recorded search predates per-part keys"
    differ = [what for name, what in _KEY_PARTS.items() if old.get(name) != key[name]]
    if differ:
        return "changed since the recorded search: " + ", ".join(differ)
    if changed > rerun_share:
        return f"{changed:.0%} of the searched training images added or removed (tune.rerun_share: {rerun_share:.0%})"
    return None


def changed_share(searched: list[str], shas: list[str]) -> float:
    """Share of the searched training images added or removed since: ``|searched ^ now| / |searched|``."""
    before, now = set(searched), set(shas)
    return len(before ^ now) / max(1, len(before))


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    train = split(validated_manifest(paths, line.name), "train")
    shas = list(train["sha256"])
    key = search_key(line)
    previous = read_json(paths.reports / "tuning.json")
    searched = previous.get("train")
    changed = changed_share(searched, shas) if isinstance(searched, list) else 1.0
    tunable = line.tunable()
    record: dict
    if not tunable:
        why = ("tune.enabled is false" if not line.tune.enabled else
               f"method {line.method} has no tunable keys" if not spec(line.method).tuning else
               "every tunable key is pinned in params.yaml")
        record = {"action": "none", "reason": why, "chosen": {}}
    elif (why := rerun_reason(previous, key, changed, line.tune.rerun_share)) is None:
        record = {**previous, "action": "reused", "reason": "same settings and code as the recorded search; "
                  f"{changed:.0%} of its training images added or removed (tune.rerun_share: "
                  f"{line.tune.rerun_share:.0%})"}
    else:
        record = _search(ctx, train, shas, why)
        record["train"] = sorted(set(shas))  # the set the search saw: later changes are measured against it
    record["key"] = key
    effective = line.with_keys(record["chosen"])
    settings.write_settings(paths.settings, effective, line, record["chosen"])
    write_json_atomic(paths.reports / "tuning.json", record)
    plots.tuning_png(paths.reports / "tuning.png", record.get("candidates", []), f"{line.name}: label-free tuning",
                     note=f"nothing tuned: {record['reason']}")
    summary = {k: record[k] for k in ("action", "reason", "chosen") if k in record}
    if "best" in record:
        summary["objective"] = {"before": record["baseline"]["objective"], "after": record["best"]["objective"]}
    return summary


def _search(ctx: StageRun, train, shas: list[str], why: str) -> dict:
    from hetmm.pipeline import tuning  # torch: only when a search runs
    from hetmm.pipeline.validation_set import validation_images

    line, paths, tune = ctx.line, ctx.paths, ctx.line.tune
    templates, normals = validation_split(shas, tune.validation_share, tune.max_validation, tune.seed)
    if not normals:
        return {"action": "none", "chosen": {},
                "reason": f"the line has {len(set(shas))} training image(s); tuning holds some out and needs >= 2"}
    templates = seeded_sample(templates, tune.max_templates, tune.seed, "tuning templates")
    path_of = dict(zip(train["sha256"], train["path"]))
    start = time.perf_counter()
    images = validation_images(line, paths, train, normals, tuning.EVAL_SIZE)
    evalset = tuning.evaluation_set(images)
    template_images = [load_image(paths.data / path_of[s]) for s in templates]
    native = max(max(im.size) for im in images.normals)
    lines = SearchLines(line, verbose=ctx.progress)  # phase lines even under `dvc repro` (--quiet)
    result = tuning.search(line, template_images, evalset, len(set(shas)), native, _device(ctx), lines)
    lines.close()
    return {"action": "searched", "reason": why, "tunable": list(line.tunable()),
            "chosen": result.chosen, "baseline": result.baseline, "best": result.best,
            "objective": "mean of image AUROC, pixel AUROC and AU-PRO on validation normals + synthetic defects",
            "validation": {"normals": normals, "templates": len(templates), "synthetic": len(images.defects),
                           "families": images.families},
            "stopped": result.stopped, "notes": result.notes,
            "seconds": round(time.perf_counter() - start, 1), "work_seconds": result.seconds,
            "candidates": result.candidates}


def _device(ctx: StageRun):
    from hetmm.core.device import resolve_device

    return resolve_device(ctx.device)
