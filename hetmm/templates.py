"""Template sets: ALL and PTS construction, hot update, atomic save and checked load.

A template set holds, per feature layer, a tensor ``[S, C, h, w]`` of L2-normalised feature
"sheets". ALL keeps every training image (S = N). PTS (Pixel-level Template Selection, spec §5)
keeps S = min(N, K) vectors per pixel position, chosen from the N training vectors at that
position:

1. OPTICS on the N vectors with cosine distance ``1 - a.b`` and ``min_samples = max(2, N // K)``
   (the official ``N // K`` crashes for N < 2K; documented deviation). :func:`optics_labels`
   reproduces scikit-learn's labels exactly but runs the OPTICS ordering for a whole chunk of
   pixels at once (batched float64 Gram matrices, one vectorised ordering loop), then calls
   scikit-learn's public ``cluster_optics_xi`` per pixel for the xi cluster extraction. The Gram
   matrices are made exactly symmetric and identical for bitwise-equal vectors, as sklearn's
   per-pair dot products are, so exact ties (duplicated images) break the same way.
2. Easy-normal seeds: the medoid of each cluster in order of first appearance (n = 0..N-1), at
   most K of them; if there is no cluster, the global medoid.
3. Hard normals: greedily ``argmin_n <x_n, sum of selected>`` over unused n until K are chosen.
   Lowest index wins every tie.

Sheet k at a pixel is the k-th vector chosen there, so sheets ``[0, easy)`` are the easy seeds.
When N < K PTS returns N sheets (every training vector), never the official zero sheets:
matching takes a max over sheets, so fewer sheets is the honest answer.

Hot update (the paper claims it, the official code has none, spec §9):

* ALL: append the new images' features; sources already present are skipped (and logged).
* PTS, "reseeded greedy": at each pixel keep the easy seeds (first ``easy`` sheets) fixed and re-run
  step 3 seeded with them over the pool {current hard-normal sheets, in selection order} +
  {new vectors}. The old unused training vectors are not stored, so the current hard normals
  stand in for them. A new vector that duplicates a current sheet (cosine >= 1 - 1e-6) is only
  taken when nothing else is left, so re-inserting known images leaves the template unchanged
  (as a set of vectors per pixel). Cost O(K (K + M) C) per pixel, no OPTICS. When N + M <= K the
  result equals a full rebuild exactly (every vector is kept); otherwise it is an approximation
  whose coverage ``tests/test_templates.py`` compares with a full rebuild. If a pixel already has
  K clusters (no hard normals), new images cannot enter there, exactly as in a full rebuild where
  the first K clusters in image order win. Also seeding the medoids of OPTICS clusters among the
  new vectors narrowed the gap to a rebuild (new-image coverage gap 0.030 -> 0.009 in the test's
  setting) but was rejected: xi-OPTICS finds a cluster in any >= min_samples vectors, so even
  redundant new images would always displace a hard normal.

Files are ``torch.save`` of a plain dict of CPU tensors and JSON-like meta, loadable with
``weights_only=True``; ``meta["content_hash"]`` (sha256 over tensor bytes and meta) is checked on
load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from sklearn.cluster import cluster_optics_xi
from torch import Tensor
from tqdm.auto import tqdm

from hetmm.errors import HetmmError, TemplateMismatchError
from hetmm.io import atomic_path, sha256_json
from hetmm.matching import to_pixel_major

_FORMAT = "hetmm.template"
_VERSION = 1
_XI = 0.05
# Float64 elements of one [P, N, N] Gram block: bounds the memory of a pixel chunk (64 MiB).
_CHUNK_ELEMS = 1 << 23
# On CPU the [P, N] arrays of the sequential OPTICS / greedy steps stay within torch's parallel
# grain size (32768), so each tiny step runs on one thread: waking a second, possibly
# descheduled, thread costs milliseconds on a shared machine, far more than the work.
_CPU_STEP_ELEMS = 1 << 15
# Cosine at or above which a new vector counts as a duplicate of a template sheet.
_DUP_COS = 1.0 - 1e-6
_REBUILD = "rebuild it with `hetmm template`"


# ----------------------------------------------------------------------------------------------
# Pixel chunking
# ----------------------------------------------------------------------------------------------


def _min_samples(n: int, size: int) -> int:
    """OPTICS ``min_samples`` for N images and K sheets: ``max(2, N // K)`` (official: ``N // K``)."""
    return max(2, n // size)


def _check_features(features: Tensor, name: str = "features") -> None:
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, C, H, W], got {tuple(features.shape)}")


def _check_size(size: int) -> None:
    if int(size) != size or size < 1:
        raise ValueError(f"template size K must be a positive integer, got {size!r}")


def _chunks(pixels: int, n: int, chunk: int | None, device: torch.device) -> Iterator[tuple[int, int]]:
    """Pixel ranges ``[lo, hi)``: ``chunk`` pixels each, or as many as the memory and step limits allow."""
    step = max(1, _CHUNK_ELEMS // max(1, n * n))
    if device.type == "cpu":
        step = min(step, max(1, _CPU_STEP_ELEMS // max(1, n)))
    step = chunk or step
    for lo in range(0, pixels, step):
        yield lo, min(pixels, lo + step)


def _n_chunks(pixels: int, n: int, chunk: int | None, device: torch.device) -> int:
    return sum(1 for _ in _chunks(pixels, n, chunk, device))


def _pixel_block(features: Tensor, lo: int, hi: int) -> Tensor:
    """``[N, C, H, W]`` -> the float64 vectors of flat pixels ``lo..hi-1`` as ``[P, N, C]``.

    ``_pixel_rows`` is a view for both NCHW and pixel-major layouts, so only the block is copied.
    """
    return _pixel_rows(features)[lo:hi].to(torch.float64, memory_format=torch.contiguous_format)


def _pixel_rows(features: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[H*W, N, C]``, a view when ``features`` is NCHW-contiguous or pixel-major."""
    return features.permute(2, 3, 0, 1).flatten(0, 1)


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


def _gram(x: Tensor) -> tuple[Tensor, Tensor | None]:
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


def _optics_graph(gram: Tensor, min_samples: int) -> tuple[Tensor, Tensor, Tensor]:
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


def _optics_block(gram: Tensor, min_samples: int) -> Tensor:
    """``[P, N, N]`` float64 Gram -> ``[P, N]`` OPTICS xi labels (CPU LongTensor, -1 = noise)."""
    ordering, reach, pred = (t.cpu().numpy() for t in _optics_graph(gram, min_samples))
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
    _check_features(features)
    _check_size(size)
    n, _, h, w = features.shape
    min_samples = _min_samples(n, size)
    labels = torch.full((h * w, n), -1, dtype=torch.long)
    if n >= min_samples:
        for lo, hi in _chunks(h * w, n, chunk, features.device):
            labels[lo:hi] = _optics_block(_gram(_pixel_block(features, lo, hi))[0], min_samples)
    return labels.T.reshape(n, h, w).to(features.device)


# ----------------------------------------------------------------------------------------------
# Prototype selection
# ----------------------------------------------------------------------------------------------


def _greedy(gram: Tensor, seeds: Tensor, n_seeds: Tensor, steps: int, avoid: Tensor | None = None) -> Tensor:
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


def _select_block(gram: Tensor, first: Tensor | None, labels: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """PTS selection for a chunk: ``gram`` ``[P, N, N]`` float64 and ``first`` from :func:`_gram`,
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
    return _greedy(gram, seeds, n_easy, min(n, size)), n_easy


def _select_indices(
    features: Tensor, labels: Tensor, size: int, *, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """PTS choice per pixel: ``[min(N, K), H, W]`` training-image indices (easy seeds first)
    and ``[H, W]`` easy-seed counts (the number of cluster or global medoids among them)."""
    _check_features(features)
    _check_size(size)
    n, _, h, w = features.shape
    if n == 0:
        raise ValueError("PTS needs at least one training image")
    if labels.shape != (n, h, w):
        raise ValueError(f"labels must have shape {(n, h, w)}, got {tuple(labels.shape)}")
    flat_labels = labels.to(features.device, torch.long).flatten(1).T  # [HW, N]
    index = torch.empty((h * w, min(n, size)), dtype=torch.long, device=features.device)
    easy = torch.empty(h * w, dtype=torch.long, device=features.device)
    for lo, hi in _chunks(h * w, n, chunk, features.device):
        gram, first = _gram(_pixel_block(features, lo, hi))
        index[lo:hi], easy[lo:hi] = _select_block(gram, first, flat_labels[lo:hi], size)
    return index.T.reshape(-1, h, w), easy.reshape(h, w)


def _gather_sheets(vectors: Tensor, index: Tensor) -> Tensor:
    """Sheet k at pixel p = ``vectors[index[k, p], :, p]``: ``[M, C, H, W]``, ``[S, H, W]`` -> ``[S, C, H, W]``."""
    _, c, h, w = vectors.shape
    s = index.shape[0]
    pixels = torch.arange(h * w, device=vectors.device)
    picked = _pixel_rows(vectors)[pixels, index.reshape(s, h * w)]  # [S, HW, C]; no copy of all vectors
    return picked.permute(0, 2, 1).reshape(s, c, h, w)


def select_prototypes(features: Tensor, labels: Tensor, size: int, *, chunk: int | None = None) -> Tensor:
    """PTS prototypes from per-pixel OPTICS labels.

    ``features`` ``[N, C, H, W]`` (unit vectors over C), ``labels`` ``[N, H, W]`` (-1 = noise),
    ``size`` = K. Per pixel: cluster medoids in first-appearance order (at most K), or the global
    medoid if there is no cluster, then greedy hard normals ``argmin <x, sum selected>``; lowest
    index on ties; similarities in float64. Returns ``[min(N, K), C, H, W]`` in the features'
    dtype: when N < K every vector is kept and no zero sheets are emitted.
    """
    index, _ = _select_indices(features, labels, size, chunk=chunk)
    return _gather_sheets(features, index)


# ----------------------------------------------------------------------------------------------
# Template set
# ----------------------------------------------------------------------------------------------


@dataclass
class TemplateSet:
    """Per-layer template sheets plus provenance.

    ``layers[j]`` ``[S, C_j, h_j, w_j]``; ``easy[j]`` ``[h_j, w_j]`` int32 (PTS only, else empty):
    how many leading sheets at each pixel are easy seeds, kept fixed by :func:`hot_update`.
    ``meta`` keys: format, version, kind ("ALL" | "PTS"), size (K for PTS, N for ALL), sheets,
    dtype, feature (caller's fingerprint), sources, n_images, created, history, content_hash,
    and for PTS min_samples and timing.
    """

    layers: list[Tensor]
    meta: dict[str, Any]
    easy: list[Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in [*self.layers, *self.easy])

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def to(self, device: str | torch.device) -> TemplateSet:
        return TemplateSet(
            layers=[t.to(device) for t in self.layers],
            meta=copy.deepcopy(self.meta),
            easy=[t.to(device) for t in self.easy],
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so meta survives ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(obj, default=str))


# When and how fast a template was built does not change what it is: identical inputs give identical hashes.
_VOLATILE_META = frozenset({"content_hash", "created", "history", "timing"})


def _content_hash(layers: Sequence[Tensor], easy: Sequence[Tensor], meta: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name, tensors in (("layers", layers), ("easy", easy)):
        for t in tensors:
            t = t.detach().cpu()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            # the values in logical (row-major) order, one sheet at a time: any memory layout gives the same
            # hash, and a pixel-major layer is never copied whole
            for part in t if t.dim() > 1 else [t]:
                digest.update(part.contiguous().view(torch.uint8).numpy())
    digest.update(sha256_json({k: v for k, v in meta.items() if k not in _VOLATILE_META}).encode())
    return digest.hexdigest()


def _finish(layers: list[Tensor], easy: list[Tensor], meta: dict[str, Any]) -> TemplateSet:
    meta = _plain(meta)
    meta["content_hash"] = _content_hash(layers, easy, meta)
    return TemplateSet(layers=layers, meta=meta, easy=easy)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_layers(layers: Sequence[Tensor], sources: Sequence[str]) -> int:
    """Validate per-layer ``[N, C, h, w]`` features against ``sources``; return N."""
    if not layers:
        raise ValueError("need at least one feature layer")
    for j, layer in enumerate(layers):
        _check_features(layer, f"layer {j}")
    counts = {layer.shape[0] for layer in layers}
    if len(counts) != 1 or counts != {len(sources)}:
        raise ValueError(f"layers hold {sorted(counts)} images but {len(sources)} sources were given")
    return len(sources)


def build_all(
    layers: Sequence[Tensor], sources: Sequence[str], feature: dict[str, Any], *, dtype: torch.dtype | None = None
) -> TemplateSet:
    """ALL template: every training image is a sheet. ``layers[j]`` ``[N, C_j, h_j, w_j]``."""
    n = _check_layers(layers, sources)
    if n == 0:
        raise ValueError("an ALL template needs at least one training image")
    out = [to_pixel_major(layer.to(dtype or layer.dtype)) for layer in layers]  # no copy if already pixel-major
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "kind": "ALL",
        "size": n,
        "sheets": n,
        "dtype": _dtype_name(out[0].dtype),
        "feature": feature,
        "sources": list(sources),
        "n_images": n,
        "created": _now(),
        "history": [{"event": "build", "kind": "ALL", "n_images": n, "time": _now()}],
    }
    return _finish(out, [], meta)


def build_pts(
    layers: Sequence[Tensor],
    size: int,
    sources: Sequence[str],
    feature: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    chunk: int | None = None,
) -> TemplateSet:
    """PTS template of K = ``size`` sheets (``min(N, K)`` if N < K) per layer.

    ``layers[j]`` ``[N, C_j, h_j, w_j]`` unit vectors. Runs :func:`optics_labels` and
    :func:`select_prototypes` chunk by chunk (one tqdm bar over all chunks) and records the
    seconds spent in each in ``meta["timing"]``.
    """
    _check_size(size)
    n = _check_layers(layers, sources)
    if n == 0:
        raise ValueError("a PTS template needs at least one training image")
    min_samples = _min_samples(n, size)
    t_optics = t_select = 0.0
    out: list[Tensor] = []
    easy: list[Tensor] = []
    total = sum(_n_chunks(layer.shape[2] * layer.shape[3], n, chunk, layer.device) for layer in layers)
    with tqdm(total=total, desc=f"PTS K={size}", unit="chunk", disable=not progress) as bar:
        for layer in layers:
            _, _, h, w = layer.shape
            index = torch.empty((h * w, min(n, size)), dtype=torch.long, device=layer.device)
            n_easy = torch.empty(h * w, dtype=torch.long, device=layer.device)
            for lo, hi in _chunks(h * w, n, chunk, layer.device):
                start = time.perf_counter()
                gram, first = _gram(_pixel_block(layer, lo, hi))
                if n >= min_samples:
                    labels = _optics_block(gram, min_samples).to(layer.device)
                else:
                    labels = torch.full((hi - lo, n), -1, dtype=torch.long, device=layer.device)
                mid = time.perf_counter()
                index[lo:hi], n_easy[lo:hi] = _select_block(gram, first, labels, size)
                t_optics += mid - start
                t_select += time.perf_counter() - mid
                bar.update()
            out.append(_gather_sheets(layer, index.T.reshape(-1, h, w)).to(dtype or layer.dtype).contiguous())
            easy.append(n_easy.reshape(h, w).to(torch.int32))
    timing = {"optics_s": round(t_optics, 3), "select_s": round(t_select, 3)}
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "kind": "PTS",
        "size": size,
        "sheets": min(n, size),
        "dtype": _dtype_name(out[0].dtype),
        "feature": feature,
        "sources": list(sources),
        "n_images": n,
        "min_samples": min_samples,
        "created": _now(),
        "timing": timing,
        "history": [
            {"event": "build", "kind": "PTS", "n_images": n, "size": size, "min_samples": min_samples,
             "time": _now(), **timing}
        ],
    }
    return _finish(out, easy, meta)


# ----------------------------------------------------------------------------------------------
# Hot update
# ----------------------------------------------------------------------------------------------


def _feature_mismatch(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """One line per key of ``want`` whose value differs in ``have``."""
    have, want = _plain(have), _plain(want)
    missing = "<missing>"
    return [
        f"template built with {key}={have.get(key, missing)!r} but config asks for {key}={value!r}"
        for key, value in want.items()
        if have.get(key, missing) != value
    ]


def _pts_reseed(sheets: Tensor, easy: Tensor, new: Tensor, size: int, chunk: int | None) -> Tensor:
    """Reseeded greedy at every pixel: ``sheets`` ``[S, C, h, w]``, ``easy`` ``[h, w]``,
    ``new`` ``[M, C, h, w]`` -> ``[min(K, S + M), C, h, w]`` (see module docstring)."""
    s, _, h, w = sheets.shape
    pool = torch.cat([sheets, new.to(sheets.dtype)])  # hard normals keep precedence on ties
    steps = min(size, pool.shape[0])
    flat_easy = easy.to(sheets.device, torch.long).flatten()
    index = torch.empty((h * w, steps), dtype=torch.long, device=sheets.device)
    for lo, hi in _chunks(h * w, pool.shape[0], chunk, pool.device):
        gram, _ = _gram(_pixel_block(pool, lo, hi))
        norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()
        cos_to_sheets = gram[:, s:, :s] / (norm[:, s:, None] * norm[:, None, :s])
        avoid = torch.zeros(gram.shape[:2], dtype=torch.bool, device=gram.device)
        avoid[:, s:] = (cos_to_sheets >= _DUP_COS).any(dim=2)
        seeds = torch.arange(s, device=gram.device).expand(hi - lo, s)
        index[lo:hi] = _greedy(gram, seeds, flat_easy[lo:hi], steps, avoid)
    return _gather_sheets(pool, index.T.reshape(steps, h, w)).contiguous()


def hot_update(
    tset: TemplateSet,
    new_layers: Sequence[Tensor],
    new_sources: Sequence[str],
    *,
    feature: dict[str, Any] | None = None,
    chunk: int | None = None,
) -> TemplateSet:
    """Insert new good images without a full rebuild (method in the module docstring).

    ``new_layers[j]`` ``[M, C_j, h_j, w_j]`` extracted with the template's feature settings;
    ``new_sources`` their ids. Sources already in the template (or repeated) are skipped and
    listed in the history event. ``feature``, if given, must match ``meta["feature"]``.
    Returns a new TemplateSet; ``tset`` is not modified.
    """
    if feature is not None and (diff := _feature_mismatch(tset.meta["feature"], feature)):
        raise TemplateMismatchError("cannot hot-update: " + "; ".join(diff) + f"; {_REBUILD}")
    _check_layers(new_layers, new_sources)
    if len(new_layers) != len(tset.layers):
        raise TemplateMismatchError(
            f"hot update got {len(new_layers)} feature layers but the template has {len(tset.layers)}; "
            "extract the new images with the template's feature settings"
        )
    for j, (new, old) in enumerate(zip(new_layers, tset.layers)):
        if new.shape[1:] != old.shape[1:]:
            raise TemplateMismatchError(
                f"hot update: layer {j} features are {tuple(new.shape[1:])} per image but the template has "
                f"{tuple(old.shape[1:])}; extract the new images with the template's feature settings"
            )
    seen = set(tset.meta["sources"])
    keep: list[int] = []
    skipped: list[str] = []
    for i, source in enumerate(new_sources):
        if source in seen:
            skipped.append(source)
        else:
            keep.append(i)
            seen.add(source)
    start = time.perf_counter()
    meta = copy.deepcopy(tset.meta)
    kind, size = meta["kind"], meta["size"]
    chosen = torch.tensor(keep, dtype=torch.long)
    new = [layer[chosen.to(layer.device)].to(old.device) for layer, old in zip(new_layers, tset.layers)]
    if not keep:
        layers = list(tset.layers)
    elif kind == "ALL":
        layers = [torch.cat([old, add.to(old.dtype)]) for old, add in zip(tset.layers, new)]
    else:
        layers = [_pts_reseed(old, e, add, size, chunk) for old, e, add in zip(tset.layers, tset.easy, new)]
    meta["sources"] += [new_sources[i] for i in keep]
    meta["n_images"] += len(keep)
    meta["sheets"] = layers[0].shape[0]
    if kind == "ALL":
        meta["size"] = meta["sheets"]
    meta["history"].append(
        {
            "event": "hot_update",
            "method": "append" if kind == "ALL" else "reseeded-greedy",
            "added": len(keep),
            "skipped_existing": skipped,
            "n_images": meta["n_images"],
            "time": _now(),
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return _finish(layers, list(tset.easy), meta)


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def save_template(path: str | Path, tset: TemplateSet) -> None:
    """Atomically write ``tset`` as a plain dict of CPU tensors and meta (``weights_only`` safe).

    Layers are stored pixel-major (:func:`hetmm.matching.to_pixel_major`), the layout matching reads, and
    ``torch.load`` keeps it: inference then needs no re-layout copy (a transient of the largest layer).
    """
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "meta": tset.meta,
        "layers": [to_pixel_major(t.detach().cpu()) for t in tset.layers],
        "easy": [t.detach().cpu().contiguous() for t in tset.easy],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_template(
    path: str | Path, expect: dict[str, Any] | None = None, map_location: str | torch.device = "cpu"
) -> TemplateSet:
    """Load a template, verify its content hash and, if given, ``expect`` against ``meta["feature"]``.

    Raises HetmmError if the file is missing and TemplateMismatchError if it is unreadable,
    altered, or was built with feature settings that differ from ``expect`` (each differing key
    is named with both values).
    """
    path = Path(path)
    if not path.is_file():
        raise HetmmError(f"template file {path} not found; build it with `hetmm template`")
    corrupt = f"template file {path} is corrupt or incomplete"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise TemplateMismatchError(f"{corrupt} ({type(exc).__name__}); {_REBUILD}") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise TemplateMismatchError(f"{path} is not a hetmm template file; {_REBUILD}")
    if payload.get("version") != _VERSION:
        raise TemplateMismatchError(
            f"template file {path} has format version {payload.get('version')!r}, expected {_VERSION}; {_REBUILD}"
        )
    try:
        meta, layers, easy = payload["meta"], list(payload["layers"]), list(payload["easy"])
        ok = meta["content_hash"] == _content_hash(layers, easy, meta)
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise TemplateMismatchError(f"{corrupt} ({type(exc).__name__}: {exc}); {_REBUILD}") from exc
    if not ok:
        raise TemplateMismatchError(f"{corrupt}: content hash mismatch; {_REBUILD}")
    if expect is not None and (diff := _feature_mismatch(meta["feature"], expect)):
        raise TemplateMismatchError(f"template {path}: " + "; ".join(diff) + f"; {_REBUILD}")
    return TemplateSet(layers=layers, meta=meta, easy=easy).to(map_location)
