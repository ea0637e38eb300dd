"""Stage ``tune``: choose the line's unpinned settings on its good training images; write the effective settings.

Reads ``data/<line>/`` (train split only: no test image, label or mask is ever opened) and the line's
``params.yaml`` entry; writes ``models/<line>/settings.yaml`` (the effective settings every later stage reads,
:mod:`hetmm.pipeline.settings`), ``reports/<line>/tuning.json`` (every candidate, its scores and the choice) and
``reports/<line>/tuning.png``. A search (:mod:`hetmm.pipeline.tuning`) runs only when the line has tunable keys and
its key (tuning inputs: settings, pinned keys, training images, code) differs from the last search's; otherwise the
recorded choice is reused, so a change to, say, ``report.overlays`` costs no search.
"""

from __future__ import annotations

import sys
import time

from hetmm.config import TUNABLE_KEYS
from hetmm.data.images import load_image
from hetmm.data.splits import seeded_sample, validation_split
from hetmm.io import sha256_json, write_json_atomic
from hetmm.methods import spec
from hetmm.pipeline import settings
from hetmm.pipeline.line import StageRun, read_json, split, validated_manifest
from hetmm.pipeline.provenance import tuning_code
from hetmm.report import plots
from hetmm.report.progress import Phases

# Sections that cannot change what the search sees (the threshold and the report come after it).
_NOT_TUNING = ("threshold", "report")


def search_key(line, shas: list[str]) -> str:
    """Everything a search result depends on; equal keys give the same choice (up to measured speeds)."""
    used = {k: v for k, v in settings.sections(line).items() if k not in _NOT_TUNING}
    return sha256_json({"settings": used, "pinned": sorted(line.pinned), "train": sorted(set(shas)),
                        "code": tuning_code()})


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    train = split(validated_manifest(paths, line.name), "train")
    shas = list(train["sha256"])
    key = search_key(line, shas)
    previous = read_json(paths.reports / "tuning.json")
    tunable = line.tunable()
    record: dict
    if not tunable:
        why = ("tune.enabled is false" if not line.tune.enabled else
               f"method {line.method} has no tunable keys" if not spec(line.method).tuning else
               "every tunable key is pinned in params.yaml")
        record = {"action": "none", "reason": why, "chosen": {}}
    elif previous.get("key") == key and previous.get("action") in ("searched", "reused"):
        record = {**previous, "action": "reused", "reason": "same training images, settings and code as the "
                  "recorded search"}
    else:
        record = _search(ctx, train, shas)
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


def _search(ctx: StageRun, train, shas: list[str]) -> dict:
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
    lines = _SearchLines(line, verbose=ctx.progress)  # phase lines even under `dvc repro` (--quiet)
    result = tuning.search(line, template_images, evalset, len(set(shas)), native, _device(ctx), lines)
    lines.close()
    return {"action": "searched", "reason": "tunable keys: " + ", ".join(line.tunable()),
            "chosen": result.chosen, "baseline": result.baseline, "best": result.best,
            "objective": "mean of image AUROC, pixel AUROC and AU-PRO on validation normals + synthetic defects",
            "validation": {"normals": normals, "templates": len(templates), "synthetic": len(images.defects),
                           "families": images.families},
            "stopped": result.stopped, "notes": result.notes,
            "seconds": round(time.perf_counter() - start, 1), "work_seconds": result.seconds,
            "candidates": result.candidates}


class _SearchLines:
    """The search's per-candidate callback (``"<pass> <key>: objective <x>"``) as one progress phase per pass, with
    its candidate count (at most the options of its tunable keys) and an ETA within the time budget."""

    def __init__(self, line, verbose: bool):
        self.line, self.verbose, self.phase = line, verbose, None
        self.phases = Phases(f"tune@{line.name}")
        self.start = self.last = time.monotonic()
        n, tunable = len(line.features.layers), set(line.tunable())

        def candidates(phase: str) -> int:  # at most the options of the phase's tunable keys
            return sum(len(k.options) * (n if k.per_layer else 1) for name, k in TUNABLE_KEYS.items()
                       if k.phase == phase and name in tunable)

        matching = candidates("matching")
        self.planned = {"baseline": 1, "matching": matching, "matching (final features)": matching,
                        "features": candidates("features")}

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"tune {self.line.name}: {message}", file=sys.stderr)
        name = message.split(":")[0].rsplit(" ", 1)[0]  # keys have no spaces, pass names may
        if self.phase is None or self.phase.name != name:
            self.close()
            left = max(self.line.tune.budget_s - (time.monotonic() - self.start), 0.0)
            self.phase = self.phases.start(name, self.planned.get(name), "candidates", limit_s=left)
            self.phase.start = self.last  # its first candidate began when the previous one ended
        self.last = time.monotonic()
        self.phase.advance()

    def close(self) -> None:
        if self.phase is not None:
            self.phase.finish()
            self.phase = None


def _device(ctx: StageRun):
    from hetmm.core.device import resolve_device

    return resolve_device(ctx.device)
