"""The one inference path: features + model + settings -> anomaly maps and image scores.

The CLI's ``predict``, the DVC ``infer`` stage, the ablation report and the tests all call :meth:`Scorer.match`
and :meth:`Scorer.finish` (cached features, optionally with stored distances), :meth:`Scorer.score_features`
or :meth:`Scorer.predict` (images). :class:`Inspector` scores with a HETMM template set; TFA-Net's scorer
(:mod:`hetmm.core.tfa_inspector`) shares everything after the raw maps: geometry, blur and image scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from hetmm.config import MatchingConfig, PostConfig, ProductLine
from hetmm.core.features import FeatureExtractor, content_box
from hetmm.core.layout import pixel_major_
from hetmm.core.scoring import LayerMatches, fuse_matches, gaussian_blur, image_scores, match_layers
from hetmm.core.templates import TemplateSet


@dataclass
class Scored:
    """Anomaly maps ``[B, H, W]`` at the model resolution and image scores ``[B]`` (float32, CPU)."""

    maps: torch.Tensor
    scores: torch.Tensor


def restore_geometry(maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """Crop each map ``[B, H, W]`` to its content box and stretch it back to ``[H, W]``.

    With ``resize: pad`` the canvas border is not part of the product and must not score; after this the
    map has the same geometry as a squash-resized image, so masks and overlays line up the same way.
    """
    height, width = maps.shape[-2:]
    out = maps.clone()
    for i, (top, left, h, w) in enumerate(boxes):
        if (h, w) != (height, width):
            crop = maps[i : i + 1, None, top : top + h, left : left + w]
            out[i] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=True)[0, 0]
    return out


class Scorer(ABC):
    """What every method shares: the line's backbone, image geometry and the post-processing of raw maps.

    A method implements ``match(features) -> raw`` and ``finish(raw, boxes) -> Scored`` (via :meth:`post_process`)
    and :attr:`version`, the content hash of its model (template set or trained network).
    """

    def __init__(self, line: ProductLine, device: torch.device | str = "cpu",
                 extractor: FeatureExtractor | None = None):
        self.line = line
        self.device = torch.device(device)
        self._extractor = extractor

    @property
    @abstractmethod
    def version(self) -> str: ...

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:  # built lazily: scoring cached features needs no backbone
            self._extractor = FeatureExtractor(self.line.features, self.device)
        return self._extractor

    @abstractmethod
    def match(self, features: Sequence[torch.Tensor]) -> object: ...

    @abstractmethod
    def finish(self, raw: object, boxes: Sequence[tuple[int, int, int, int]] | None = None) -> Scored: ...

    def post_process(self, maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]] | None) -> Scored:
        """Maps ``[B, H, W]`` at the image size -> geometry restored, blurred, with image scores."""
        post = self.line.post
        maps = maps.to(self.device)
        if boxes is not None and self.line.features.resize == "pad":
            maps = restore_geometry(maps, boxes)
        if post.blur_sigma > 0:
            maps = gaussian_blur(maps, post.blur_sigma, post.blur_kernel)
        scores = image_scores(maps, post.image_score, post.block)
        return Scored(maps.float().cpu(), scores.float().cpu())

    def score_features(self, features: Sequence[torch.Tensor],
                       boxes: Sequence[tuple[int, int, int, int]] | None = None) -> Scored:
        """Per-layer features ``[B, C_j, H_j, W_j]`` -> :class:`Scored`."""
        return self.finish(self.match(features), boxes)

    def boxes(self, images: Sequence[Image.Image]) -> list[tuple[int, int, int, int]]:
        f = self.line.features
        return [content_box(im.size, f.image_size, f.resize) for im in images]

    def predict(self, images: Sequence[Image.Image]) -> Scored:
        """RGB images (any size) -> :class:`Scored` at the model resolution."""
        return self.score_features(self.extractor(images), self.boxes(images))


class Inspector(Scorer):
    """A product line's template and settings, ready to score images on one device."""

    def __init__(self, line: ProductLine, template: TemplateSet, device: torch.device | str = "cpu",
                 extractor: FeatureExtractor | None = None):
        super().__init__(line, device, extractor)
        # Matching reads per-pixel rows: pixel-major layers make them views (with NCHW, every call re-gathered the
        # template, 3-5x the matching time on CPU). ``to`` returns a new set, so the caller's is not changed, and
        # saved templates are pixel-major already, so nothing is copied for them.
        self.template = template.to(self.device)
        pixel_major_(self.template.layers)

    @property
    def version(self) -> str:
        return self.template.meta["content_hash"]

    def with_settings(self, matching: MatchingConfig | None = None, post: PostConfig | None = None,
                      template: TemplateSet | None = None) -> "Inspector":
        """A variant sharing this inspector's backbone (ablations, parameter sweeps)."""
        line = replace(self.line, matching=matching or self.line.matching, post=post or self.line.post)
        return Inspector(line, template or self.template, self.device, self._extractor)

    @torch.no_grad()
    def match(self, features: Sequence[torch.Tensor], first_sheet: int = 0) -> LayerMatches:
        """Per-layer features ``[B, C_j, H_j, W_j]`` -> distances to the sheets from ``first_sheet`` on."""
        m = self.line.matching
        layers = self.template.layers
        query = [f.to(self.device, layers[0].dtype) for f in features]
        sheets = layers if first_sheet == 0 else [t[first_sheet:] for t in layers]
        return match_layers(query, sheets, m.forward_windows, m.backward_windows, m.alphas, m.weights, m.mode)

    @torch.no_grad()
    def finish(self, matches: LayerMatches, boxes: Sequence[tuple[int, int, int, int]] | None = None) -> Scored:
        """Fusion, geometry, blur and image scores of :meth:`match`'s output."""
        return self.post_process(fuse_matches(matches, self.line.features.image_size), boxes)
