"""Per-image feature cache, keyed by image sha256 and by the feature key (settings + feature code).

Layout: ``<root>/<key digest>/<image sha256>.pt`` holding ``{"layers": [[C_j,H_j,W_j], ...], "box": [...]}``, plus
``key.json`` saying which settings and code made them. Adding good images computes features for those images only;
a change of a feature setting or of the feature code starts a new key folder (every image is recomputed), and
:meth:`FeatureCache.prune` drops what is no longer used. :func:`extract_images` is the one batched extraction loop
(cache filling, ``hetmm predict``, ``hetmm update``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from hetmm.core.features import content_box
from hetmm.core.layout import empty_stack
from hetmm.data.images import load_image
from hetmm.errors import DataError
from hetmm.io import atomic_path, write_json_atomic
from hetmm.pipeline.provenance import FeatureKey

KEY_FILE = "key.json"


class FeatureCache:
    def __init__(self, root: str | Path, key: FeatureKey):
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key.digest

    def path(self, sha: str) -> Path:
        return self.dir / f"{sha}.pt"

    def missing(self, shas: Iterable[str]) -> list[str]:
        return [sha for sha in dict.fromkeys(shas) if not self.path(sha).is_file()]

    def reason(self) -> str:
        """Why this run's key folder holds what it holds: reused, or what changed since the previous folder."""
        if self.dir.is_dir():
            return "feature settings and code unchanged"
        previous = [_read_key(d) for d in sorted(self.root.glob("*/")) if (d / KEY_FILE).is_file()]
        for record in previous:
            if (why := self.key.differences(record)) == "feature code changed":
                return why
        return self.key.differences(previous[0]) if previous else "no cached features"

    def save(self, sha: str, layers: Sequence[torch.Tensor], box: tuple[int, int, int, int]) -> None:
        if not (self.dir / KEY_FILE).is_file():
            write_json_atomic(self.dir / KEY_FILE, self.key.record())
        layers = [t.cpu().contiguous() for t in layers]
        with atomic_path(self.path(sha)) as tmp:
            torch.save({"layers": layers, "box": list(box), "checksum": _checksum(layers, box)}, tmp)

    def load_one(self, sha: str) -> tuple[list[torch.Tensor], tuple[int, int, int, int]]:
        """One entry, verified: a missing, torn, altered (bit rot) or non-finite entry is a DataError naming it."""
        path = self.path(sha)
        try:
            item = torch.load(path, map_location="cpu", weights_only=True)
            layers, box = list(item["layers"]), tuple(item["box"])
            intact = item.get("checksum") == _checksum(layers, box)
        except FileNotFoundError:
            raise DataError(f"{path}: cached features missing; run the extract stage (`hetmm extract`)") from None
        except Exception as exc:  # a torn or foreign file must not be trusted
            raise DataError(f"{path}: unreadable feature cache entry ({type(exc).__name__}); run the extract stage, "
                            "which recomputes it") from exc
        if not intact:
            raise DataError(f"{path}: feature cache entry fails its checksum (altered on disk); run the extract "
                            "stage, which recomputes it")
        return layers, box

    def damaged(self, shas: Iterable[str]) -> list[str]:
        """Entries present on disk that do not load and verify (they are recomputed by :func:`extract_to_cache`)."""
        bad = []
        for sha in dict.fromkeys(shas):
            if self.path(sha).is_file():
                try:
                    self.load_one(sha)
                except DataError:
                    bad.append(sha)
        return bad

    def load(self, shas: Sequence[str], pixel_major: bool = False
             ) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
        """Stack cached features: per layer ``[N, C_j, H_j, W_j]``, plus the content boxes.

        Entries are copied one by one into tensors allocated up front, so the peak is the stacked size plus one
        entry (collecting every entry and then ``torch.stack`` held both). ``pixel_major`` allocates them in the
        layout templates are matched and stored in (:mod:`hetmm.core.layout`), so building and saving a template
        never re-lays a whole layer out.
        """
        stacked: list[torch.Tensor] = []
        boxes = []
        for i, sha in enumerate(shas):
            layers, box = self.load_one(sha)
            if not stacked:
                stacked = [empty_stack(len(shas), t, pixel_major) for t in layers]
            if len(layers) != len(stacked) or any(
                    t.shape != s.shape[1:] or t.dtype != s.dtype for t, s in zip(layers, stacked)):
                raise DataError(f"{self.path(sha)}: cached features {[tuple(t.shape) for t in layers]} do not match "
                                f"the other entries' {[tuple(s.shape[1:]) for s in stacked]}; delete it and re-run "
                                "extract")
            for store, t in zip(stacked, layers):
                store[i].copy_(t)
            boxes.append(box)
        return stacked, boxes

    def prune(self, keep: Iterable[str]) -> int:
        """Delete entries of images no longer in the data and folders of other keys."""
        keep = set(keep)
        removed = 0
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other.is_dir() and other != self.dir:
                    removed += sum(1 for _ in other.glob("*.pt"))
                    shutil.rmtree(other)
        if self.dir.is_dir():
            for entry in self.dir.glob("*.pt"):
                if entry.stem not in keep:
                    entry.unlink()
                    removed += 1
        return removed


