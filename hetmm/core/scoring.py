"""Layer fusion, Gaussian blur and image-score rules (official semantics), and the scoring entry.

:func:`match_layers` and :func:`fuse_matches` are the model maths that inference calls: per layer the
query features are matched against the templates (:mod:`hetmm.core.matching`), then the distance maps are fused::

    S = Σ_j λ_j · Up(α_j · F_j + (1 - α_j) · B_j)      Up = bilinear, align_corners=True

:func:`post_process` is the one recipe after matching (fuse -> geometry -> blur -> image score) that every scorer,
the tuner and calibration run. Settings are plain numbers and lists (:class:`PostPlan`), so scoring does not depend
on configuration classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hetmm.core.matching import match_layer, match_layer_pair, nearest_patch
from hetmm.modes import MatchMode

RULES = ("max", "block_mean")
Box = tuple[int, int, int, int]  # (top, left, height, width) of an image's content on the model canvas


def fuse_layers(
    forward: Sequence[torch.Tensor | None],
    backward: Sequence[torch.Tensor | None],
    alphas: Sequence[float],
    weights: Sequence[float],
    out_size: tuple[int, int] | int,
) -> torch.Tensor:
    """Mix forward/backward maps per layer, upsample and take the weighted sum over layers.

    Args:
        forward: per layer [B, h_j, w_j] forward distances, or None when that direction is off
            (then its alpha must be 0).
        backward: per layer [B, h_j, w_j] backward distances, or None (then its alpha must be 1).
        alphas: per layer weight of the forward map.
        weights: per layer weight λ_j; the layers are summed, not averaged.
        out_size: (H, W) of the output, or one int for a square.

    Returns:
        [B, H, W] float32 ``Σ_j λ_j · Up(α_j · F_j + (1 - α_j) · B_j)``.
    """
    n = len(forward)
    if not (len(backward) == len(alphas) == len(weights) == n) or n == 0:
        raise ValueError(
            f"need one forward map, backward map, alpha and weight per layer, got "
            f"{n}, {len(backward)}, {len(alphas)}, {len(weights)}"
        )
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    total: torch.Tensor | None = None
    for j, (fwd, bwd, alpha, weight) in enumerate(zip(forward, backward, alphas, weights)):
        if fwd is None and bwd is None:
            raise ValueError(f"layer {j}: both the forward and the backward map are missing")
        if fwd is None and alpha != 0:
            raise ValueError(f"layer {j}: the forward map is off, so alpha must be 0, got {alpha}")
        if bwd is None and alpha != 1:
            raise ValueError(f"layer {j}: the backward map is off, so alpha must be 1, got {alpha}")
        if fwd is None:
            mixed = bwd
        elif bwd is None:
            mixed = fwd
        else:
            mixed = alpha * fwd + (1.0 - alpha) * bwd
        # Bilinear upsampling is linear, so mixing before it equals mixing the upsampled maps.
        up = F.interpolate(
            mixed.float().unsqueeze(1), size=size, mode="bilinear", align_corners=True
        ).squeeze(1)
        total = weight * up if total is None else total + weight * up
    return total


def gaussian_blur(
    maps: torch.Tensor, sigma: float, kernel_size: int | None = None
) -> torch.Tensor:
    """Official post-processing blur: sum-normalised K×K Gaussian, zero padding K//2.

    The 2-D kernel is the outer product of the normalised 1-D kernel, so two 1-D passes give the
    same result in O(K) instead of O(K²) per pixel. Zero padding lowers scores near the border,
    as in the official code.

    Args:
        maps: [B, H, W].
        sigma: standard deviation in pixels; <= 0 returns ``maps`` unchanged.
        kernel_size: odd K; None uses 2·ceil(4σ)+1.

    Returns:
        [B, H, W], same dtype and device.
    """
    if sigma <= 0:
        return maps
    k = 2 * math.ceil(4 * sigma) + 1 if kernel_size is None else kernel_size
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {k}")
    x = torch.arange(k, dtype=torch.float64, device=maps.device) - k // 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = (g / g.sum()).to(maps.dtype)
    out = F.conv2d(maps.unsqueeze(1), g.view(1, 1, 1, k), padding=(0, k // 2))
    out = F.conv2d(out, g.view(1, 1, k, 1), padding=(k // 2, 0))
    return out.squeeze(1)


def image_scores(maps: torch.Tensor, rule: str, block: int | None = None) -> torch.Tensor:
    """Image-level anomaly score from each map.

    Args:
        maps: [B, H, W].
        rule: ``"max"`` (max of the map) or ``"block_mean"`` (official ``mp_k``: max over
            non-overlapping ``block``×``block`` cells, bottom/right remainder dropped, then the
            mean of the cell maxima).
        block: cell size for ``"block_mean"``.

    Returns:
        [B].
    """
    if rule == "max":
        return maps.flatten(1).amax(1)
    if rule == "block_mean":
        if block is None or block < 1:
            raise ValueError(f"rule 'block_mean' needs a block size >= 1, got {block}")
        if block > min(maps.shape[-2:]):
            raise ValueError(f"block {block} is larger than the map {tuple(maps.shape[-2:])}")
        cells = F.max_pool2d(maps.unsqueeze(1), block, stride=block)
        return cells.flatten(1).mean(1)
    raise ValueError(f"unknown image score rule {rule!r}; use one of {RULES}")


class LayerPlan(NamedTuple):
    """What :func:`match_layers` computes for one layer of non-zero weight; a window of 0 = direction not computed."""

    layer: int  # index j into the feature layers
    forward_window: int
    backward_window: int
    patch: bool  # nearest template vector anywhere instead of windows
    alpha: float  # weight of the forward map
    weight: float  # layer weight in the fused sum

    @property
    def geometry(self) -> tuple[int, int, int, bool]:
        """What the distances depend on (alpha and weight only enter the fusion)."""
        return self.layer, self.forward_window, self.backward_window, self.patch


@dataclass
class LayerMatches:
    """Matching distances of a query batch, per planned layer, before fusion.

    ``forward[i]`` / ``backward[i]``: [B, h_j, w_j] float32 distances of ``plan[i]`` (None for a direction not
    computed); ``batch``: B (the maps' batch size even when no layer is computed).

    Every distance is a minimum over the template sheets, so the matches of one batch against two disjoint
    sheet sets combine exactly by :meth:`merged` (what lets an ALL template grow without re-matching).
    """

    forward: list[torch.Tensor | None]
    backward: list[torch.Tensor | None]
    plan: list[LayerPlan]
    batch: int

    def merged(self, other: "LayerMatches") -> "LayerMatches":
        """Elementwise minimum with ``other``, matched with the same plan against other sheets."""
        if [p.geometry for p in other.plan] != [p.geometry for p in self.plan]:
            raise ValueError(f"cannot merge matches of different plans: {self.plan} and {other.plan}")

        def low(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.minimum(a, b.to(a.device))

        return LayerMatches([low(a, b) for a, b in zip(self.forward, other.forward)],
                            [low(a, b) for a, b in zip(self.backward, other.backward)], list(self.plan), self.batch)


def match_plan(
    forward_windows: Sequence[int],
    backward_windows: Sequence[int],
    alphas: Sequence[float],
    weights: Sequence[float],
    mode: MatchMode | str = MatchMode.MUTUAL,
) -> list[LayerPlan]:
    """What :func:`match_layers` computes: one :class:`LayerPlan` per layer of non-zero weight.

    Modes (:class:`~hetmm.modes.MatchMode`, the paper's Table 8 ablation):
        ``mutual``: forward and backward windows as given, mixed by alpha.
        ``forward``: forward only (alpha 1; the backward window is ignored).
        ``backward``: backward only (alpha 0; the forward window is ignored).
        ``pixel``: both windows 1 (position-aligned), mixed by the given alphas.
        ``patch``: PatchCore-like nearest template vector anywhere, as the forward map (alpha 1).
    """
    n = len(weights)
    lengths = (len(forward_windows), len(backward_windows), len(alphas))
    if n == 0 or any(length != n for length in lengths):
        raise ValueError(f"need windows, alphas and weights for each of the {n} layers, got {lengths}")
    try:
        mode = MatchMode(mode)
    except ValueError:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {', '.join(MatchMode)}") from None
    fixed_alpha = {MatchMode.FORWARD: 1.0, MatchMode.BACKWARD: 0.0, MatchMode.PATCH: 1.0}
    plan = []
    for j in range(n):
        if weights[j] == 0:
            continue
        alpha = fixed_alpha.get(mode, alphas[j])
        k_f, k_b = (1, 1) if mode in (MatchMode.PIXEL, MatchMode.PATCH) else (forward_windows[j], backward_windows[j])
        plan.append(LayerPlan(j, k_f if alpha != 0 else 0, k_b if alpha != 1 else 0, mode == MatchMode.PATCH,
                              float(alpha), float(weights[j])))
    return plan


def _check_layers(features: Sequence[torch.Tensor], templates: Sequence[torch.Tensor], weights: Sequence[float]):
    if not (len(features) == len(templates) == len(weights)):
        raise ValueError(f"need templates and settings for each of the {len(features)} layers, got "
                         f"{len(templates)} templates and {len(weights)} weights")


def match_layers(
    features: Sequence[torch.Tensor],
    templates: Sequence[torch.Tensor],
    forward_windows: Sequence[int],
    backward_windows: Sequence[int],
    alphas: Sequence[float],
    weights: Sequence[float],
    mode: MatchMode | str = MatchMode.MUTUAL,
    chunk: int | None = None,
    exclude: torch.Tensor | None = None,
) -> LayerMatches:
    """Match every layer of non-zero weight (see :func:`match_plan` for the modes).

    Args:
        features: per layer [B, C_j, h_j, w_j], L2-normalised over C.
        templates: per layer [N_j, C_j, h_j, w_j], L2-normalised over C.
        forward_windows, backward_windows, alphas, weights: per layer settings.
        chunk: template pixels per matmul step (see :func:`hetmm.core.matching.match_layer`).
        exclude: [B] int, the sheet left out of query ``i``'s minima (-1: none; windowed modes only).

    Returns:
        :class:`LayerMatches` with [B, h_j, w_j] distances.
    """
    _check_layers(features, templates, weights)
    out = LayerMatches([], [], [], features[0].shape[0])
    for step in match_plan(forward_windows, backward_windows, alphas, weights, mode):
        j = step.layer
        if step.patch:
            if exclude is not None:
                raise ValueError("leaving sheets out is implemented for windowed matching only, not mode 'patch'")
            fwd, bwd = nearest_patch(features[j], templates[j], chunk=chunk), None
        else:
            fwd, bwd = match_layer(features[j], templates[j], step.forward_window, step.backward_window, chunk=chunk,
                                   exclude=exclude)
        out.forward.append(fwd)
        out.backward.append(bwd)
        out.plan.append(step)
    return out


def match_layers_pair(
    features: Sequence[torch.Tensor],
    templates: Sequence[torch.Tensor],
    forward_windows: Sequence[int],
    backward_windows: Sequence[int],
    alphas: Sequence[float],
    weights: Sequence[float],
    mode: MatchMode | str = MatchMode.MUTUAL,
    chunk: int | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[LayerMatches, LayerMatches]:
    """:func:`match_layers` of the queries against the templates and of the templates against the queries (the
    query batch as the sheets), from one product per layer (:func:`hetmm.core.matching.match_layer_pair`).

    Args: as :func:`match_layers`; features and templates must have the same grid per layer. Windowed modes only.

    Returns:
        (:class:`LayerMatches` [B, h_j, w_j], :class:`LayerMatches` [N_j, h_j, w_j]).
    """
    _check_layers(features, templates, weights)
    out = LayerMatches([], [], [], features[0].shape[0])
    swapped = LayerMatches([], [], [], templates[0].shape[0])
    for step in match_plan(forward_windows, backward_windows, alphas, weights, mode):
        if step.patch:
            raise ValueError("both directions from one product are implemented for windowed matching only, "
                             "not mode 'patch'")
        j = step.layer
        mine, theirs = match_layer_pair(features[j], templates[j], step.forward_window, step.backward_window,
                                        chunk=chunk, exclude=exclude)
        for matches, (fwd, bwd) in ((out, mine), (swapped, theirs)):
            matches.forward.append(fwd)
            matches.backward.append(bwd)
            matches.plan.append(step)
    return out, swapped


def fuse_matches(matches: LayerMatches, out_size: tuple[int, int] | int) -> torch.Tensor:
    """[B, H, W] float32 anomaly maps from :class:`LayerMatches` (zeros when every layer weight is 0)."""
    if not matches.plan:
        size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        return torch.zeros(matches.batch, *size)
    return fuse_layers(matches.forward, matches.backward, [p.alpha for p in matches.plan],
                       [p.weight for p in matches.plan], out_size)


def restore_geometry(maps: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
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


class PostPlan(NamedTuple):
    """Everything after matching, as plain values."""

    size: tuple[int, int]  # (H, W) of the maps: the model's input size
    pad: bool  # images were letterboxed (``resize: pad``): crop the maps to their content boxes
    blur_sigma: float  # 0 = no blur
    blur_kernel: int | None
    rule: str  # image score rule (:data:`RULES`)
    block: int | None


def post_process(maps: torch.Tensor | LayerMatches, plan: PostPlan, boxes: Sequence[Box] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps ``[B, H, W]`` at ``plan.size`` (or :class:`LayerMatches`, fused first) -> post-processed maps
    ``[B, H, W]`` float32 and image scores ``[B]``: geometry restored (pad, with ``boxes``), blurred, scored."""
    if isinstance(maps, LayerMatches):
        maps = fuse_matches(maps, plan.size)
    if boxes is not None and plan.pad:
        maps = restore_geometry(maps, boxes)
    if plan.blur_sigma > 0:
        maps = gaussian_blur(maps, plan.blur_sigma, plan.blur_kernel)
    return maps, image_scores(maps, plan.rule, plan.block)
