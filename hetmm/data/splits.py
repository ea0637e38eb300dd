"""Fixed, seeded splits for datasets that ship without one (MTD).

The split is generated once by :func:`make_mtd_split` and committed as
``hetmm/resources/mtd_split.json``; the download stage reads the committed file, and a
test checks that regenerating it gives the same lists, so the protocol cannot drift.

Protocol (paper, after Rudolph et al. 2021): 80 % of ``MT_Free`` are templates (train), the
remaining 20 % plus every defect image are test. The test part is cut again into a ``dev``
half used for tuning and a ``holdout`` half reported once with frozen settings: about half of
each defect type and the matching share of the good test images.
"""

from __future__ import annotations

import json
import random
from importlib import resources

MTD_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Free", "MT_Uneven")
MTD_SPLIT_SEED = 20240601
TRAIN_FRACTION = 0.8


def _shuffled(names: list[str], seed: int, tag: str) -> list[str]:
    rng = random.Random(f"{seed}:{tag}")
    out = sorted(names)
    rng.shuffle(out)
    return out


def _halves(names: list[str], seed: int, tag: str) -> tuple[list[str], list[str]]:
    shuffled = _shuffled(names, seed, tag)
    cut = (len(shuffled) + 1) // 2
    return sorted(shuffled[:cut]), sorted(shuffled[cut:])


def make_mtd_split(stems_by_class: dict[str, list[str]], seed: int = MTD_SPLIT_SEED) -> dict:
    """Split MTD image stems (file names without extension) per class.

    Returns ``{"seed", "train": [...], "dev": {cls: [...]}, "holdout": {cls: [...]}}`` where
    ``train`` holds ``MT_Free`` stems only and every list is sorted.
    """
    free = _shuffled(stems_by_class["MT_Free"], seed, "MT_Free")
    n_train = int(len(free) * TRAIN_FRACTION)
    split = {"seed": seed, "train": sorted(free[:n_train]), "dev": {}, "holdout": {}}
    test_by_class = {cls: stems for cls, stems in stems_by_class.items() if cls != "MT_Free"}
    test_by_class["MT_Free"] = free[n_train:]
    for cls in sorted(test_by_class):
        dev, holdout = _halves(test_by_class[cls], seed, cls + ":test")
        split["dev"][cls] = dev
        split["holdout"][cls] = holdout
    return split


def load_mtd_split() -> dict:
    """The committed MTD split (see module docstring)."""
    text = resources.files("hetmm.resources").joinpath("mtd_split.json").read_text()
    return json.loads(text)


def validation_split(shas: list[str], share: float, limit: int, seed: int) -> tuple[list[str], list[str]]:
    """Good training images -> (template images, validation normals), both sorted.

    Seeded on the image contents (sha256), not on file order or names, so renaming or reordering the training
    images changes nothing; ``round(share * N)`` normals, at least 1 and at most ``limit``, and at least one image
    stays a template. Fewer than two images give no validation normals.
    """
    unique = sorted(set(shas))
    n = len(unique)
    if n < 2:
        return unique, []
    count = min(max(1, round(share * n)), limit, n - 1)
    held = set(seeded_sample(unique, count, seed, "validation"))
    return [s for s in unique if s not in held], sorted(held)


def seeded_sample(names: list[str], count: int, seed: int, tag: str) -> list[str]:
    """``count`` of ``names`` drawn reproducibly (independent of their order), sorted."""
    return sorted(_shuffled(names, seed, tag)[:count])
