"""The stage registry: the DVC stages of a product line, one module per stage, each with ``run(ctx) -> dict``.

``download -> validate -> tune -> extract -> template | train -> calibrate -> infer -> report``: a line's method
decides which stage makes its model (:data:`hetmm.methods.METHODS`, ``model_stage``). A stage reads the line's
folders (:class:`~hetmm.pipeline.line.LinePaths`), calls the method (:mod:`hetmm.core`) and writes its outputs
atomically. Persisted artifacts (feature cache, template, stored matches) are keyed on their settings *and* the
code that made them (:mod:`hetmm.pipeline.provenance`); a stage reuses one only when both match and records why.
Only this registry and the CLI import stage modules; importing it imports no torch: :func:`stage` imports a stage
module only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from hetmm.methods import MODEL_STAGES, of_stage, spec

STAGES = ("download", "validate", "tune", "extract", "template", "train", "calibrate", "infer", "report")
# Stages that read the params.yaml entry itself; the later ones read the effective settings that ``tune`` writes.
PARAMS_STAGES = ("download", "validate", "tune")


def require_method(line: Any, name: str) -> None:
    """Refuse to run the model stage ``name`` on a line of another method, naming the stage it needs."""
    owner = of_stage(name)
    if line.method != owner.method:
        from hetmm.errors import ConfigError

        raise ConfigError(f"product_lines.{line.name}.method: the {name} stage is for method {owner.method} lines; "
                          f"{line.name!r} uses {line.method} (its model comes from `hetmm "
                          f"{spec(line.method).model_stage} {line.name}`)")


def stages_for(method: str) -> tuple[str, ...]:
    """The stages a line of ``method`` runs, in order."""
    skipped = MODEL_STAGES - {spec(method).model_stage}
    return tuple(s for s in STAGES if s not in skipped)


def stage(name: str) -> Callable[[Any], dict]:
    """The ``run`` function of stage ``name`` (imported on demand, so light stages never load torch)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"hetmm.pipeline.stages.{name}").run
