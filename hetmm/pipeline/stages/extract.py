"""Stage ``extract``: fill the per-image feature cache for every image of the line.

Reads ``data/<line>/`` and the ``features`` settings; writes ``features/<line>/<key>/`` (persisted) and
``reports/<line>/extract.json``. Only images missing from the cache, or whose entry fails its checksum, are computed;
a change of the
feature settings or of the feature code (:mod:`hetmm.pipeline.provenance`) recomputes every image, and the record
says why.
"""

from __future__ import annotations

import time

from hetmm.core.device import resolve_device
from hetmm.core.features import FeatureExtractor
from hetmm.io import write_json_atomic
from hetmm.pipeline import cluster
from hetmm.pipeline.feature_cache import FeatureCache, extract_to_cache
from hetmm.pipeline.line import StageRun, items, validated_manifest
from hetmm.pipeline.provenance import FeatureKey


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    df = validated_manifest(paths, line.name)
    if cluster.enabled(ctx.params.cluster):  # backbone actors on the cluster; the cache is written here
        extractor = cluster.ExtractorPool(line.features, ctx.params.cluster)
    else:
        extractor = FeatureExtractor(line.features, resolve_device(ctx.device))
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    reason = cache.reason()
    start = time.perf_counter()
    todo = items(df, paths)
    computed, reused, repaired = extract_to_cache(extractor, cache, todo, line.features.batch_size, ctx.progress)
    pruned = cache.prune(sha for _, sha in todo)
    stats = {"computed": computed, "reused": reused, "repaired": repaired, "pruned": pruned, "reason": reason,
             "digest": cache.key.digest, "code": cache.key.code,
             "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(paths.reports / "extract.json", stats)
    return stats
