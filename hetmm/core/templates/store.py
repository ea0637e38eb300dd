"""Template sets: the :class:`TemplateSet` container, ALL / PTS construction, hot update, checked file format.

A template set holds, per feature layer, ``[S, C, h, w]`` L2-normalised sheets: ALL keeps every training image
(S = N), PTS keeps ``min(N, K)`` vectors per pixel (:mod:`~hetmm.core.templates.optics`,
:mod:`~hetmm.core.templates.selection`). ``meta`` records what the sheets were made from: the feature settings
(``feature``) and the caller's code digests (``code``), both part of ``meta["content_hash"]``, which is checked on
load. Files are ``torch.save`` of plain tensors and JSON-like meta, loadable with ``weights_only=True``. Design
notes (PTS deviations, the hot-update rule): ``docs/TEMPLATES.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hetmm.core.layout import to_pixel_major
from hetmm.core.templates.cover import cover_pixels, extend
from hetmm.core.templates.optics import check_features, check_size, chunks, min_samples_for, optics_block, pixel_grams
from hetmm.core.templates.selection import gather_sheets, reseed, select_block
from hetmm.errors import HetmmError, TemplateMismatchError
from hetmm.io import atomic_path, sha256_json
from hetmm.modes import TemplateKind

_FORMAT = "hetmm.template"
_VERSION = 1
_REBUILD = "rebuild it with `hetmm template <line>` (or `dvc repro template@<line>`)"


@dataclass
class TemplateSet:
    """Per-layer template sheets plus provenance.

    ``layers[j]`` ``[S, C_j, h_j, w_j]``; ``easy[j]`` ``[h_j, w_j]`` int32 (PTS only, else empty):
    how many leading sheets at each pixel are easy seeds, kept fixed by :func:`hot_update`; ``radius[j]``
    ``[h_j, w_j]`` float32 (COVER only, else empty): each pixel's coverage radius (cosine distance).
    ``meta`` keys: format, version, kind ("ALL" | "PTS"), size (K for PTS, N for ALL), sheets,
    dtype, feature (the caller's feature settings), code (the caller's code digests), sources, n_images,
    created, history, content_hash, and for PTS min_samples and timing.
    """

    layers: list[Tensor]
    meta: dict[str, Any]
    easy: list[Tensor] = field(default_factory=list)
    radius: list[Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in [*self.layers, *self.easy, *self.radius])

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def to(self, device: str | torch.device) -> TemplateSet:
        return TemplateSet(
            layers=[t.to(device) for t in self.layers],
            meta=copy.deepcopy(self.meta),
            easy=[t.to(device) for t in self.easy],
            radius=[t.to(device) for t in self.radius],
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so meta survives ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(obj, default=str))


# When and how fast a template was built does not change what it is: identical inputs give identical hashes.
_VOLATILE_META = frozenset({"content_hash", "created", "history", "timing"})


def _content_hash(layers: Sequence[Tensor], easy: Sequence[Tensor], meta: dict[str, Any],
                  radius: Sequence[Tensor] = ()) -> str:
    digest = hashlib.sha256()
    for name, tensors in (("layers", layers), ("easy", easy), ("radius", radius)):  # no radius: the old hash
        for t in tensors:
            t = t.detach().cpu()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            # the values in logical (row-major) order, one sheet at a time: any memory layout gives the same
            # hash, and a pixel-major layer is never copied whole
            for part in t if t.dim() > 1 else [t]:
                digest.update(part.contiguous().view(torch.uint8).numpy())
    digest.update(sha256_json({k: v for k, v in meta.items() if k not in _VOLATILE_META}).encode())
    return digest.hexdigest()


def _finish(layers: list[Tensor], easy: list[Tensor], meta: dict[str, Any],
            radius: list[Tensor] | None = None) -> TemplateSet:
    meta = _plain(meta)
    meta["content_hash"] = _content_hash(layers, easy, meta, radius or [])
    return TemplateSet(layers=layers, meta=meta, easy=easy, radius=radius or [])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_layers(layers: Sequence[Tensor], sources: Sequence[str]) -> int:
    """Validate per-layer ``[N, C, h, w]`` features against ``sources``; return N."""
    if not layers:
        raise ValueError("need at least one feature layer")
    for j, layer in enumerate(layers):
        check_features(layer, f"layer {j}")
    counts = {layer.shape[0] for layer in layers}
    if len(counts) != 1 or counts != {len(sources)}:
        raise ValueError(f"layers hold {sorted(counts)} images but {len(sources)} sources were given")
    return len(sources)


def _build_meta(kind: TemplateKind, size: int, layers: Sequence[Tensor], feature: dict[str, Any],
                code: dict[str, str] | None, sources: Sequence[str], timing: dict[str, float] | None = None,
                **extra: Any) -> dict[str, Any]:
    """A new template's meta (see :class:`TemplateSet`); ``extra`` are the kind's own keys, also in the history."""
    n = len(sources)
    build = {"event": "build", "kind": kind, "n_images": n, **({} if kind == TemplateKind.ALL else {"size": size}),
             **{k: v for k, v in extra.items() if k != "coverage"}, "time": _now(), **(timing or {})}
    return {"format": _FORMAT, "version": _VERSION, "kind": kind, "size": size, "sheets": int(layers[0].shape[0]),
            "dtype": _dtype_name(layers[0].dtype), "feature": feature, "code": dict(code or {}),
            "sources": list(sources), "n_images": n, **extra, "created": _now(),
            **({"timing": timing} if timing is not None else {}), "history": [build]}


def build_all(
    layers: Sequence[Tensor], sources: Sequence[str], feature: dict[str, Any], *, dtype: torch.dtype | None = None,
    code: dict[str, str] | None = None,
) -> TemplateSet:
    """ALL template: every training image is a sheet. ``layers[j]`` ``[N, C_j, h_j, w_j]``."""
    n = _check_layers(layers, sources)
    if n == 0:
        raise ValueError("an ALL template needs at least one training image")
    out = [to_pixel_major(layer.to(dtype or layer.dtype)) for layer in layers]  # no copy if already pixel-major
    meta = _build_meta(TemplateKind.ALL, n, out, feature, code, sources)
    return _finish(out, [], meta)


def pts_pixels(vectors: Tensor, size: int, min_samples: int, chunk: int | None = None,
               bar: Any = None) -> tuple[Tensor, Tensor, float, float]:
    """PTS choice at every pixel of one layer: ``vectors`` ``[N, C, h, w]`` -> training-image indices
    ``[h*w, min(N, K)]``, easy-seed counts ``[h*w]``, and the seconds spent in OPTICS and in the selection.
    Pixels are independent: any split of the pixels gives the same answer (what distributed builds rely on)."""
    n, _, h, w = vectors.shape
    index = torch.empty((h * w, min(n, size)), dtype=torch.long, device=vectors.device)
    n_easy = torch.empty(h * w, dtype=torch.long, device=vectors.device)
    t_optics = t_select = 0.0
    start = time.perf_counter()
    for lo, hi, gram, first in pixel_grams(vectors, chunk):
        if n >= min_samples:
            labels = optics_block(gram, min_samples).to(vectors.device)
        else:
            labels = torch.full((hi - lo, n), -1, dtype=torch.long, device=vectors.device)
        mid = time.perf_counter()
        index[lo:hi], n_easy[lo:hi] = select_block(gram, first, labels, size)
        t_optics += mid - start
        start = time.perf_counter()
        t_select += start - mid
        if bar is not None:
            bar.update()
    return index, n_easy, t_optics, t_select


def build_pts(
    layers: Sequence[Tensor],
    size: int,
    sources: Sequence[str],
    feature: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    chunk: int | None = None,
    code: dict[str, str] | None = None,
    pixels: Callable[..., tuple[Tensor, Tensor, float, float]] | None = None,
) -> TemplateSet:
    """PTS template of K = ``size`` sheets (``min(N, K)`` if N < K) per layer.

    ``layers[j]`` ``[N, C_j, h_j, w_j]`` unit vectors. Runs :func:`pts_pixels` (OPTICS and the selection, chunk
    by chunk, one tqdm bar over all chunks) per layer and records the seconds spent in each in
    ``meta["timing"]``. ``pixels`` replaces :func:`pts_pixels` (same signature, e.g. Ray tasks over pixel blocks).
    """
    check_size(size)
    n = _check_layers(layers, sources)
    if n == 0:
        raise ValueError("a PTS template needs at least one training image")
    min_samples = min_samples_for(n, size)
    t_optics = t_select = 0.0
    out: list[Tensor] = []
    easy: list[Tensor] = []
    total = sum(len(chunks(layer.shape[2] * layer.shape[3], n, chunk, layer.device)) for layer in layers)
    with tqdm(total=total, desc=f"PTS K={size}", unit="chunk", disable=not progress or pixels is not None) as bar:
        for layer in layers:
            _, _, h, w = layer.shape
            if pixels is None:
                index, n_easy, optics_s, select_s = pts_pixels(layer, size, min_samples, chunk, bar)
            else:
                index, n_easy, optics_s, select_s = pixels(layer, size, min_samples, chunk)
            t_optics, t_select = t_optics + optics_s, t_select + select_s
            out.append(gather_sheets(layer, index.T.reshape(-1, h, w)).to(dtype or layer.dtype).contiguous())
            easy.append(n_easy.reshape(h, w).to(torch.int32))
    timing = {"optics_s": round(t_optics, 3), "select_s": round(t_select, 3)}
    meta = _build_meta(TemplateKind.PTS, size, out, feature, code, sources, timing, min_samples=min_samples)
    return _finish(out, easy, meta)


def _radius_summary(radius: Sequence[Tensor], counts: Sequence[Tensor]) -> list[dict[str, float]]:
    """Per layer: mean / 95th percentile / max coverage radius and the mean number of distinct sheets."""
    return [{"mean": round(float(r.mean()), 5), "p95": round(float(r.float().quantile(0.95)), 5),
             "max": round(float(r.max()), 5), "mean_sheets": round(float(c.float().mean()), 2)}
            for r, c in zip(radius, counts)]


def build_cover(
    layers: Sequence[Tensor],
    size: int,
    sources: Sequence[str],
    feature: dict[str, Any],
    *,
    target: float | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    chunk: int | None = None,
    code: dict[str, str] | None = None,
) -> TemplateSet:
    """COVER template (:mod:`hetmm.core.templates.cover`): per pixel the ``min(N, K)`` training vectors chosen by
    farthest-first, so every training vector lies within the pixel's coverage radius of one of them.

    ``target``: a pixel stops once its radius is at most that (its other slots repeat its first sheet), and the
    template keeps only as many sheets as the neediest pixel used (adaptive K, capped at ``size``). The radius maps
    are kept (``radius``); ``meta["coverage"]`` summarises them per layer.
    """
    check_size(size)
    n = _check_layers(layers, sources)
    if n == 0:
        raise ValueError("a COVER template needs at least one training image")
    start = time.perf_counter()
    picks, radius, counts = [], [], []
    total = sum(len(chunks(layer.shape[2] * layer.shape[3], n, chunk, layer.device)) for layer in layers)
    with tqdm(total=total, desc=f"COVER K={size}", unit="chunk", disable=not progress) as bar:
        for layer in layers:
            _, _, h, w = layer.shape
            index, r, c = cover_pixels(layer, size, target, chunk, bar)
            picks.append(index.T.reshape(-1, h, w))
            radius.append(r.reshape(h, w))
            counts.append(c.reshape(h, w))
    sheets = int(max(int(c.max()) for c in counts)) if target is not None else min(n, size)
    out = [gather_sheets(layer, index[:sheets]).to(dtype or layer.dtype).contiguous()
           for layer, index in zip(layers, picks)]
    timing = {"select_s": round(time.perf_counter() - start, 3)}
    meta = _build_meta(TemplateKind.COVER, size, out, feature, code, sources, timing, target_radius=target,
                       coverage=_radius_summary(radius, counts))
    return _finish(out, [], meta, [r.float() for r in radius])


def _feature_mismatch(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """One line per key of ``want`` whose value differs in ``have``."""
    have, want = _plain(have), _plain(want)
    missing = "<missing>"
    return [
        f"template built with {key}={have.get(key, missing)!r} but config asks for {key}={value!r}"
        for key, value in want.items()
        if have.get(key, missing) != value
    ]


def hot_update(
    tset: TemplateSet,
    new_layers: Sequence[Tensor],
    new_sources: Sequence[str],
    *,
    feature: dict[str, Any] | None = None,
    chunk: int | None = None,
) -> TemplateSet:
    """Insert new good images without a full rebuild (ALL appends; PTS: :func:`hetmm.core.templates.selection.reseed`).

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
    radius, changed = list(tset.radius), None
    if not keep:
        layers = list(tset.layers)
    elif kind == TemplateKind.ALL:
        layers = [torch.cat([old, add.to(old.dtype)]) for old, add in zip(tset.layers, new)]
    elif kind == TemplateKind.COVER:
        layers, radius, changed = _extend_cover(tset, new, size, chunk)
        meta["coverage"] = _radius_summary(radius, [torch.full_like(r, layers[0].shape[0]) for r in radius])
    else:
        layers = [reseed(old, e, add, size, chunk) for old, e, add in zip(tset.layers, tset.easy, new)]
    meta["sources"] += [new_sources[i] for i in keep]
    meta["n_images"] += len(keep)
    meta["sheets"] = layers[0].shape[0]
    if kind == TemplateKind.ALL:
        meta["size"] = meta["sheets"]
    meta["history"].append(
        {
            "event": "hot_update",
            "method": {TemplateKind.ALL: "append", TemplateKind.COVER: "farthest-first over uncovered"}.get(
                kind, "reseeded-greedy"),
            **({"pixels_changed": changed} if changed is not None else {}),
            "added": len(keep),
            "skipped_existing": skipped,
            "n_images": meta["n_images"],
            "time": _now(),
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return _finish(layers, list(tset.easy), meta, radius)


def _extend_cover(tset: TemplateSet, new: Sequence[Tensor], size: int, chunk: int | None
                  ) -> tuple[list[Tensor], list[Tensor], int]:
    """COVER hot update per layer (:func:`hetmm.core.templates.cover.extend`); also the pixels that changed."""
    layers, radius, changed = [], [], 0
    for old, r, add in zip(tset.layers, tset.radius, new):
        index, bound, moved = extend(old, r, add, size, chunk)
        layers.append(gather_sheets(torch.cat([old, add.to(old.dtype)]), index).contiguous())
        radius.append(bound)
        changed += int(moved.sum())
    return layers, radius, changed


def save_template(path: str | Path, tset: TemplateSet) -> None:
    """Atomically write ``tset`` as a plain dict of CPU tensors and meta (``weights_only`` safe).

    Layers are stored pixel-major (:func:`hetmm.core.layout.to_pixel_major`), the layout matching reads, and
    ``torch.load`` keeps it: inference then needs no re-layout copy (a transient of the largest layer).
    """
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "meta": tset.meta,
        "layers": [to_pixel_major(t.detach().cpu()) for t in tset.layers],
        "easy": [t.detach().cpu().contiguous() for t in tset.easy],
        "radius": [t.detach().cpu().contiguous() for t in tset.radius],
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
        radius = list(payload.get("radius", []))  # files written before COVER existed have none
        ok = meta["content_hash"] == _content_hash(layers, easy, meta, radius)
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise TemplateMismatchError(f"{corrupt} ({type(exc).__name__}: {exc}); {_REBUILD}") from exc
    if not ok:
        raise TemplateMismatchError(f"{corrupt}: content hash mismatch; {_REBUILD}")
    if expect is not None and (diff := _feature_mismatch(meta["feature"], expect)):
        raise TemplateMismatchError(f"template {path}: " + "; ".join(diff) + f"; {_REBUILD}")
    return TemplateSet(layers=layers, meta=meta, easy=easy, radius=radius).to(map_location)
