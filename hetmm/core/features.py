"""Image preprocessing and per-pixel L2-normalised multi-layer features: RGB images in, feature tensors out.

:class:`FeatureExtractor` is the one way features are computed (extract stage, predict, update, tuning); its output
depends on the :class:`~hetmm.config.FeatureConfig` and on this module's and the backbones' code, which is why the
feature cache and templates are keyed on both (:mod:`hetmm.pipeline.provenance`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hetmm.config import FeatureConfig
from hetmm.core.backbones import Backbone, build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_STD = (0.229, 0.256, 0.225)  # the published code's typo for green; kept for parity runs


def resize_image(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """Resize an RGB image to ``size`` = (height, width).

    ``squash`` is the official non-uniform bilinear resize. ``pad`` keeps the aspect ratio and centres the
    image on a black canvas, so non-square parts (MTD tiles) are not stretched.
    """
    height, width = size
    if mode == "squash":
        return image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    scale = min(width / image.width, height / image.height)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize(inner, Image.BILINEAR), ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def content_box(image_size: tuple[int, int], size: tuple[int, int], mode: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image content inside the resized canvas (everything for squash)."""
    height, width = size
    if mode == "squash":
        return 0, 0, height, width
    src_w, src_h = image_size
    scale = min(width / src_w, height / src_h)
    inner_w, inner_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    return (height - inner_h) // 2, (width - inner_w) // 2, inner_h, inner_w


def to_tensor(images: Sequence[Image.Image], config: FeatureConfig) -> torch.Tensor:
    """RGB PIL images -> normalised batch ``[B, 3, H, W]`` float32 at ``config.image_size``.

    ``normalisation="image"`` standardises each image with its own per-channel mean and std, measured over the
    image content only (the black canvas of ``resize="pad"`` is excluded and set to 0, the image mean).
    """
    arrays = [np.asarray(resize_image(im, config.image_size, config.resize), dtype=np.float32) for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    if config.normalisation == "image":
        return standardise_per_image(batch, [content_box(im.size, config.image_size, config.resize) for im in images])
    std = OFFICIAL_STD if config.normalisation == "official" else IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (batch - mean) / torch.tensor(std).view(1, 3, 1, 1)


def standardise_per_image(batch: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]],
                          eps: float = 1e-3) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> zero mean, unit std per image and channel over each (top, left, h, w) box.

    Pixels outside the box (padding) become 0. ``eps`` keeps flat images (std ~ 0) finite.
    """
    out = torch.zeros_like(batch)
    for i, (top, left, height, width) in enumerate(boxes):
        content = batch[i, :, top:top + height, left:left + width]
        mean = content.mean(dim=(1, 2), keepdim=True)
        std = content.std(dim=(1, 2), keepdim=True)
        out[i, :, top:top + height, left:left + width] = (content - mean) / (std + eps)
    return out


def l2_normalise(features: torch.Tensor) -> torch.Tensor:
    """Unit length over channels per pixel: ``[B, C, H, W] -> [B, C, H, W]`` (cosine = dot product)."""
    return F.normalize(features, p=2, dim=1)


class FeatureExtractor:
    """Backbone plus preprocessing for one :class:`FeatureConfig`; returns the configured layers only."""

    def __init__(self, config: FeatureConfig, device: torch.device | str = "cpu",
                 backbone: Backbone | None = None):
        self.config = config
        self.device = torch.device(device)
        self.backbone = (backbone or build_backbone(config.backbone, weights=config.weights,
                                                    preact=config.preact, blocks=config.blocks)).to(self.device)
        self.dtype = torch.float16 if config.dtype == "float16" else torch.float32

    @property
    def channels(self) -> list[int]:
        return [self.backbone.channels[layer - 1] for layer in self.config.layers]

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """RGB images -> per configured layer ``[B, C_j, H_j, W_j]``, L2-normalised, in the storage dtype."""
        batch = to_tensor(images, self.config).to(self.device)
        maps = [maps.float() for maps in self.backbone(batch)]
        if self.config.flip_average:
            mirrored = self.backbone(batch.flip(-1))
            maps = [(a + b.float().flip(-1)) / 2 for a, b in zip(maps, mirrored)]
        out = []
        for layer in self.config.layers:
            features = maps[layer - 1]
            if self.config.pool > 1:
                features = local_average(features, self.config.pool)
            out.append(l2_normalise(features).to(self.dtype))
        return out


def local_average(features: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` x ``size`` mean over each pixel's neighbourhood, stride 1, same grid; border windows are truncated
    (the mean is over the cells inside the grid, as PatchCore's aggregation but without zero padding bias)."""
    return F.avg_pool2d(features, size, stride=1, padding=size // 2, count_include_pad=False)
