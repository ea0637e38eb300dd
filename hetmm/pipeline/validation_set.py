"""The label-free validation set of a line: its held-out good training images and synthetic defects made on them.

One recipe for the tuner (maps compared at its evaluation size), ``calibrate`` (thresholds) and ``train``
(TFA-Net's validation figures, :func:`tfa_validation`, on features computed once by :func:`validation_features`),
so all three see the same images:
the validation normals, ``tune.seed``'s synthetic defects on them (:mod:`hetmm.data.synthetic`) and the defects'
masks resized to the size asked for (bilinear, then >= 0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hetmm.config import FeatureConfig, ProductLine, TuneConfig
from hetmm.core.features import FeatureExtractor, content_box
from hetmm.core.metrics import image_auroc, pixel_auroc
from hetmm.core.scoring import Box
from hetmm.core.tfa_inspector import TFAInspector
from hetmm.core.tfa_net import TFANet
from hetmm.data.images import load_image
from hetmm.data.synthetic import DefectFamily, synthesize
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths


@dataclass
class ValidationImages:
    """Validation normals, the synthetic defects made on them, their masks ``[M, H, W]`` (bool) and families."""

    normals: list[Image.Image]
    defects: list[Image.Image]
    masks: np.ndarray
    families: list[str]


def validation_images(line: ProductLine, paths: LinePaths, train: pd.DataFrame, normals: list[str],
                      size: tuple[int, int] | None = None) -> ValidationImages:
    """The validation ``normals`` (sha256 of training images) and the defects made on them, masks at ``size``
    (default ``features.image_size``)."""
    path_of = dict(zip(train["sha256"], train["path"]))
    return make_validation([load_image(paths.data / path_of[s]) for s in normals], line.tune,
                           size or line.features.image_size)


def make_validation(good: list[Image.Image], tune: TuneConfig, size: tuple[int, int]) -> ValidationImages:
    """Synthetic defects on the good images ``good`` with ``tune.seed`` (``tune.per_image`` of each family), masks
    ``[M, *size]``."""
    defects = synthesize([np.asarray(im) for im in good], tune.seed,
                         per_image=tune.per_image(len(good), len(DefectFamily)))
    height, width = size
    masks = np.zeros((len(defects), height, width), dtype=bool)
    for i, d in enumerate(defects):
        resized = Image.fromarray(d.mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
        masks[i] = np.asarray(resized) >= 128
    return ValidationImages(good, [Image.fromarray(d.image) for d in defects], masks,
                            sorted({d.family.value for d in defects}))


def validation_features(line: ProductLine, paths: LinePaths, cache: FeatureCache, train: pd.DataFrame,
                        normals: list[str], device: torch.device | str) -> dict:
    """Features of the validation normals and of synthetic defects on them (computed once), the defects' masks."""
    good, boxes = cache.load(normals)
    images = validation_images(line, paths, train, normals)
    defects = extract_batches(FeatureExtractor(line.features, device), line.features, images.defects, 8)
    return {"good": (good, boxes), "defects": defects, "masks": images.masks}


def extract_batches(extractor: FeatureExtractor, features: FeatureConfig, images: list[Image.Image], batch: int,
                    done: Callable[[int], object] | None = None) -> list[tuple[list[torch.Tensor], list[Box]]]:
    """Features of ``images`` (synthetic defects: not in the feature cache), ``batch`` at a time: per batch the
    per-layer features ``[b, C_j, H_j, W_j]`` (on the extractor's device) and the images' content boxes on the model
    canvas; ``done(b)`` after each batch (progress)."""
    out = []
    for i in range(0, len(images), batch):
        part = images[i : i + batch]
        out.append((extractor(part), [content_box(im.size, features.image_size, features.resize) for im in part]))
        if done is not None:
            done(len(part))
    return out


def tfa_validation(line: ProductLine, net: TFANet, template: torch.Tensor, device: torch.device | str,
                   validation: dict) -> dict[str, float]:
    """Validation loss on the normals (unmasked) and image / pixel AUROC on normals + synthetic defects."""
    scorer = TFAInspector(line, net, template, "", device)
    good_layers, good_boxes = validation["good"]
    raw = scorer.match(good_layers)  # the per-pixel loss: its mean is the validation loss
    outs = [scorer.finish(raw, good_boxes)] + [scorer.score_features(f, b) for f, b in validation["defects"]]
    scores = torch.cat([o.scores for o in outs]).numpy()
    maps = torch.cat([o.maps for o in outs]).numpy()
    n = len(good_boxes)
    masks = np.concatenate([np.zeros((n, *validation["masks"].shape[1:]), dtype=bool), validation["masks"]])
    return {"val/loss": float(raw.mean()), "val/image_auroc": image_auroc(scores, np.arange(len(scores)) >= n),
            "val/pixel_auroc": pixel_auroc(maps, masks)}
