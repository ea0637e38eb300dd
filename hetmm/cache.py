"""Per-image feature cache keyed by image sha256 and a digest of the feature settings.

Layout: ``<root>/<settings digest>/<image sha256>.pt`` holding ``{"layers": [[C_j,H_j,W_j], ...], "box": [...]}``.
Adding new good images to a product line therefore computes features for those images only; changing a
feature setting starts a new digest folder, and :meth:`FeatureCache.prune` drops what is no longer used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from hetmm.data import load_image
from hetmm.errors import DataError
from hetmm.features import FeatureExtractor, content_box
from hetmm.io import atomic_path


class FeatureCache:
    def __init__(self, root: str | Path, digest: str):
        self.root = Path(root)
        self.dir = self.root / digest

    def path(self, sha: str) -> Path:
        return self.dir / f"{sha}.pt"

    def missing(self, shas: Iterable[str]) -> list[str]:
        return [sha for sha in dict.fromkeys(shas) if not self.path(sha).is_file()]

    def save(self, sha: str, layers: Sequence[torch.Tensor], box: tuple[int, int, int, int]) -> None:
        with atomic_path(self.path(sha)) as tmp:
            torch.save({"layers": [t.cpu().contiguous() for t in layers], "box": list(box)}, tmp)

    def load_one(self, sha: str) -> tuple[list[torch.Tensor], tuple[int, int, int, int]]:
        path = self.path(sha)
        try:
            item = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"{path}: cached features missing; run the extract stage (`hetmm extract`)") from None
        except Exception as exc:  # a torn or foreign file must not be trusted
            raise DataError(f"{path}: unreadable feature cache entry ({exc}); delete it and re-run extract") from exc
        return item["layers"], tuple(item["box"])

    def load(self, shas: Sequence[str], pixel_major: bool = False
             ) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
        """Stack cached features: per layer ``[N, C_j, H_j, W_j]``, plus the content boxes.

        Entries are copied one by one into tensors allocated up front, so the peak is the stacked size plus
        one entry (collecting every entry and then ``torch.stack`` held both: twice the ALL template's size
        when a template is built; see benchmarks/bench_memory.py). ``pixel_major`` allocates them in the
        layout templates are matched and stored in (:func:`hetmm.matching.to_pixel_major`), so building and
        saving a template never re-lays a whole layer out.
        """
        stacked: list[torch.Tensor] = []
        boxes = []
        for i, sha in enumerate(shas):
            layers, box = self.load_one(sha)
            if not stacked:
                stacked = [_allocate(len(shas), t, pixel_major) for t in layers]
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
        """Delete entries of images no longer in the data and folders of other settings."""
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


def _allocate(n: int, entry: torch.Tensor, pixel_major: bool) -> torch.Tensor:
    """Uninitialised ``[n, C, H, W]`` for entries like ``entry`` ``[C, H, W]``, NCHW or pixel-major."""
    c, h, w = entry.shape
    if pixel_major:
        return torch.empty((h, w, n, c), dtype=entry.dtype).permute(2, 3, 0, 1)
    return torch.empty((n, c, h, w), dtype=entry.dtype)


def extract_to_cache(extractor: FeatureExtractor, cache: FeatureCache, items: Sequence[tuple[Path, str]],
                     batch_size: int, progress: bool = True) -> tuple[int, int]:
    """Compute features for ``(image path, sha256)`` items not yet cached; returns (computed, reused)."""
    todo_shas = set(cache.missing(sha for _, sha in items))
    todo = list({sha: path for path, sha in items if sha in todo_shas}.items())
    size, mode = extractor.config.image_size, extractor.config.resize
    bar = tqdm(total=len(todo), desc="features", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        images = [load_image(path) for _, path in chunk]
        layers = extractor(images)
        for i, (sha, _) in enumerate(chunk):
            cache.save(sha, [t[i] for t in layers], content_box(images[i].size, size, mode))
        bar.update(len(chunk))
    bar.close()
    return len(todo), len({sha for _, sha in items}) - len(todo)
