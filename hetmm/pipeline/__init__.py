"""The DVC stages of a product line, one module per stage, each with ``run(ctx) -> dict`` (the stage's record).

``download -> validate -> tune -> extract -> template -> calibrate -> infer -> report``. A stage reads the line's folders
(:class:`~hetmm.pipeline.line.LinePaths`), calls the method (:mod:`hetmm.core`) and writes its outputs atomically.
Persisted artifacts (feature cache, template, stored matches) are keyed on their settings *and* the code that made
them (:mod:`hetmm.pipeline.provenance`); a stage reuses one only when both match and records why it did or did not.
Importing this package imports no torch: :func:`stage` imports a stage module only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

STAGES = ("download", "validate", "tune", "extract", "template", "calibrate", "infer", "report")
# Stages that read the params.yaml entry itself; the later ones read the effective settings that ``tune`` writes.
PARAMS_STAGES = ("download", "validate", "tune")


def stage(name: str) -> Callable[[Any], dict]:
    """The ``run`` function of stage ``name`` (imported on demand, so light stages never load torch)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"hetmm.pipeline.{name}").run