def _checksum(layers: Sequence[torch.Tensor], box: Sequence[int]) -> str:
    digest = hashlib.sha256(repr((list(box), [(str(t.dtype), tuple(t.shape)) for t in layers])).encode())
    for t in layers:
        digest.update(t.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_key(folder: Path) -> dict:
    try:
        return json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return {}


def extract_images(extractor: Any, files: Sequence[Path], batch_size: int, progress: bool = True,
                   desc: str = "features") -> Iterator[tuple[list[Image.Image], list[torch.Tensor]]]:
    """Decode and extract ``files`` batch by batch: yields (images, per-layer features ``[B, C_j, H_j, W_j]``).

    ``extractor``: a :class:`FeatureExtractor`, or a pool with ``imap(batches)`` that yields each batch's
    features in order (:class:`hetmm.pipeline.cluster.ExtractorPool`); images are decoded here either way."""
    decoded: deque[list[Image.Image]] = deque()

    def batches() -> Iterator[list[Image.Image]]:
        for start in range(0, len(files), batch_size):
            decoded.append([load_image(path) for path in files[start : start + batch_size]])
            yield decoded[-1]

    run = extractor.imap if hasattr(extractor, "imap") else (lambda items: map(extractor, items))
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar:
        for layers in run(batches()):
            images = decoded.popleft()
            yield images, layers
            bar.update(len(images))


def extract_to_cache(extractor: Any, cache: FeatureCache, items: Sequence[tuple[Path, str]],
                     batch_size: int, progress: bool = True) -> tuple[int, int, int]:
    """Compute features for ``(image path, sha256)`` items not cached or cached but damaged; returns
    (computed, reused, repaired). Non-finite features are refused naming the image."""
    shas = [sha for _, sha in items]
    damaged = cache.damaged(shas)
    todo_shas = set(cache.missing(shas)) | set(damaged)
    todo = list({sha: path for path, sha in items if sha in todo_shas}.items())
    size, mode = extractor.config.image_size, extractor.config.resize
    pending = iter(todo)
    for images, layers in extract_images(extractor, [path for _, path in todo], batch_size, progress):
        for i, image in enumerate(images):
            sha, path = next(pending)
            if not all(bool(t[i].isfinite().all()) for t in layers):
                raise DataError(f"{path}: the backbone gives non-finite features for this image; check the file "
                                "(or the backbone weights) and remove it from the line if it is not a real image")
            cache.save(sha, [t[i] for t in layers], content_box(image.size, size, mode))
    return len(todo), len(set(shas)) - len(todo), len(damaged)
