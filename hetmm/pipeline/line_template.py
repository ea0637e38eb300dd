"""A line's template set: built as its settings say, reused, hot-updated or rebuilt, loaded for inspection.

:func:`build_template` makes the line's kind of template from training features; :func:`plan_update` decides between
keeping, hot-updating and rebuilding the saved one (only when its feature settings, feature code and template code
(:mod:`hetmm.pipeline.provenance`) equal the current ones, its kind and size are unchanged and no training image was
removed); :func:`load_current` loads it for inspection, refusing one made from other features; :func:`record` is
what the template stage (and ``hetmm update``) writes to ``reports/<line>/template.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hetmm.config import ProductLine
from hetmm.core.templates import BuildOptions, TemplateSet, build, load_template
from hetmm.errors import HetmmError, TemplateMismatchError
from hetmm.modes import TemplateKind
from hetmm.pipeline.line import LinePaths
from hetmm.pipeline.provenance import FeatureKey, template_code_record

_CODE_PARTS = {"features": "feature code", "templates": "template code"}  # meta["code"] keys -> words

def build_template(line: ProductLine, layers: Sequence[torch.Tensor], sources: Sequence[str],
                   size: int | None = None, progress: bool = True, pixels: Any = None) -> TemplateSet:
    """The line's kind of template from per-layer train features ``[N, C_j, H_j, W_j]`` (``size`` overrides K;
    ``pixels``: the per-pixel selection's executor, e.g. :func:`hetmm.pipeline.cluster.pts_pixels`)."""
    key = FeatureKey.of(line.features)
    options = BuildOptions(size=size or line.templates.size, feature=key.settings, code=template_code_record(key),
                           progress=progress, pixels=pixels, target_radius=line.templates.target_radius)
    return build(line.templates.kind, layers, sources, options)


def code_change(tset: TemplateSet, key: FeatureKey) -> str | None:
    """Which code changed since ``tset`` was built ("feature code" or "template code"), or None."""
    recorded, now = tset.meta.get("code") or {}, template_code_record(key)
    changed = [name for part, name in _CODE_PARTS.items() if recorded.get(part) != now[part]]
    return " and ".join(changed) or None


def record(tset: TemplateSet, action: str, reason: str, new_images: int, seconds: float | None) -> dict:
    """``reports/<line>/template.json``: what the template stage (or ``hetmm update``) did and why."""
    requested = int(tset.meta["size"])
    sheets = int(tset.layers[0].shape[0])
    out = {"action": action, "reason": reason, "kind": tset.meta["kind"], "sheets": sheets,
           "train_images": int(tset.meta["n_images"]), "new_images": new_images,
           "content_hash": tset.meta["content_hash"], "bytes": int(tset.nbytes), "seconds": seconds}
    if tset.meta["kind"] != TemplateKind.ALL and sheets < min(requested, int(tset.meta["n_images"])):
        out["note"] = (f"COVER reached templates.target_radius with {sheets} of the K={requested} sheets it may "
                       "use")
    elif tset.meta["kind"] != TemplateKind.ALL and sheets < requested:
        out["note"] = (f"{tset.meta['kind']} asked for K={requested} sheets but the line has {sheets} training "
                       "images: kept them all")
    if "coverage" in tset.meta:
        out["coverage"] = tset.meta["coverage"]
    return out


def plan_update(
    line: ProductLine, paths: LinePaths, sources: list[str], key: FeatureKey
) -> tuple[TemplateSet | None, str]:
    """Decide between reuse, hot update and rebuild; returns (existing template or None, reason)."""
    if not paths.template.is_file():
        return None, "no previous template"
    try:
        old = load_template(paths.template, expect=key.settings)
    except TemplateMismatchError as exc:
        # the same error type covers torn files; say which it is in the recorded reason
        try:
            load_template(paths.template)
        except HetmmError:
            return None, f"previous template unusable ({exc})"
        return None, f"previous template does not match the settings ({exc})"
    except HetmmError as exc:
        return None, f"previous template unusable ({exc})"
    if changed := code_change(old, key):
        return None, f"{changed} changed since the previous template was built"
    if not line.templates.hot_update:
        return None, "templates.hot_update is off"
    if old.meta.get("kind") != line.templates.kind or (
            line.templates.kind != TemplateKind.ALL and old.meta.get("size") != line.templates.size) or (
            line.templates.kind == TemplateKind.COVER
            and old.meta.get("target_radius") != line.templates.target_radius):
        return None, "template kind, size or target radius changed"
    removed = set(old.meta.get("sources", [])) - set(sources)
    if removed:
        return None, f"{len(removed)} training image(s) were removed"
    return old, "previous template is a subset of the training images"


def load_current(line: ProductLine, path: str | Path) -> TemplateSet:
    """Load ``path`` for inspection; refuse a template whose feature settings or feature code differ from the
    installed ones (its sheets would not be comparable with features computed now)."""
    key = FeatureKey.of(line.features)
    tset = load_template(path, expect=key.settings)
    recorded = (tset.meta.get("code") or {}).get("features")
    if recorded != key.code:
        built = f"feature code {recorded[:12]}" if recorded else "code from before templates recorded their code"
        raise TemplateMismatchError(
            f"template {path} was built from features of other code ({built}; installed feature code "
            f"{key.code[:12]}); rebuild it with `dvc repro template@{line.name}` (or `hetmm template {line.name}`)")
    return tset
