"""Template sets: ALL, PTS and COVER construction, hot update and the checked file format.

:func:`build` is the one entry point that picks a builder by :class:`~hetmm.modes.TemplateKind`
(the registry :data:`BUILDERS`); a new kind is one more entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hetmm.core.templates.optics import optics_labels
from hetmm.core.templates.selection import select_prototypes
from hetmm.core.templates.store import (
    TemplateSet,
    build_all,
    build_cover,
    build_pts,
    hot_update,
    load_template,
    save_template,
)
from hetmm.modes import TemplateKind

__all__ = ["BUILDERS", "BuildOptions", "TemplateSet", "build", "build_all", "build_cover", "build_pts",
           "hot_update", "load_template", "optics_labels", "save_template", "select_prototypes"]


@dataclass(frozen=True)
class BuildOptions:
    """What a builder may use besides the features: K, the feature settings and code digests recorded in the
    meta, progress bars, the per-pixel executor of PTS (``pixels``) and COVER's target radius."""

    size: int
    feature: dict[str, Any]
    code: dict[str, str] | None = None
    progress: bool = True
    pixels: Any = None
    target_radius: float | None = None


# builder(layers [N, C_j, h_j, w_j] per layer, sources, options)
Builder = Callable[[Sequence[Tensor], Sequence[str], BuildOptions], TemplateSet]

BUILDERS: dict[TemplateKind, Builder] = {
    TemplateKind.ALL: lambda layers, sources, o: build_all(layers, sources, o.feature, code=o.code),
    TemplateKind.PTS: lambda layers, sources, o: build_pts(
        layers, o.size, sources, o.feature, code=o.code, progress=o.progress, pixels=o.pixels),
    TemplateKind.COVER: lambda layers, sources, o: build_cover(
        layers, o.size, sources, o.feature, target=o.target_radius, code=o.code, progress=o.progress),
}


def build(kind: TemplateKind | str, layers: Sequence[Tensor], sources: Sequence[str], options: BuildOptions
          ) -> TemplateSet:
    """A template of ``kind`` from per-layer training features ``[N, C_j, h_j, w_j]``."""
    return BUILDERS[TemplateKind(kind)](layers, sources, options)
