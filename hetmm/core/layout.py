"""Memory layout of feature stacks and templates: the one place that knows about pixel-major storage.

Matching and template building read a layer ``[N, C, H, W]`` as per-pixel ``[N, C]`` rows. Stored *pixel-major*
(memory ordered ``(H, W, N, C)``), those rows are views, so nothing re-lays a whole layer out on the hot path.
"""

from __future__ import annotations

from collections.abc import MutableSequence

import torch


def to_pixel_major(layer: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> the same values and shape, memory ordered (H, W, N, C); no copy if already so."""
    if is_pixel_major(layer):
        return layer
    return layer.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)


def is_pixel_major(layer: torch.Tensor) -> bool:
    """True when ``layer`` ``[N, C, H, W]`` is held so that per-pixel ``[N, C]`` rows are views."""
    return layer.permute(2, 3, 0, 1).is_contiguous()


def pixel_rows(layer: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[H*W, N, C]``; a view for pixel-major, NCHW-contiguous or channels-last memory."""
    return layer.permute(2, 3, 0, 1).flatten(0, 1)


def empty_stack(n: int, entry: torch.Tensor, pixel_major: bool) -> torch.Tensor:
    """Uninitialised ``[n, C, H, W]`` to hold ``n`` entries like ``entry`` ``[C, H, W]``, NCHW or pixel-major."""
    c, h, w = entry.shape
    if pixel_major:
        return torch.empty((h, w, n, c), dtype=entry.dtype).permute(2, 3, 0, 1)
    return torch.empty((n, c, h, w), dtype=entry.dtype)


def pixel_major_(layers: MutableSequence[torch.Tensor]) -> MutableSequence[torch.Tensor]:
    """Re-lay ``layers`` out pixel-major in place, one layer at a time, and return the same list.

    One layer at a time keeps the peak at the layers plus the largest one, instead of two copies of all.
    """
    for j, layer in enumerate(layers):
        layers[j] = to_pixel_major(layer)
    return layers
