"""Small builders of real image files and MVTec-layout trees for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, array: np.ndarray, **save_args: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path


def noise_rgb(seed: int, size: tuple[int, int] = (32, 24)) -> np.ndarray:
    """Random RGB ``uint8 [H, W, 3]`` for a ``(width, height)`` size: every seed gives distinct bytes."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def square_mask(size: tuple[int, int] = (32, 24)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[4:12, 6:16] = 255
    return mask


def make_mvtec_tree(root: Path, *, mask_suffix: str = "", image_ext: str = ".png") -> Path:
    """3 train/good, 2 test/good, 2 test/crack with masks named ``<name><mask_suffix>.png``."""
    for i in range(3):
        write_image(root / "train" / "good" / f"{i:03d}{image_ext}", noise_rgb(i))
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}{image_ext}", noise_rgb(10 + i))
        write_image(root / "test" / "crack" / f"{i:03d}{image_ext}", noise_rgb(20 + i))
        write_image(root / "ground_truth" / "crack" / f"{i:03d}{mask_suffix}.png", square_mask())
    return root
