"""Template sets: ALL and PTS construction, hot update and the checked file format.

:func:`build` is the one entry point that picks a builder by :class:`~hetmm.core.modes.TemplateKind`
(the registry :data:`BUILDERS`); a new kind is one more entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from hetmm.core.modes import TemplateKind
from hetmm.core.templates.optics import optics_labels
from hetmm.core.templates.selection import select_prototypes
from hetmm.core.templates.store import TemplateSet, build_all, build_pts, hot_update, load_template, save_template

__all__ = ["BUILDERS", "TemplateSet", "build", "build_all", "build_pts", "hot_update", "load_template",
           "optics_labels", "save_template", "select_prototypes"]

# builder(layers [N, C_j, h_j, w_j] per layer, sources, size K, feature settings, code digests, progress, pixels:
# the per-layer pixel work of a per-pixel selection, or None for the local one)
Builder = Callable[[Sequence[Tensor], Sequence[str], int, dict[str, Any], dict[str, str] | None, bool, Any],
                   TemplateSet]

BUILDERS: dict[TemplateKind, Builder] = {
    TemplateKind.ALL: lambda layers, sources, size, feature, code, progress, pixels: build_all(
        layers, sources, feature, code=code),
    TemplateKind.PTS: lambda layers, sources, size, feature, code, progress, pixels: build_pts(
        layers, size, sources, feature, code=code, progress=progress, pixels=pixels),
}


def build(kind: TemplateKind | str, layers: Sequence[Tensor], sources: Sequence[str], *, size: int,
          feature: dict[str, Any], code: dict[str, str] | None = None, progress: bool = True,
          pixels: Any = None) -> TemplateSet:
    """A template of ``kind`` from per-layer training features ``[N, C_j, h_j, w_j]`` (``size`` = K for PTS;
    ``pixels``: see :func:`~hetmm.core.templates.store.build_pts`)."""
    return BUILDERS[TemplateKind(kind)](layers, sources, size, feature, code, progress, pixels)
