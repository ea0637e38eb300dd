"""TFA-Net (Template-based Feature Aggregation Network, EAAI 2024), the trained neighbour of HETMM.

A transformer reads the tokens ``[cls, query patches, template patches]`` of a query's and one fixed template
image's backbone features; a decoder reads the *template* tokens' outputs only and predicts the query's features
patch by patch. Normal content is aggregated onto the template and reconstructed; a defect, unlike anything in the
template, is not, and the reconstruction error is the anomaly map. Tensors in, tensors out: no I/O, no training loop
(:mod:`hetmm.pipeline.tfa_training` trains it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NetShape:
    """The network's size: encoder and decoder width/depth/heads, patch side and the feature grid it reads."""

    channels: int  # concatenated backbone channels
    grid: int  # side of the common feature grid (tokens per image: (grid / patch) ** 2)
    patch: int = 4
    width: int = 192
    depth: int = 4
    heads: int = 4
    decoder_width: int = 128
    decoder_depth: int = 2


def to_grid(layers: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
    """Per-layer features ``[B, C_j, H_j, W_j]`` -> one map ``[B, sum C_j, grid, grid]`` (bilinear resize, concat)."""
    out = [f.float() if f.shape[-2:] == (grid, grid) else
           F.interpolate(f.float(), size=(grid, grid), mode="bilinear", align_corners=False) for f in layers]
    return torch.cat(out, dim=1)


def medoid(grids: torch.Tensor, pool: int = 8) -> int:
    """Index of the image ``[N, C, G, G]`` with the least summed distance to the others (on ``pool`` x ``pool``
    averaged features, so the choice costs a small ``N x N`` distance matrix)."""
    small = F.adaptive_avg_pool2d(grids.float(), pool).flatten(1)
    return int(torch.cdist(small, small).sum(dim=1).argmin())


def _blocks(width: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class TFANet(nn.Module):
    """``forward(query [B, C, G, G], template [1 | B, C, G, G]) -> reconstruction [B, C, G, G]``."""

    def __init__(self, shape: NetShape):
        super().__init__()
        if shape.grid % shape.patch:
            raise ValueError(f"the feature grid ({shape.grid}) is not a multiple of the patch ({shape.patch})")
        self.shape = shape
        side = shape.grid // shape.patch
        self.tokens = side * side
        self.embed = nn.Conv2d(shape.channels, shape.width, shape.patch, stride=shape.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, shape.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, shape.width))
        self.position = nn.Parameter(torch.randn(1, 1 + 2 * self.tokens, shape.width) * 0.02)
        self.encoder = _blocks(shape.width, shape.depth, shape.heads)
        self.norm = nn.LayerNorm(shape.width)
        self.bridge = nn.Linear(shape.width, shape.decoder_width)
        self.decoder_position = nn.Parameter(torch.randn(1, self.tokens, shape.decoder_width) * 0.02)
        self.decoder = _blocks(shape.decoder_width, shape.decoder_depth, max(1, shape.heads * shape.decoder_width
                                                                             // shape.width))
        self.head = nn.Sequential(nn.LayerNorm(shape.decoder_width),
                                  nn.Linear(shape.decoder_width, shape.patch * shape.patch * shape.channels))

    def _tokens(self, grids: torch.Tensor) -> torch.Tensor:
        return self.embed(grids).flatten(2).transpose(1, 2)  # [B, T, width]

    def forward(self, query: torch.Tensor, template: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` ``[B, T]`` (bool): query tokens replaced by the learned mask token (training regulariser: the
        network must reconstruct them from the template, never by copying the query)."""
        batch = query.shape[0]
        q = self._tokens(query)
        if mask is not None:
            q = torch.where(mask[..., None], self.mask_token.expand_as(q), q)
        t = self._tokens(template).expand(batch, -1, -1)
        x = torch.cat([self.cls.expand(batch, -1, -1), q, t], dim=1) + self.position
        x = self.norm(self.encoder(x))[:, 1 + self.tokens:]  # the template tokens' outputs only
        x = self.decoder(self.bridge(x) + self.decoder_position)
        p, side, c = self.shape.patch, self.shape.grid // self.shape.patch, self.shape.channels
        x = self.head(x).view(batch, side, side, c, p, p)  # per token: its patch's features
        return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, c, side * p, side * p)


def random_mask(batch: int, tokens: int, ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``[B, T]`` bool with ``round(ratio * T)`` True per row at random positions (None when ``ratio`` is 0)."""
    count = round(ratio * tokens)
    if count == 0:
        return None
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return (order < count).to(device)


def error_maps(prediction: torch.Tensor, query: torch.Tensor, cos_weight: float) -> torch.Tensor:
    """Per-pixel ``cos_weight * (1 - cosine) + MSE`` between ``[B, C, G, G]`` tensors -> ``[B, G, G]``."""
    cosine = F.cosine_similarity(prediction, query, dim=1)
    return cos_weight * (1.0 - cosine) + (prediction - query).pow(2).mean(dim=1)


def loss(prediction: torch.Tensor, query: torch.Tensor, cos_weight: float) -> torch.Tensor:
    """The training loss: the mean of :func:`error_maps` (the published ``5 * (1 - cos) + MSE``)."""
    return error_maps(prediction, query, cos_weight).mean()
