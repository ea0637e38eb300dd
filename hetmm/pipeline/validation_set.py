"""The label-free validation set of a line: synthetic defects made on its held-out good training images.

Shared by ``calibrate`` (thresholds) and ``train`` (TFA-Net's per-epoch validation, on features computed once by
:func:`validation_features`), so both see the same images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hetmm.config import ProductLine
from hetmm.core.features import FeatureExtractor, content_box
from hetmm.data.images import load_image
from hetmm.data.synthetic import DefectFamily, synthesize
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths


def synthetic_defects(line: ProductLine, paths: LinePaths, train: pd.DataFrame,
                      normals: list[str]) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Defect images, their masks ``[M, H, W]`` (bool, at ``features.image_size``) and their families, made on the
    validation ``normals`` (sha256 of training images) with ``tune.seed``."""
    path_of = dict(zip(train["sha256"], train["path"]))
    images = [np.asarray(load_image(paths.data / path_of[s])) for s in normals]
    tune = line.tune
    defects = synthesize(images, tune.seed, per_image=tune.per_image(len(images), len(DefectFamily)))
    height, width = line.features.image_size
    masks = np.zeros((len(defects), height, width), dtype=bool)
    for i, d in enumerate(defects):
        resized = Image.fromarray(d.mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
        masks[i] = np.asarray(resized) >= 128
    return [Image.fromarray(d.image) for d in defects], masks, sorted({d.family.value for d in defects})


def validation_features(line: ProductLine, paths: LinePaths, cache: FeatureCache, train: pd.DataFrame,
                        normals: list[str], device: torch.device | str) -> dict:
    """Features of the validation normals and of synthetic defects on them (computed once), the defects' masks."""
    good, boxes = cache.load(normals)
    images, masks, _ = synthetic_defects(line, paths, train, normals)
    extractor, f = FeatureExtractor(line.features, device), line.features
    defects = [(extractor(images[i : i + 8]), [content_box(im.size, f.image_size, f.resize) for im in images[i : i + 8]])
               for i in range(0, len(images), 8)]
    return {"good": (good, boxes), "defects": defects, "masks": masks}
