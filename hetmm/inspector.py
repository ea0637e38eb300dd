"""The one inference path: features + template + settings -> anomaly maps and image scores.

The CLI's ``predict``, the DVC ``infer`` stage, the ablation report and the tests all call
:meth:`Inspector.score_features` (cached features) or :meth:`Inspector.predict` (images).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from hetmm.config import MatchingConfig, PostConfig, ProductLine
from hetmm.features import FeatureExtractor, content_box
from hetmm.matching import to_pixel_major
from hetmm.scoring import LayerMatches, fuse_matches, gaussian_blur, image_scores, match_layers
from hetmm.templates import TemplateSet


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from hetmm.errors import ConfigError

        raise ConfigError("device: cuda was requested but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


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


def is_pixel_major(layer: torch.Tensor) -> bool:
    """True when a template layer ``[N, C, H, W]`` is held so that per-pixel ``[N, C]`` rows are views."""
    return layer.permute(2, 3, 0, 1).is_contiguous()


def pixel_major_(template: TemplateSet) -> TemplateSet:
    """Re-lay ``template``'s layers out pixel-major in place, one layer at a time, and return it.

    Matching reads templates as per-pixel ``[N, C]`` rows; with an NCHW layout every matching call re-gathers
    the whole template chunk by chunk, which cost 3-5x the matching time on CPU (benchmarks/bench_inference.py).
    Saved templates are already pixel-major (:func:`hetmm.templates.save_template`), so this is a no-op for
    them; for others (files from before that, templates built in memory from NCHW features) converting in place
    keeps the peak at the template plus its largest layer, instead of two templates.
    """
    for j, layer in enumerate(template.layers):
        if not is_pixel_major(layer):
            template.layers[j] = to_pixel_major(layer)
    return template


class Inspector:
    """A product line's template and settings, ready to score images on one device."""

    def __init__(self, line: ProductLine, template: TemplateSet, device: torch.device | str = "cpu",
                 extractor: FeatureExtractor | None = None):
        self.line = line
        self.device = torch.device(device)
        # Pixel-major layers (see pixel_major_); ``to`` returns a new set, so the caller's is not changed, and
        # only layers not already pixel-major are copied.
        self.template = pixel_major_(template.to(self.device))
        self._extractor = extractor

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:  # built lazily: scoring cached features needs no backbone
            self._extractor = FeatureExtractor(self.line.features, self.device)
        return self._extractor

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
        post = self.line.post
        maps = fuse_matches(matches, self.line.features.image_size).to(self.device)
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
