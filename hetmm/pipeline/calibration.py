"""Cross-fitted calibration: every good training image scored by a model that did not see it.

What the calibrate stage's thresholds are computed from (:func:`cross_fit`), by the line's method and template kind:

* ``leave_one_out`` (ALL templates, exact): each training image is matched against the full template with its own
  sheet left out of the minimum over sheets. Matching distances are minima over sheets, so the template's sheets are
  matched in blocks and combined by minimum (:func:`leave_one_out`). The score equals the score by a template built
  without that image. The queries are the sheets themselves, and the similarities of image ``a`` (query) against
  sheet ``b`` are those of ``b`` against ``a`` transposed: each pair of blocks is matched once and both images'
  forward and backward distances are read from the one product (:func:`hetmm.core.scoring.match_layers_pair`; a
  forward distance of one direction is a backward-type reduction of the other's table, with the forward window, so
  windows that differ per direction are kept). An image's own sheet is masked inside the product. About n(n-1)/2
  image pairs for n training images, against the n(n-1) of matching each direction apart (:func:`_by_direction`,
  still used for the ``patch`` mode). The synthetic defects are matched per block, their base image's sheet masked.
* ``k_fold`` (PTS / COVER): ``calibration.folds`` templates, each built like the deployed one from the images outside
  one fold, score the images of that fold. An image's fold comes from its content hash (:func:`fold_of`), so adding
  images never moves an existing one to another fold.
* ``held_out`` (trained methods, TFA-Net): the validation share the model was not trained on, as before.

Synthetic defects (the pixel threshold, the ``synthetic_f1`` rule, the label-free metrics) are made on a bounded
subset of the cross-fitted normals (the tuner's validation normals, at most ``tune.max_validation``) and scored by the
same model as the normal they were made on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hetmm.config import ProductLine
from hetmm.core.features import FeatureExtractor
from hetmm.core.inspector import Inspector, Scorer
from hetmm.core.layout import to_pixel_major
from hetmm.core.scoring import LayerMatches, match_layers, match_layers_pair, match_plan
from hetmm.data.splits import validation_split
from hetmm.errors import DataError
from hetmm.methods import spec
from hetmm.modes import TemplateKind
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths
from hetmm.pipeline.line_template import build_template
from hetmm.pipeline.match_cache import MatchCache
from hetmm.pipeline.models import load_tfa_scorer, model_path
from hetmm.pipeline.provenance import FeatureKey
from hetmm.pipeline.validation_set import extract_batches, validation_images
from hetmm.report.progress import Phase, Phases

# sheets per block when left-out sheets are masked in the product: measured on 2 cores (128 Lite0-like sheets),
# blocks of 32-64 ran 4x faster than ~sqrt(n) = 11, whose per-call work (unfolding, band tables) dominated
PAIR_BLOCK = 48
QUERY_BATCH = 32  # query images per matching call and per post-processing step
MATCHES = "calibration_matches.pt"  # leave-one-out distances kept for the next run (not a DVC output: a cache)


@dataclass
class CrossFit:
    """Cross-fitted scores. ``normals`` / ``normal_scores``: every calibration normal (sha256) and its score;
    ``bases``: the normals the defects were made on, with their ``base_maps``; ``defect_scores`` / ``defect_maps`` /
    ``masks`` / ``families``: the synthetic defects; ``models``: how many models scored them (folds, or 1)."""

    scheme: str
    normals: list[str]
    normal_scores: np.ndarray
    bases: list[str]
    base_maps: np.ndarray
    defect_scores: np.ndarray
    defect_maps: np.ndarray
    masks: np.ndarray
    families: list[str]
    models: int
    sheets: int | None
    reuse: dict | None = None  # leave-one-out: how many images' stored distances were reused, and why (not)

    @property
    def base_scores(self) -> np.ndarray:
        where = {s: i for i, s in enumerate(self.normals)}
        return self.normal_scores[[where[s] for s in self.bases]]


def fold_of(sha: str, folds: int) -> int:
    """An image's calibration fold: from its content hash alone, so no other image can move it."""
    return int(sha[:16], 16) % folds


