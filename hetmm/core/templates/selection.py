"""PTS prototype selection per pixel: cluster medoids ("easy normals"), then greedy hard normals.

Per pixel, from the N training vectors there and their OPTICS labels (:mod:`hetmm.core.templates.optics`): the medoid
of each cluster in order of first appearance (at most K; the global medoid if there is no cluster), then greedily the
unused vector least similar to the sum of those selected, ``argmin_n <x_n, sum selected>``, lowest index on ties,
until K are chosen. Batched over pixel chunks, similarities in float64. :func:`reseed` is the same greedy step seeded
with a template's current sheets, for hot updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hetmm.core.layout import pixel_rows
from hetmm.core.templates.optics import check_features, check_size, pixel_grams

# Cosine at or above which a new vector counts as a duplicate of a template sheet.
_DUP_COS = 1.0 - 1e-6


def greedy(gram: Tensor, seeds: Tensor, n_seeds: Tensor, steps: int, avoid: Tensor | None = None) -> Tensor:
    """Seeded greedy hard-normal selection for a chunk of pixels.

    ``gram`` ``[P, M, M]`` float64; ``seeds`` ``[P, S]`` indices taken first (only the first
    ``n_seeds[p]`` of row p count); then, until ``steps`` are chosen, the unused m minimising
    ``sum_{s chosen} <x_m, x_s>``, lowest m on ties. ``avoid`` ``[P, M]`` bool marks candidates
    taken only when no other is left. Returns ``[P, steps]`` indices in selection order.
    """
    p, m, _ = gram.shape
    rows = torch.arange(p, device=gram.device)
    flat = gram.reshape(p * m, m)
    used = torch.zeros((p, m), dtype=torch.bool, device=gram.device)
    score = torch.zeros((p, m), dtype=torch.float64, device=gram.device)
    chosen = torch.empty((p, steps), dtype=torch.long, device=gram.device)
    for t in range(steps):
        free = ~used
        if avoid is not None:
            preferred = free & ~avoid
            free = torch.where(preferred.any(dim=1, keepdim=True), preferred, free)
        pick = torch.where(free, score, float("inf")).argmin(dim=1)
        if t < seeds.shape[1]:
            pick = torch.where(t < n_seeds, seeds[:, t], pick)
        chosen[:, t] = pick
        used[rows, pick] = True
        score += flat.index_select(0, rows * m + pick)  # incremental <x_m, sum of chosen>
    return chosen


def select_block(gram: Tensor, first: Tensor | None, labels: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """PTS selection for a chunk: ``gram`` ``[P, N, N]`` float64 and ``first`` from
    :func:`hetmm.core.templates.optics.gram`,
    ``labels`` ``[P, N]``. Returns ``[P, min(N, K)]`` chosen indices (easy seeds first) and
    ``[P]`` easy-seed counts.
    """
    p, n, _ = gram.shape
    n_labels = int(labels.max()) + 1 if labels.numel() else 0
    if n_labels:
        onehot = labels[:, None, :] == torch.arange(n_labels, device=labels.device)[None, :, None]  # [P, L, N]
        present = onehot.any(dim=2)
        # Medoid of each cluster: member with the largest summed similarity to its cluster.
        within = torch.bmm(onehot.to(torch.float64), gram.transpose(1, 2))  # [P, L, N]
        if first is not None:  # copies tie exactly, so the lowest index wins
            within = within.gather(2, first[:, None, :].expand_as(within))
        medoid = torch.where(onehot, within, -float("inf")).argmax(dim=2)  # [P, L]
        # Clusters in order of first appearance; absent labels sort last.
        appears = torch.where(present, onehot.to(torch.uint8).argmax(dim=2), n)
        order = torch.sort(appears, dim=1, stable=True).indices[:, :size]
        seeds = medoid.gather(1, order)
        n_clusters = present.sum(dim=1)
    else:
        seeds = torch.zeros((p, 1), dtype=torch.long, device=gram.device)
        n_clusters = torch.zeros(p, dtype=torch.long, device=gram.device)
    # No cluster: the global medoid is the only seed.
    totals = gram.sum(dim=2)
    global_medoid = (totals if first is None else totals.gather(1, first)).argmax(dim=1)
    seeds[:, 0] = torch.where(n_clusters > 0, seeds[:, 0], global_medoid)
    n_easy = n_clusters.clamp(1, size)
    return greedy(gram, seeds, n_easy, min(n, size)), n_easy


def select_indices(
    features: Tensor, labels: Tensor, size: int, *, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """PTS choice per pixel: ``[min(N, K), H, W]`` training-image indices (easy seeds first)
    and ``[H, W]`` easy-seed counts (the number of cluster or global medoids among them)."""
    check_features(features)
    check_size(size)
    n, _, h, w = features.shape
    if n == 0:
        raise ValueError("PTS needs at least one training image")
    if labels.shape != (n, h, w):
        raise ValueError(f"labels must have shape {(n, h, w)}, got {tuple(labels.shape)}")
    flat_labels = labels.to(features.device, torch.long).flatten(1).T  # [HW, N]
    index = torch.empty((h * w, min(n, size)), dtype=torch.long, device=features.device)
    easy = torch.empty(h * w, dtype=torch.long, device=features.device)
    for lo, hi, gram, first in pixel_grams(features, chunk):
        index[lo:hi], easy[lo:hi] = select_block(gram, first, flat_labels[lo:hi], size)
    return index.T.reshape(-1, h, w), easy.reshape(h, w)


def gather_sheets(vectors: Tensor, index: Tensor) -> Tensor:
    """Sheet k at pixel p = ``vectors[index[k, p], :, p]``: ``[M, C, H, W]``, ``[S, H, W]`` -> ``[S, C, H, W]``."""
    _, c, h, w = vectors.shape
    s = index.shape[0]
    pixels = torch.arange(h * w, device=vectors.device)
    picked = pixel_rows(vectors)[pixels, index.reshape(s, h * w)]  # [S, HW, C]; no copy of all vectors
    return picked.permute(0, 2, 1).reshape(s, c, h, w)


def select_prototypes(features: Tensor, labels: Tensor, size: int, *, chunk: int | None = None) -> Tensor:
    """PTS prototypes from per-pixel OPTICS labels.

    ``features`` ``[N, C, H, W]`` (unit vectors over C), ``labels`` ``[N, H, W]`` (-1 = noise),
    ``size`` = K. Per pixel: cluster medoids in first-appearance order (at most K), or the global
    medoid if there is no cluster, then greedy hard normals ``argmin <x, sum selected>``; lowest
    index on ties; similarities in float64. Returns ``[min(N, K), C, H, W]`` in the features'
    dtype: when N < K every vector is kept and no zero sheets are emitted.
    """
    index, _ = select_indices(features, labels, size, chunk=chunk)
    return gather_sheets(features, index)


def reseed(sheets: Tensor, easy: Tensor, new: Tensor, size: int, chunk: int | None) -> Tensor:
    """Reseeded greedy at every pixel: ``sheets`` ``[S, C, h, w]``, ``easy`` ``[h, w]``,
    ``new`` ``[M, C, h, w]`` -> ``[min(K, S + M), C, h, w]`` (see docs/TEMPLATES.md, hot update)."""
    s, _, h, w = sheets.shape
    pool = torch.cat([sheets, new.to(sheets.dtype)])  # hard normals keep precedence on ties
    steps = min(size, pool.shape[0])
    flat_easy = easy.to(sheets.device, torch.long).flatten()
    index = torch.empty((h * w, steps), dtype=torch.long, device=sheets.device)
    for lo, hi, gram, _ in pixel_grams(pool, chunk):
        norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()
        cos_to_sheets = gram[:, s:, :s] / (norm[:, s:, None] * norm[:, None, :s])
        avoid = torch.zeros(gram.shape[:2], dtype=torch.bool, device=gram.device)
        avoid[:, s:] = (cos_to_sheets >= _DUP_COS).any(dim=2)
        seeds = torch.arange(s, device=gram.device).expand(hi - lo, s)
        index[lo:hi] = greedy(gram, seeds, flat_easy[lo:hi], steps, avoid)
    return gather_sheets(pool, index.T.reshape(steps, h, w)).contiguous()
