"""The DVC stages of a product line, one module per stage, each with ``run(ctx) -> dict`` (the stage's record).

``download -> validate -> tune -> extract -> template | train -> calibrate -> infer -> report``: a line's method
(:class:`~hetmm.modes.Method`) decides whether ``template`` (HETMM) or ``train`` (TFA-Net) makes its model. A stage reads the line's folders
(:class:`~hetmm.pipeline.line.LinePaths`), calls the method (:mod:`hetmm.core`) and writes its outputs atomically.
Persisted artifacts (feature cache, template, stored matches) are keyed on their settings *and* the code that made
them (:mod:`hetmm.pipeline.provenance`); a stage reuses one only when both match and records why it did or did not.
Importing this package imports no torch: :func:`stage` imports a stage module only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

STAGES = ("download", "validate", "tune", "extract", "template", "train", "calibrate", "infer", "report")
# The stage that makes each method's model (a line runs only its own method's), and the stem of that model's files:
# ``models/<line>/<stem>.pt`` and its record ``reports/<line>/<stem>.json`` (with the ``content_hash``).
MODEL_STAGES = {"hetmm": "template", "tfa_net": "train"}
MODEL_FILES = {"hetmm": "template", "tfa_net": "tfa_net"}


def require_method(line: Any, name: str) -> None:
    """Refuse to run the model stage ``name`` on a line of the other method, naming the stage it needs."""
    method = next(m for m, s in MODEL_STAGES.items() if s == name)
    if line.method != method:
        from hetmm.errors import ConfigError

        raise ConfigError(f"product_lines.{line.name}.method: the {name} stage is for method {method} lines; "
                          f"{line.name!r} uses {line.method} (its model comes from `hetmm "
                          f"{MODEL_STAGES[line.method]} {line.name}`)")


def stages_for(method: str) -> tuple[str, ...]:
    """The stages a line of ``method`` runs, in order."""
    skipped = {s for m, s in MODEL_STAGES.items() if m != method}
    return tuple(s for s in STAGES if s not in skipped)
# Stages that read the params.yaml entry itself; the later ones read the effective settings that ``tune`` writes.
PARAMS_STAGES = ("download", "validate", "tune")


def stage(name: str) -> Callable[[Any], dict]:
    """The ``run`` function of stage ``name`` (imported on demand, so light stages never load torch)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"hetmm.pipeline.{name}").run
