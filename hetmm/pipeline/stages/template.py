"""Stage ``template``: build the line's template set, hot-update the previous one, or keep it.

Reads the feature cache, ``data/<line>/manifest.csv`` and the ``features`` / ``templates`` settings; writes
``models/<line>/template.pt`` (persisted) and ``reports/<line>/template.json`` (``action``: ``rebuild``,
``hot_update`` or ``unchanged``, and the ``reason``). The previous template is kept or hot-updated only when its
inputs are unchanged (:func:`hetmm.pipeline.line_template.plan_update`); otherwise it is rebuilt.
"""

from __future__ import annotations

import sys
import time

from hetmm.core.templates import hot_update, save_template
from hetmm.errors import DataError
from hetmm.io import write_json_atomic
from hetmm.pipeline import cluster
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import StageRun, split, validated_manifest
from hetmm.pipeline.line_template import build_template, plan_update, record
from hetmm.pipeline.provenance import FeatureKey
from hetmm.pipeline.stages import require_method


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    require_method(line, "template")
    sources = list(split(validated_manifest(paths, line.name), "train")["sha256"])
    if not sources:
        raise DataError(f"{paths.manifest}: line {line.name!r} has no training (good) images")
    key = FeatureKey.of(line.features)
    cache = FeatureCache(paths.features, key)
    start = time.perf_counter()
    old, reason = plan_update(line, paths, sources, key)
    new: list[str] = []
    if old is None:
        layers, _ = cache.load(sources, pixel_major=True)
        pixels = None
        if cluster.enabled(ctx.params.cluster):
            pixels = cluster.pts_pixels(ctx.params.cluster)
        action, tset, new = "rebuild", build_template(line, layers, sources, progress=ctx.progress,
                                                      pixels=pixels), sources
        del layers
    elif new := [s for s in sources if s not in set(old.meta.get("sources", []))]:
        layers, _ = cache.load(new)
        action, tset = "hot_update", hot_update(old, layers, new)
    else:
        action, tset = "unchanged", old
    if action != "unchanged":
        save_template(paths.template, tset)
    info = record(tset, action, reason, len(new), round(time.perf_counter() - start, 2))
    write_json_atomic(paths.reports / "template.json", info)
    if "note" in info:  # also under DVC, where progress is off
        print(f"note: {info['note']}", file=sys.stderr)
    return info
