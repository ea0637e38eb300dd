"""Scoring cached features batch by batch: the loop that the infer stage and the ablation share.

:func:`score_cached` loads each batch of cached test features, has a matcher compute its distances (in this process,
:class:`LocalMatcher`, or on a cluster, :class:`hetmm.pipeline.cluster.ShardedMatcher`), combines them with stored
distances where a :class:`~hetmm.pipeline.match_cache.MatchCache` holds some, and finishes the maps with the
scorer's post-processing (:meth:`hetmm.core.inspector.Scorer.finish`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hetmm.core.inspector import Scorer
from hetmm.core.scoring import LayerMatches
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.match_cache import MatchCache


class LocalMatcher:
    """Matching in this process; the interface :func:`score_cached` drives (shared with
    :class:`hetmm.pipeline.cluster.ShardedMatcher`): ``submit`` starts one batch, ``collect`` returns its matches."""

    depth = 1  # batches in flight

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def submit(self, features: Sequence[torch.Tensor], first_sheet: int = 0) -> Any:
        if first_sheet:  # only a HETMM template's stored matches ask for its new sheets alone
            return self.scorer.match(features, first_sheet=first_sheet)
        return self.scorer.match(features)

    def collect(self, handle: LayerMatches) -> LayerMatches:
        return handle


def score_cached(scorer: Scorer, cache: FeatureCache, shas: list[str], batch_size: int,
                 progress: bool = True, desc: str = "infer", matches: MatchCache | None = None,
                 matcher: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``[M]`` and float16 maps ``[M, H, W]`` for cached test images, batch by batch.

    With ``matches``, images whose earlier distances it holds are matched against the template's new sheets
    only, and this run's distances are added to it. ``matcher`` (default :class:`LocalMatcher`) computes the
    distances; with ``depth`` > 1 that many batches are in flight at once (a cluster's replicas).
    """
    matcher = matcher or LocalMatcher(scorer)
    maps, scores = [], []
    pending: deque = deque()

    def finish_one() -> None:
        batch, boxes, found, handle = pending.popleft()
        if handle is not None:
            fresh = matcher.collect(handle)
            found = fresh if found is None else found.merged(fresh)
        if matches is not None:
            matches.add(batch, found)
        out = scorer.finish(found, boxes)
        maps.append(out.maps.half().numpy())
        scores.append(out.scores.numpy())

    for start in tqdm(range(0, len(shas), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = shas[start : start + batch_size]
        layers, boxes = cache.load(batch)
        found = matches.lookup(batch, scorer.device) if matches is not None else None
        handle = None
        if found is None:
            handle = matcher.submit(layers)
        elif matches.reuse < matches.sheets:
            handle = matcher.submit(layers, first_sheet=matches.reuse)
        pending.append((batch, boxes, found, handle))
        if len(pending) >= matcher.depth:
            finish_one()
    while pending:
        finish_one()
    return np.concatenate(scores), np.concatenate(maps)
