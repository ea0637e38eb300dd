"""COVER selection per pixel: the K training vectors that cover all the others (greedy k-center).

At every pixel, from the N training vectors there: first the medoid (largest summed cosine similarity; copies tie,
lowest index wins), then again and again the vector farthest from every vector chosen so far, in cosine distance
``1 - a.b``, until K are chosen. The *coverage radius* of a pixel is the largest distance from any of its training
vectors to the nearest chosen one. Farthest-first is Gonzalez's greedy k-center: its radius is at most twice the
best any K vectors can reach (an angular-distance argument; ``1 - cos`` is monotone in the angle, so the choices are
the same). With a ``target`` radius a pixel stops as soon as it is covered that well; the remaining slots repeat its
first vector, which changes no minimum-distance match.

Batched over pixel chunks from :func:`hetmm.core.templates.optics.pixel_grams` (float64 Gram blocks of bounded
size), so CPU and CUDA run the same code; no Python loop per pixel. :func:`extend` is the hot update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hetmm.core.templates.optics import pixel_grams


def _cosines(gram: Tensor) -> Tensor:
    norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()
    return (gram / (norm[:, :, None] * norm[:, None, :])).clamp(-1.0, 1.0)


def farthest_first(cos: Tensor, seed: Tensor, steps: int, target: float | None = None,
                   ignore: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy k-center for a chunk of pixels.

    ``cos`` ``[P, N, N]`` float64 cosines; ``seed`` ``[P]`` the first choice; ``steps`` choices in all; ``target``
    stops a pixel once its radius is at most that; ``ignore`` ``[P, N]`` bool marks vectors that are neither chosen
    nor counted. Returns indices ``[P, steps]`` in selection order, radius ``[P]`` float64 (over the counted
    vectors) and the number of distinct choices ``[P]``.
    """
    p, n, _ = cos.shape
    rows = torch.arange(p, device=cos.device)
    index = torch.empty((p, steps), dtype=torch.long, device=cos.device)
    index[:, 0] = seed
    nearest = 1.0 - cos[rows, seed]  # [P, N] distance to the chosen set
    if ignore is not None:
        nearest = nearest.masked_fill(ignore, 0.0)
    count = torch.ones(p, dtype=torch.long, device=cos.device)
    for t in range(1, steps):
        radius, far = nearest.max(dim=1)  # argmax: first of equal values, so the lowest index on ties
        done = radius <= (target if target is not None else 0.0)  # covered (or only copies are left)
        pick = torch.where(done, index[:, 0], far)
        index[:, t] = pick
        count += (~done).long()
        nearest = torch.minimum(nearest, 1.0 - cos[rows, pick])
    return index, nearest.max(dim=1).values, count


def medoids(cos: Tensor, first: Tensor | None) -> Tensor:
    """``[P]`` index of the vector with the largest summed similarity (copies tie: the lowest index wins)."""
    totals = cos.sum(dim=2)
    return (totals if first is None else totals.gather(1, first)).argmax(dim=1)


def cover_pixels(vectors: Tensor, size: int, target: float | None = None, chunk: int | None = None,
                 bar: object = None) -> tuple[Tensor, Tensor, Tensor]:
    """COVER choice at every pixel of one layer: ``vectors`` ``[N, C, h, w]`` -> indices ``[h*w, min(N, K)]``,
    coverage radius ``[h*w]`` float32 and distinct choices ``[h*w]``."""
    n, _, h, w = vectors.shape
    steps = min(n, size)
    index = torch.empty((h * w, steps), dtype=torch.long, device=vectors.device)
    radius = torch.empty(h * w, dtype=torch.float32, device=vectors.device)
    count = torch.empty(h * w, dtype=torch.long, device=vectors.device)
    for lo, hi, gram, first in pixel_grams(vectors, chunk):
        cos = _cosines(gram)
        chosen, r, c = farthest_first(cos, medoids(cos, first), steps, target)
        index[lo:hi], radius[lo:hi], count[lo:hi] = chosen, r.float(), c
        if bar is not None:
            bar.update()
    return index, radius, count


