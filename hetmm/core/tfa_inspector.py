"""TFA-Net's scorer: a trained network and its template image's features, behind :class:`~hetmm.core.inspector.Scorer`.

``match`` gives the reconstruction error on the feature grid ``[B, G, G]``; ``finish`` resizes it to the image and
shares HETMM's post-processing, so thresholds, overlays and ``predict`` treat both methods alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hetmm.config import ProductLine
from hetmm.core.features import FeatureExtractor
from hetmm.core.inspector import Scored, Scorer
from hetmm.core.tfa_net import TFANet, error_maps, to_grid


class TFAInspector(Scorer):
    """``net`` (eval mode) and the template's grid features ``[1, C, G, G]`` on one device."""

    def __init__(self, line: ProductLine, net: TFANet, template: torch.Tensor, version: str,
                 device: torch.device | str = "cpu", extractor: FeatureExtractor | None = None):
        super().__init__(line, device, extractor)
        self.net = net.to(self.device).eval()
        self.template = template.to(self.device, torch.float32)
        self._version = version

    @property
    def version(self) -> str:
        return self._version

    @property
    def sheets(self) -> int:
        return 1

    @torch.no_grad()
    def match(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer features ``[B, C_j, H_j, W_j]`` -> reconstruction error ``[B, G, G]``."""
        query = to_grid([f.to(self.device) for f in features], self.net.shape.grid)
        return error_maps(self.net(query, self.template), query, self.line.tfa_net.cos_weight)

    @torch.no_grad()
    def finish(self, raw: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]] | None = None) -> Scored:
        maps = F.interpolate(raw[:, None].float(), size=self.line.features.image_size, mode="bilinear",
                             align_corners=False)[:, 0]
        return self.post_process(maps, boxes)
