"""The method registry: what each way of scoring a line (:class:`~hetmm.modes.Method`) is made of, defined once.

Every place that depends on the method asks :func:`spec` instead of comparing names: which stage makes the model and
which file holds it, how it is loaded as a :class:`~hetmm.core.inspector.Scorer`, and what it supports. Torch-free
and I/O-free (the loader is named, and imported only when a model is loaded), so the configuration and the light
stages can read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from hetmm.modes import Method


@dataclass(frozen=True)
class MethodSpec:
    """One method: its model's stage, file and loader, and the capabilities the pipeline asks about."""

    method: Method
    title: str  # how reports and model cards name it
    model_stage: str  # the DVC stage that makes the model
    model_file: str  # stem of ``models/<line>/<stem>.pt`` and of its record ``reports/<line>/<stem>.json``
    model_noun: str  # what the model is called in messages and panel titles
    loader: str  # "module:function" (line, path, device) -> Scorer, see hetmm.pipeline.models
    hot_update: bool  # new good images are inserted without rebuilding (``hetmm update``)
    stored_distances: bool  # infer may reuse matching distances of earlier runs (hetmm.pipeline.match_cache)
    sharding: bool  # matching can be split over a Ray cluster's actors (hetmm.pipeline.cluster)
    tuning: bool  # the label-free search (hetmm.pipeline.tuning) chooses its settings
    trained: bool  # fitted on the training images (calibration scores the ones it held out)
    template_variants: bool  # the paper's Table 8 variants (matching modes, template kinds) apply to it
    inert_sections: tuple[str, ...]  # params sections that do nothing for it (``hetmm line add`` leaves them out)

    def load(self) -> Callable:
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[Method, MethodSpec] = {
    Method.HETMM: MethodSpec(Method.HETMM, "HETMM", "template", "template", "template",
                             "hetmm.pipeline.models:load_template_scorer", hot_update=True, stored_distances=True,
                             sharding=True, tuning=True, trained=False, template_variants=True,
                             inert_sections=("tfa_net",)),
    Method.TFA_NET: MethodSpec(Method.TFA_NET, "TFA-Net", "train", "tfa_net", "model",
                               "hetmm.pipeline.models:load_tfa_scorer", hot_update=False, stored_distances=False,
                               sharding=False, tuning=False, trained=True, template_variants=False,
                               inert_sections=("templates",)),
}
MODEL_STAGES = frozenset(s.model_stage for s in METHODS.values())


def spec(method: Method | str) -> MethodSpec:
    return METHODS[Method(method)]


def of_stage(stage: str) -> MethodSpec:
    """The method whose model ``stage`` makes."""
    return next(s for s in METHODS.values() if s.model_stage == stage)