def _angle(distance: Tensor) -> Tensor:
    return torch.arccos((1.0 - distance).clamp(-1.0, 1.0))


def extend(sheets: Tensor, radius: Tensor, new: Tensor, size: int, chunk: int | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Hot update of one layer: ``sheets`` ``[S, C, h, w]``, their radius ``[h, w]``, new vectors ``[M, C, h, w]``.

    At a pixel where every new vector lies within the radius of a sheet nothing changes. Elsewhere farthest-first
    runs again over the sheets and the new vectors that are not covered, seeded with the first sheet (the training
    medoid), for ``min(K, S + M)`` choices. The training vectors that are gone are covered through the sheets that
    covered them, so the new radius is bounded in angle: ``max(angle(radius) + max over old sheets of their angle to
    the new choice, the uncovered new vectors' angle to it)``, stored back as a cosine distance.
    Returns the pool indices ``[min(K, S + M), h, w]`` (0..S-1 the old sheets), the radius ``[h, w]`` and the
    pixels that changed ``[h, w]`` bool.
    """
    s, _, h, w = sheets.shape
    pool = torch.cat([sheets, new.to(sheets.dtype)])
    steps = min(size, pool.shape[0])
    flat_radius = radius.to(sheets.device, torch.float64).flatten()
    index = torch.empty((h * w, steps), dtype=torch.long, device=sheets.device)
    out_radius = flat_radius.clone()
    changed = torch.zeros(h * w, dtype=torch.bool, device=sheets.device)
    # an unchanged pixel keeps its sheets, the added slots repeating its first (S <= K, so steps >= S)
    keep = torch.cat([torch.arange(s, device=sheets.device),
                      torch.zeros(steps - s, dtype=torch.long, device=sheets.device)])
    for lo, hi, gram, _ in pixel_grams(pool, chunk):
        cos = _cosines(gram)
        r_old = flat_radius[lo:hi]
        gap = 1.0 - cos[:, s:, :s].max(dim=2).values  # [P, M] new vector -> nearest sheet
        uncovered = gap > r_old[:, None] + 1e-9
        moved = uncovered.any(dim=1)
        ignore = torch.zeros(cos.shape[:2], dtype=torch.bool, device=cos.device)
        ignore[:, s:] = ~uncovered
        seed = torch.zeros(hi - lo, dtype=torch.long, device=cos.device)
        chosen, r_pool, _ = farthest_first(cos, seed, steps, ignore=ignore)
        rows = torch.arange(hi - lo, device=cos.device)[:, None]
        to_choice = 1.0 - cos[rows, :, chosen].max(dim=1).values  # [P, S + M] distance to the new choice
        bound = _angle(r_old) + _angle(to_choice[:, :s]).max(dim=1).values
        bound = torch.maximum(bound, _angle(r_pool)).clamp(max=torch.pi)
        index[lo:hi] = torch.where(moved[:, None], chosen, keep[None, :])
        out_radius[lo:hi] = torch.where(moved, 1.0 - torch.cos(bound), r_old)
        changed[lo:hi] = moved
    return index.T.reshape(steps, h, w), out_radius.float().reshape(h, w), changed.reshape(h, w)


def coverage_radius(vectors: Tensor, sheets: Tensor, chunk: int | None = None) -> Tensor:
    """Measured radius ``[h, w]``: the largest cosine distance from a vector of ``vectors`` ``[N, C, h, w]`` to its
    nearest sheet of ``sheets`` ``[S, C, h, w]`` at the same pixel (what the builds record, checked afresh)."""
    n = vectors.shape[0]
    _, _, h, w = vectors.shape
    out = torch.empty(h * w, dtype=torch.float64, device=vectors.device)
    for lo, hi, gram, _ in pixel_grams(torch.cat([vectors, sheets.to(vectors.dtype)]), chunk):
        cos = _cosines(gram)
        out[lo:hi] = (1.0 - cos[:, :n, n:].max(dim=2).values).max(dim=1).values
    return out.reshape(h, w)