def scheme(line: ProductLine) -> str:
    if spec(line.method).trained:
        return "held_out"
    return "leave_one_out" if line.templates.kind == TemplateKind.ALL else "k_fold"


def cross_fit(line: ProductLine, paths: LinePaths, train: pd.DataFrame, device: torch.device,
              progress: bool = False, phases: Phases | None = None) -> CrossFit:
    """Score every good training image (``train``: the manifest's train rows) and the synthetic defects by models
    that did not see them (see the module docstring); ``phases`` gets a line per phase (with counts and an ETA)."""
    phases = phases or Phases(None)
    shas = sorted(set(train["sha256"]))
    tune = line.tune
    templates, bases = validation_split(shas, tune.validation_share, tune.max_validation, tune.seed)
    if not bases:
        raise DataError(f"{paths.manifest}: line {line.name!r} has {len(shas)} training image(s); calibration "
                        "scores each with a model of the others and needs >= 2 (add good images, or set "
                        "threshold.rule to manual)")
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    synthetic = validation_images(line, paths, train, bases)
    per_base = len(synthetic.defects) // len(bases)  # synthesize's order: base, family, repeat
    owners = [bases[j // per_base] for j in range(len(synthetic.defects))]
    extractor = FeatureExtractor(line.features, device)
    with phases.phase("synthetic defects", len(synthetic.defects)) as phase:
        defect_layers, defect_boxes = _extract(extractor, line, synthetic.defects, phase)
    kind, reuse = scheme(line), None
    scoring = phases.start(f"cross-fitted scores ({kind})", len(shas), "training images")
    if kind == "held_out":
        normals = bases
        scorer = load_tfa_scorer(line, model_path(line, paths), device, expect_images=templates)
        layers, boxes = cache.load(normals)
        normal_scores, base_maps = _score_all(scorer, layers, list(boxes))
        defect_scores, defect_maps = _score_all(scorer, defect_layers, defect_boxes)
        models, sheets = 1, None
    elif kind == "leave_one_out":
        normals = shas
        normal_scores, base_maps, defect_scores, defect_maps, sheets, reuse = _loo_line(
            line, paths, cache, shas, bases, owners, defect_layers, defect_boxes, device, progress)
        models = len(shas)
    else:
        normals = shas
        normal_scores, base_maps, defect_scores, defect_maps, models, sheets = _k_fold(
            line, cache, shas, bases, owners, defect_layers, defect_boxes, device, progress)
    scoring.advance(len(shas))
    scoring.finish()
    return CrossFit(kind, normals, normal_scores, bases, base_maps, defect_scores, defect_maps, synthetic.masks,
                    synthetic.families, models, sheets, reuse)


def _loo_line(line: ProductLine, paths: LinePaths, cache: FeatureCache, shas: list[str], bases: list[str],
              owners: list[str], defect_layers: list[torch.Tensor], defect_boxes: list, device: torch.device,
              progress: bool):
    """Leave-one-out over an ALL template of every training image, reusing the stored distances of the images an
    earlier run saw (``models/<line>/calibration_matches.pt``, :class:`~hetmm.pipeline.match_cache.MatchCache`):
    those are matched against the new sheets only. The sheets keep the stored order, new images after it."""
    store = paths.models / MATCHES
    stored = _stored_sources(store)
    order = [s for s in stored if s in set(shas)] if set(stored) <= set(shas) else []
    order += sorted(set(shas) - set(order))
    layers, boxes = cache.load(order, pixel_major=True)
    scorer = Inspector(line, build_template(line, layers, order, progress=progress), device)
    m = line.matching
    matches = MatchCache(scorer.template, match_plan(m.forward_windows, m.backward_windows, m.alphas, m.weights,
                                                     m.mode), FeatureKey.of(line.features))
    matches.resume(store)
    index = {s: i for i, s in enumerate(order)}
    queries = [torch.cat([t, d.to(t.dtype)]) for t, d in zip(scorer.template.layers, defect_layers, strict=True)]
    exclude = [index[s] for s in order] + [index[s] for s in owners]
    old = [s in matches.previous for s in order] + [False] * len(owners)
    start = np.where(old, matches.reuse, 0)
    initial = _initial(matches, order, len(exclude)) if any(old) else None
    keep = np.zeros(len(exclude), dtype=bool)
    keep[[index[s] for s in bases]] = True
    keep[len(order):] = True
    scores, maps, found = leave_one_out(scorer, queries, list(boxes) + defect_boxes, exclude, keep_maps=keep,
                                        start=start, initial=initial, sheet_queries=len(order))
    n = len(order)
    matches.add(order, LayerMatches([None if t is None else t[:n] for t in found.forward],
                                    [None if t is None else t[:n] for t in found.backward], found.plan, n))
    matches.save(store)
    by_sha = dict(zip(order, scores[:n], strict=True))
    base_rows = sorted(index[s] for s in bases)  # maps come in query order
    base_maps = dict(zip([order[i] for i in base_rows], maps[: len(bases)], strict=True))
    return (np.array([by_sha[s] for s in shas]), np.stack([base_maps[s] for s in bases]), scores[n:],
            maps[len(bases):], scorer.sheets - 1, {"images_reused": int(sum(old)), "reason": matches.reason})


def _stored_sources(path) -> list[str]:
    try:
        return list(torch.load(path, map_location="cpu", weights_only=True)["sources"])
    except Exception:  # missing, torn or foreign: nothing is reused (MatchCache.resume says why)
        return []


def _initial(matches: MatchCache, order: list[str], total: int) -> LayerMatches:
    """The stored distances of the images the store holds, +inf for the other queries."""
    rows = [i for i, s in enumerate(order) if s in matches.previous]
    first = matches.previous[order[rows[0]]]

    def layer(direction: int, j: int) -> torch.Tensor | None:
        if first[direction][j] is None:
            return None
        out = torch.full((total, *first[direction][j].shape), float("inf"))
        for i in rows:
            out[i] = matches.previous[order[i]][direction][j]
        return out

    n = len(matches.plan)
    return LayerMatches([layer(0, j) for j in range(n)], [layer(1, j) for j in range(n)], list(matches.plan), total)


def leave_one_out(scorer: Inspector, queries: Sequence[torch.Tensor], boxes: Sequence, exclude: Sequence[int],
                  keep_maps: np.ndarray | None = None, block: int | None = None, start: np.ndarray | None = None,
                  initial: LayerMatches | None = None, sheet_queries: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, LayerMatches]:
    """Scores ``[Q]`` of the queries (per-layer features ``[Q, C_j, H_j, W_j]``) against ``scorer``'s template with
    sheet ``exclude[i]`` left out for query ``i`` (-1: none), float32 maps ``[K, H, W]`` of the queries where
    ``keep_maps`` is set, and the distances. Sheets are matched in blocks of ``block`` (default: :data:`PAIR_BLOCK` with
    ``sheet_queries``, else ~sqrt(sheets), since a re-stacked own block costs a copy) and the blocks combine by
    minimum. With ``start``, query ``i`` is matched against sheets ``start[i]:`` only, its
    distances to the sheets before taken from ``initial`` (stored distances, +inf where none).

    ``sheet_queries = S`` says that the first ``S`` queries are the template's sheets ``0..S-1`` themselves, each
    left out for itself (``exclude[:S] = 0..S-1``; features equal to ``scorer.template.layers[j][:S]``). Then each
    pair of blocks of them is matched once and both directions are read from the one product
    (:func:`hetmm.core.scoring.match_layers_pair`): sheet ``a`` as a query against sheet ``b`` sees exactly the
    similarities of ``b`` against ``a``, transposed, so about half the products of matching each direction apart.
    Left-out sheets are masked inside the product (windowed modes). The ``patch`` mode, or ``S = 0``, matches each
    query per direction (:func:`_by_direction`), its own sheet's block re-stacked without it."""
    exclude = np.asarray(exclude)
    start = np.zeros(len(exclude), dtype=int) if start is None else np.asarray(start)
    device = scorer.device
    best: LayerMatches | None = None
    if initial is not None:  # stored distances live on the CPU
        best = LayerMatches([None if t is None else t.to(device) for t in initial.forward],
                            [None if t is None else t.to(device) for t in initial.backward], initial.plan, len(exclude))
    windowed = not any(p.patch for p in match_plan(*_settings(scorer)))
    if sheet_queries and windowed:
        if sheet_queries > scorer.sheets or not np.array_equal(exclude[:sheet_queries], np.arange(sheet_queries)):
            raise ValueError("sheet_queries: the first queries must be the template's sheets, each left out for itself")
        best = _symmetric(scorer, queries, exclude, start, block or PAIR_BLOCK, sheet_queries, best)
    else:
        best = _by_direction(scorer, queries, exclude, start, block or max(8, int(np.ceil(np.sqrt(scorer.sheets)))),
                             best)
    if best is None:
        raise ValueError("leave-one-out needs a template of at least two sheets")
    keep_maps = np.zeros(len(exclude), dtype=bool) if keep_maps is None else np.asarray(keep_maps)
    scores, maps = [], []
    for r0 in range(0, len(exclude), QUERY_BATCH):
        rows = slice(r0, r0 + QUERY_BATCH)
        part = LayerMatches([None if f is None else f[rows] for f in best.forward],
                            [None if b is None else b[rows] for b in best.backward], best.plan,
                            len(exclude[rows]))
        out = scorer.finish(part, list(boxes[rows]))
        scores.append(out.scores.numpy())
        maps.append(out.maps.numpy()[keep_maps[rows]])
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps), best


def _settings(scorer: Inspector) -> tuple:
    m = scorer.line.matching
    return m.forward_windows, m.backward_windows, m.alphas, m.weights, m.mode


def _blocks(sheets: int, start: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Sheet blocks ``[b0, b1)`` of at most ``block`` sheets; none straddles a query's ``start``."""
    edges = sorted({0, sheets, *(int(s) for s in start if 0 < s < sheets)})
    return [(b0, min(b0 + block, hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
            for b0 in range(lo, hi, block)]


def _symmetric(scorer: Inspector, queries: Sequence[torch.Tensor], exclude: np.ndarray, start: np.ndarray,
               block: int, own: int, best: LayerMatches | None) -> LayerMatches | None:
    """:func:`leave_one_out` with the first ``own`` queries being the sheets themselves: every pair of sheet blocks
    (A <= B) is matched once, A's rows against B's sheets and B's rows against A's sheets from the same product
    (a block against itself with each sheet masked for its own row); the other queries are matched per block with
    their left-out sheet masked. A query takes only the blocks at or after its ``start``."""
    layers, device, total = scorer.template.layers, scorer.device, len(exclude)
    settings = _settings(scorer)
    blocks = _blocks(scorer.sheets, start, block)
    dtype = layers[0].dtype
    for x, (a0, a1) in enumerate(blocks):
        if a0 >= own:
            break
        a1 = min(a1, own)
        rows_a = np.arange(a0, a1)
        queries_a = [t[a0:a1] for t in layers]
        for b0, b1 in blocks[x:]:
            need_a = start[rows_a] <= b0  # A's rows that take B's sheets
            if b0 == a0:  # a block against itself: one product, each sheet left out of its own row
                if need_a.any():
                    found = match_layers(_take(queries_a, need_a), [t[b0:b1] for t in layers], *settings,
                                         exclude=torch.as_tensor(rows_a[need_a] - b0, device=device))
                    best = _scatter_min(best, total, rows_a[need_a], found)
                continue
            rows_b = np.arange(b0, min(b1, own))
            need_b = start[rows_b] <= a0  # B's own rows that take A's sheets
            sheets_b = [t[b0:b1] for t in layers]
            if need_a.any() and need_b.any():
                found, swapped = match_layers_pair(queries_a, sheets_b, *settings)
                best = _scatter_min(best, total, rows_a[need_a], _rows(found, need_a))
                best = _scatter_min(best, total, rows_b[need_b],
                                    _rows(swapped, np.pad(need_b, (0, b1 - b0 - len(rows_b)))))
            elif need_a.any():  # B holds only images matched before (their stored distances cover A)
                found = match_layers(_take(queries_a, need_a), sheets_b, *settings)
                best = _scatter_min(best, total, rows_a[need_a], found)
            elif need_b.any():
                found = match_layers(_take([t[b0:b1] for t in layers], np.pad(need_b, (0, b1 - b0 - len(rows_b)))),
                                     queries_a, *settings)
                best = _scatter_min(best, total, rows_b[need_b], found)
    others = np.arange(own, total)
    for b0, b1 in blocks:
        rows = others[start[others] <= b0]
        sheets = [t[b0:b1] for t in layers]
        for r0 in range(0, len(rows), QUERY_BATCH):
            part = rows[r0 : r0 + QUERY_BATCH]
            index = torch.as_tensor(part, device=queries[0].device)
            q = [f.index_select(0, index).to(device, dtype) for f in queries]
            left = np.where((exclude[part] >= b0) & (exclude[part] < b1), exclude[part] - b0, -1)
            found = match_layers(q, sheets, *settings, exclude=torch.as_tensor(left, device=device))
            best = _scatter_min(best, total, part, found)
    return best


def _take(layers: list[torch.Tensor], mask: np.ndarray) -> list[torch.Tensor]:
    """The images ``[M, C, H, W]`` of per-layer features ``[B, C, H, W]`` where ``mask`` ``[B]`` is set."""
    if mask.all():
        return layers
    index = torch.as_tensor(np.flatnonzero(mask), device=layers[0].device)
    return [t.index_select(0, index) for t in layers]


def _rows(matches: LayerMatches, mask: np.ndarray) -> LayerMatches:
    """``matches`` of the batch rows where ``mask`` is set."""
    if mask.all():
        return matches
    index = torch.as_tensor(np.flatnonzero(mask))

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, index.to(t.device))

    return LayerMatches([pick(t) for t in matches.forward], [pick(t) for t in matches.backward], matches.plan,
                        int(mask.sum()))


def _by_direction(scorer: Inspector, queries: Sequence[torch.Tensor], exclude: np.ndarray, start: np.ndarray,
                  block: int, best: LayerMatches | None) -> LayerMatches | None:
    """:func:`leave_one_out` one direction at a time: a query is matched against a block without its excluded sheet
    only in the block holding it (that block re-stacked without the sheet), against the other blocks whole."""
    sheets, layers, device = scorer.sheets, scorer.template.layers, scorer.device
    settings = _settings(scorer)

    def match(rows: np.ndarray, sheet_layers: list[torch.Tensor]) -> None:
        nonlocal best
        for r0 in range(0, len(rows), QUERY_BATCH):
            part = rows[r0 : r0 + QUERY_BATCH]
            index = torch.as_tensor(part, device=queries[0].device)
            q = [f.index_select(0, index).to(device, layers[0].dtype) for f in queries]
            best = _scatter_min(best, len(exclude), part, match_layers(q, sheet_layers, *settings))

    for b0, b1 in _blocks(sheets, start, block):
        active = start <= b0
        outside = np.flatnonzero(active & ((exclude < b0) | (exclude >= b1)))
        if outside.size:
            match(outside, [t[b0:b1] for t in layers])
        for e in np.unique(exclude[active & (exclude >= b0) & (exclude < b1)]):
            if b1 - b0 > 1:  # a block of the excluded sheet alone adds nothing
                match(np.flatnonzero(active & (exclude == e)),
                      [to_pixel_major(torch.cat([t[b0:e], t[e + 1 : b1]])) for t in layers])
    return best


def _scatter_min(best: LayerMatches | None, total: int, rows: np.ndarray, found: LayerMatches) -> LayerMatches:
    """``best`` (matches of all ``total`` queries, +inf where none yet) lowered to ``found`` at ``rows``."""
    if best is None:
        def full(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.full((total, *t.shape[1:]), float("inf"), device=t.device)

        best = LayerMatches([full(t) for t in found.forward], [full(t) for t in found.backward], found.plan, total)
    index = torch.as_tensor(rows, device=found.forward[0].device if found.forward[0] is not None
                            else found.backward[0].device)
    for mine, new in ((best.forward, found.forward), (best.backward, found.backward)):
        for j, t in enumerate(new):
            if t is not None:
                mine[j][index] = torch.minimum(mine[j][index], t)
    return best


def _k_fold(line: ProductLine, cache: FeatureCache, shas: list[str], bases: list[str], owners: list[str],
            defect_layers: list[torch.Tensor], defect_boxes: list, device: torch.device, progress: bool):
    folds = line.calibration.folds
    fold = {s: fold_of(s, folds) for s in shas}
    used = sorted(set(fold.values()))
    if len(used) < 2:
        raise DataError(f"line {line.name!r}: its {len(shas)} training image(s) all fall in calibration fold "
                        f"{used[0]} of {folds}, so no image can be scored by a model without it; add good images "
                        "(or use templates.kind ALL)")
    normal_scores = np.zeros(len(shas))
    base_maps: dict[str, np.ndarray] = {}
    defect_scores = np.zeros(len(owners))
    defect_maps: list[np.ndarray | None] = [None] * len(owners)
    sheets = []
    for f in used:
        members = [s for s in shas if fold[s] == f]
        others = [s for s in shas if fold[s] != f]
        layers, _ = cache.load(others, pixel_major=True)
        scorer = Inspector(line, build_template(line, layers, others, progress=progress), device)
        sheets.append(scorer.sheets)
        del layers
        for i0 in range(0, len(members), QUERY_BATCH):
            batch = members[i0 : i0 + QUERY_BATCH]
            feats, boxes = cache.load(batch)
            scores, maps = _finish(scorer, scorer.match(feats), boxes)
            for s, score, amap in zip(batch, scores, maps, strict=True):
                normal_scores[shas.index(s)] = score
                if s in bases:
                    base_maps[s] = amap
        rows = [j for j, s in enumerate(owners) if fold[s] == f]
        for r0 in range(0, len(rows), QUERY_BATCH):
            part = rows[r0 : r0 + QUERY_BATCH]
            index = torch.as_tensor(part)
            scores, maps = _finish(scorer, scorer.match([d.index_select(0, index) for d in defect_layers]),
                                   [defect_boxes[j] for j in part])
            for j, score, amap in zip(part, scores, maps, strict=True):
                defect_scores[j], defect_maps[j] = score, amap
    return (normal_scores, np.stack([base_maps[s] for s in bases]), defect_scores, np.stack(defect_maps), len(used),
            min(sheets))


def _finish(scorer: Scorer, raw, boxes) -> tuple[np.ndarray, np.ndarray]:
    out = scorer.finish(raw, boxes)
    return out.scores.numpy().astype(np.float64), out.maps.numpy()


def _score_all(scorer: Scorer, layers: list[torch.Tensor], boxes: list) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of features ``[M, ...]``, ``QUERY_BATCH`` images at a time."""
    out = [_finish(scorer, scorer.match([t[i : i + QUERY_BATCH] for t in layers]), boxes[i : i + QUERY_BATCH])
           for i in range(0, len(boxes), QUERY_BATCH)]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def _extract(extractor: FeatureExtractor, line: ProductLine, images: list, phase: Phase
             ) -> tuple[list[torch.Tensor], list]:
    """Per-layer features ``[M, C_j, H_j, W_j]`` (CPU) and content boxes of ``images``, ``features.batch_size`` at a
    time (:func:`~hetmm.pipeline.validation_set.extract_batches`)."""
    batches = extract_batches(extractor, line.features, images, line.features.batch_size, phase.advance)
    layers = [torch.cat([b[0][j] for b in batches]).cpu() for j in range(len(batches[0][0]))]
    return layers, [box for b in batches for box in b[1]]
