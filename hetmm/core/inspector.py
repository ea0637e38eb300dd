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
from PIL import Image

from hetmm.config import MatchingConfig, PostConfig, ProductLine
from hetmm.core.features import FeatureExtractor, content_box
from hetmm.core.layout import pixel_major_
from hetmm.core.scoring import Box, LayerMatches, PostPlan, match_layers, post_process
from hetmm.core.templates import TemplateSet


@dataclass
class Scored:
    """Anomaly maps ``[B, H, W]`` at the model resolution and image scores ``[B]`` (float32, CPU)."""

    maps: torch.Tensor
    scores: torch.Tensor


def post_plan(line: ProductLine) -> PostPlan:
    """The line's post-processing settings as :func:`~hetmm.core.scoring.post_process` takes them."""
    f, p = line.features, line.post
    return PostPlan(tuple(f.image_size), f.resize == "pad", p.blur_sigma, p.blur_kernel, p.image_score, p.block)


class Scorer(ABC):
    """What every method shares: the line's backbone, image geometry and the post-processing of raw maps.

    A method implements ``match(features) -> raw`` and ``finish(raw, boxes) -> Scored`` (via :meth:`post_process`),
    :attr:`version`, the content hash of its model (template set or trained network), and :attr:`sheets`.
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
    @abstractmethod
    def sheets(self) -> int:
        """Template images a query is compared with (template sheets; one for TFA-Net's template image)."""

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:  # built lazily: scoring cached features needs no backbone
            self._extractor = FeatureExtractor(self.line.features, self.device)
        return self._extractor

    @abstractmethod
    def match(self, features: Sequence[torch.Tensor]) -> object: ...

    @abstractmethod
    def finish(self, raw: object, boxes: Sequence[Box] | None = None) -> Scored: ...

    def post_process(self, raw: torch.Tensor | LayerMatches, boxes: Sequence[Box] | None) -> Scored:
        """Maps ``[B, H, W]`` at the image size, or matches to fuse -> :func:`~hetmm.core.scoring.post_process`."""
        if isinstance(raw, torch.Tensor):
            raw = raw.to(self.device)
        maps, scores = post_process(raw, post_plan(self.line), boxes)
        return Scored(maps.float().cpu(), scores.float().cpu())

    def score_features(self, features: Sequence[torch.Tensor],
                       boxes: Sequence[Box] | None = None) -> Scored:
        """Per-layer features ``[B, C_j, H_j, W_j]`` -> :class:`Scored`."""
        return self.finish(self.match(features), boxes)

    def boxes(self, images: Sequence[Image.Image]) -> list[Box]:
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

    @property
    def sheets(self) -> int:
        return int(self.template.layers[0].shape[0])

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
    def finish(self, matches: LayerMatches, boxes: Sequence[Box] | None = None) -> Scored:
        """Fusion, geometry, blur and image scores of :meth:`match`'s output."""
        return self.post_process(matches, boxes)
