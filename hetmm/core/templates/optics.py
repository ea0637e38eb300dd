"""Per-pixel OPTICS over template features, batched across pixels, with scikit-learn's labels.

For every pixel position the N training vectors there are clustered with OPTICS (cosine distance ``1 - a.b``,
``min_samples = max(2, N // K)``, xi extraction). :func:`optics_graph` computes the OPTICS ordering of a whole chunk of
pixels at once from float64 Gram matrices; scikit-learn's public ``cluster_optics_xi`` then extracts the clusters
per pixel, so labels equal ``sklearn.cluster.OPTICS`` exactly (``tests/test_templates.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from hetmm.core.layout import pixel_rows

_XI = 0.05
# Float64 elements of one [P, N, N] Gram block: bounds the memory of a pixel chunk (64 MiB).
_CHUNK_ELEMS = 1 << 23
# On CPU the [P, N] arrays of the sequential OPTICS / greedy steps stay within torch's parallel
# grain size (32768), so each tiny step runs on one thread: waking a second, possibly
# descheduled, thread costs milliseconds on a shared machine, far more than the work.
_CPU_STEP_ELEMS = 1 << 15


def min_samples_for(n: int, size: int) -> int:
    """OPTICS ``min_samples`` for N images and K sheets: ``max(2, N // K)`` (official: ``N // K``)."""
    return max(2, n // size)


def check_features(features: Tensor, name: str = "features") -> None:
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, C, H, W], got {tuple(features.shape)}")


def check_size(size: int) -> None:
    if int(size) != size or size < 1:
        raise ValueError(f"template size K must be a positive integer, got {size!r}")


def chunks(pixels: int, n: int, chunk: int | None, device: torch.device) -> list[tuple[int, int]]:
    """Pixel ranges ``[lo, hi)``: ``chunk`` pixels each, or as many as the memory and step limits allow."""
    step = max(1, _CHUNK_ELEMS // max(1, n * n))
    if device.type == "cpu":
        step = min(step, max(1, _CPU_STEP_ELEMS // max(1, n)))
    step = chunk or step
    return [(lo, min(pixels, lo + step)) for lo in range(0, pixels, step)]


def pixel_grams(features: Tensor, chunk: int | None = None) -> Iterator[tuple[int, int, Tensor, Tensor | None]]:
    """``[N, C, H, W]`` -> per pixel chunk ``(lo, hi, gram [P, N, N] float64, first copies or None)`` (:func:`gram`).

    Only the chunk's float64 vectors are copied: :func:`hetmm.core.layout.pixel_rows` is a view.
    """
    n, _, h, w = features.shape
    rows = pixel_rows(features)
    for lo, hi in chunks(h * w, n, chunk, features.device):
        yield (lo, hi, *gram(rows[lo:hi].to(torch.float64, memory_format=torch.contiguous_format)))


def _first_copies(x: Tensor) -> Tensor | None:
    """``[P, N, C]`` -> ``[P, N]`` index of the first vector bitwise equal to each one, or None if
    no pixel holds two equal vectors.

    Sorting a random projection puts copies next to each other; adjacent pairs whose projections
    are close are compared exactly, and each run of equal neighbours maps to its lowest index.
    """
    p, n, c = x.shape
    probe = torch.randn(c, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    values, perm = (x @ probe).sort(dim=1)
    close = values.diff(dim=1).abs() <= 1e-9 * (values[:, 1:].abs() + 1.0)  # [P, N-1]
    pix, pos = close.nonzero(as_tuple=True)
    if not len(pix):
        return None
    same = (x[pix, perm[pix, pos]] == x[pix, perm[pix, pos + 1]]).all(dim=1)
    linked = torch.zeros((p, n), dtype=torch.bool, device=x.device)  # sorted position s equals s - 1
    linked[pix[same], pos[same] + 1] = True
    if not linked.any():
        return None
    places = torch.arange(n, device=x.device).expand(p, n)
    run = torch.where(linked, 0, places).cummax(dim=1).values  # sorted position where each run starts
    lowest = torch.full((p, n), n, device=x.device).scatter_reduce(1, run, perm, reduce="amin")
    return torch.empty_like(perm).scatter_(1, perm, lowest.gather(1, run))


def gram(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``[P, N, C]`` float64 -> ``[P, N, N]`` dot products and :func:`_first_copies`.

    Batched GEMM rounds an entry differently depending on its position, so equal pairs could get
    unequal values. sklearn's per-pair dot products are exactly symmetric and identical for
    identical vectors, and its tie-breaks rely on that: symmetrise, and give every copy of a
    vector the entries of its first copy.
    """
    p, n, _ = x.shape
    gram = torch.bmm(x, x.transpose(1, 2))
    gram = (gram + gram.transpose(1, 2)) * 0.5
    first = _first_copies(x)
    if first is not None:
        gram = gram.gather(1, first[:, :, None].expand(p, n, n)).gather(2, first[:, None, :].expand(p, n, n))
    return gram, first


# ----------------------------------------------------------------------------------------------
# OPTICS
# ----------------------------------------------------------------------------------------------


def optics_graph(gram: Tensor, min_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """OPTICS ordering of every pixel of a chunk at once, as scikit-learn computes it.

    ``gram`` ``[P, N, N]`` float64 dot products; the distance is ``1 - gram``. Returns
    ``ordering`` ``[P, N]``, ``reachability`` ``[P, N]`` (inf for each start point) and
    ``predecessor`` ``[P, N]`` (-1 for start points), matching
    ``sklearn.cluster.compute_optics_graph`` with ``max_eps=inf`` and brute-force neighbours.
    """
    p, n, _ = gram.shape
    rows = torch.arange(p, device=gram.device)
    # Core distance: distance to the min_samples-th nearest point, the point itself included,
    # rounded like sklearn (np.around to 15 decimals). 1 - g is monotone in g, so the k-th
    # smallest distance is 1 - the k-th largest dot product, without a [P, N, N] distance copy.
    kth = gram.topk(min_samples, dim=2).values[..., -1]
    core = torch.round(1.0 - kth, decimals=15)
    # key = reachability of unprocessed points; unreached ones hold the largest finite double so
    # argmin still takes the smallest id among them (sklearn: "prefer smaller ids on ties,
    # possibly np.inf"); processed ones hold inf and are never picked again.
    unreached = torch.finfo(torch.float64).max
    key = torch.full((p, n), unreached, dtype=torch.float64, device=gram.device)
    pred = torch.full((p, n), -1, dtype=torch.long, device=gram.device)
    reach = torch.empty((p, n), dtype=torch.float64, device=gram.device)
    processed = torch.zeros((p, n), dtype=torch.bool, device=gram.device)
    ordering = torch.empty((p, n), dtype=torch.long, device=gram.device)
    flat = gram.reshape(p * n, n)
    for step in range(n):
        point = key.argmin(dim=1)  # first index on ties, like np.argmin
        ordering[:, step] = point
        reach[rows, point] = key[rows, point]  # final once processed
        processed[rows, point] = True
        key[rows, point] = float("inf")
        # round(max(d, core)) == max(round(d), core): rounding is monotone and core is rounded.
        dist = 1.0 - flat.index_select(0, rows * n + point)  # distances from point[p]
        cand = torch.maximum(torch.round(dist, decimals=15), core[rows, point, None])
        better = (cand < key) & ~processed  # strict, like sklearn
        key = torch.where(better, cand, key)
        pred = torch.where(better, point[:, None], pred)
    return ordering, reach.masked_fill_(reach == unreached, float("inf")), pred


def optics_block(gram: Tensor, min_samples: int) -> Tensor:
    """``[P, N, N]`` float64 Gram -> ``[P, N]`` OPTICS xi labels (CPU LongTensor, -1 = noise)."""
    from sklearn.cluster import cluster_optics_xi  # here: importing scikit-learn costs ~2 s that inference never needs

    ordering, reach, pred = (t.cpu().numpy() for t in optics_graph(gram, min_samples))
    labels = np.empty(ordering.shape, dtype=np.int64)
    with np.errstate(divide="ignore"):  # zero reachabilities (copies) make sklearn divide by zero, harmlessly
        for i in range(len(labels)):
            labels[i] = cluster_optics_xi(
                reachability=reach[i],
                predecessor=pred[i],
                ordering=ordering[i],
                min_samples=min_samples,
                xi=_XI,
                predecessor_correction=True,
            )[0]
    return torch.from_numpy(labels)


def optics_labels(features: Tensor, size: int, *, chunk: int | None = None) -> Tensor:
    """Per-pixel OPTICS labels, identical to scikit-learn's, batched over pixels.

    ``features`` ``[N, C, H, W]``, L2-normalised over C; ``size`` = K. At each pixel the labels
    equal ``sklearn.cluster.OPTICS(min_samples=max(2, N // K), metric=lambda a, b: 1 - a @ b)``
    (all other arguments default; brute-force neighbours) on the N vectors there, computed in
    float64. With N < 2 (fewer points than ``min_samples``) every point is noise.
    ``chunk`` = pixels per batch (default: a ~64 MiB Gram block).

    Returns ``[N, H, W]`` int64 on the features' device, -1 = noise.
    """
    check_features(features)
    check_size(size)
    n, _, h, w = features.shape
    min_samples = min_samples_for(n, size)
    labels = torch.full((h * w, n), -1, dtype=torch.long)
    if n >= min_samples:
        for lo, hi, g, _ in pixel_grams(features, chunk):
            labels[lo:hi] = optics_block(g, min_samples)
    return labels.T.reshape(n, h, w).to(features.device)
