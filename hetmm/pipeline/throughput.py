"""Deterministic inspection cost: how many images per second a line's settings inspect on a measured device.

Contract: :func:`estimate` takes a line and the number of template sheets it deploys and returns an
:class:`Estimate` from the settings alone (no timing, so the machine's load at search time cannot change it):

* backbone: the profile's seconds per image at 256 x 256 for the line's backbone, scaled by the image's pixel
  count (convolutions are linear in it) and doubled by ``flip_average``;
* matching: the exact multiply-add count of the match plan divided by the profile's effective rate of the matching
  kernel for that layer, channel count and kernel: a window pass costs ``2 h w C k^2 S`` FLOP (``k``: the larger of
  the two windows of a mutual layer, one pass gives both directions), nearest-patch ``2 (h w)^2 C S``;
* post-processing: seconds per megapixel of the map, plus per blur-kernel tap.

The device profile (:data:`PROFILE`, ``hetmm/resources/device_profile.json``) is measured once per device with the
command it records (``benchmarks/device_profile.py``). The tune stage holds every candidate to
``inspection.min_images_per_second`` with this estimate; the infer stage measures the deployed model and reports
both (:mod:`hetmm.pipeline.speed`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hetmm.config import ProductLine
from hetmm.errors import ConfigError
from hetmm.modes import TemplateKind

PROFILE = Path(__file__).resolve().parents[1] / "resources" / "device_profile.json"
REFERENCE_PIXELS = 256 * 256  # the profile's backbone figures are per image at 256 x 256
STRIDES = {1: 4, 2: 8, 3: 16}


@dataclass(frozen=True)
class Estimate:
    backbone_s: float
    matching_s: float
    post_s: float
    device: str

    @property
    def seconds(self) -> float:
        return self.backbone_s + self.matching_s + self.post_s

    @property
    def images_per_second(self) -> float:
        return 1.0 / self.seconds

    def record(self) -> dict[str, Any]:
        return {"images_per_second": round(self.images_per_second, 2), "device": self.device,
                "ms_per_image": {"backbone": round(1e3 * self.backbone_s, 2),
                                 "matching": round(1e3 * self.matching_s, 2), "post": round(1e3 * self.post_s, 2)}}


@cache
def _profiles(path: Path = PROFILE) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())["devices"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: cannot read the device profile ({exc}); measure it again with "
                          "`nice .venv/bin/python benchmarks/device_profile.py`") from exc


def profile(device: str) -> dict[str, Any]:
    """The measured profile of ``device`` (``inspection.device``)."""
    profiles = _profiles()
    if device not in profiles:
        raise ConfigError(f"inspection.device: {device!r} has no measured profile in {PROFILE} (measured: "
                          f"{', '.join(sorted(profiles))}); measure it on that device with "
                          f"`benchmarks/device_profile.py --device {device}` or choose a measured one")
    return profiles[device]


def deployed_sheets(line: ProductLine, train_images: int) -> int:
    """Template sheets the line matches against once deployed with ``train_images`` good images."""
    t = line.templates
    return train_images if t.kind == TemplateKind.ALL else min(train_images, t.size)


def _rate(rows: list[dict], layer: int, channels: int, kernel: str, device: str) -> float:
    """Effective GFLOP/s of ``kernel`` ("window k" or "patch") measured at ``layer`` with the nearest channel
    count; a window larger than any measured uses the largest measured one (wide bands run at least as fast)."""
    def side(row: dict) -> int:
        return int(row["kernel"].split()[1]) if row["kernel"].startswith("window") else 0

    same = [r for r in rows if r["layer"] == layer and (r["kernel"] == "patch") == (kernel == "patch")]
    if not same:
        raise ConfigError(f"{PROFILE}: device {device!r} has no matching rate for layer {layer}; measure it again")
    if kernel != "patch":
        k = int(kernel.split()[1])
        sides = sorted({side(r) for r in same})
        k = k if k in sides else max([s for s in sides if s <= k] or [sides[0]])
        same = [r for r in same if side(r) == k]
    best = min(same, key=lambda r: abs(math.log(r["channels"] / channels)))
    return best["gflops"] * 1e9


def _backbone(prof: dict, line: ProductLine, device: str) -> dict:
    from hetmm.core.backbones import REGISTRY  # torch: only when an estimate is made

    f = line.features
    if f.backbone not in REGISTRY:  # a typo, not a missing measurement (build_backbone says the same)
        raise ConfigError(f"features.backbone: unknown backbone {f.backbone!r}; choose one of {', '.join(REGISTRY)}")
    if f.backbone not in prof["backbones"]:
        raise ConfigError(f"features.backbone: {f.backbone!r} has no measured cost on device {device!r} in {PROFILE}; "
                          f"measure it with `benchmarks/device_profile.py --device {device}`")
    return prof["backbones"][f.backbone]


def estimate(line: ProductLine, sheets: int, device: str | None = None) -> Estimate:
    """Seconds per image of ``line`` matched against ``sheets`` template sheets (see the module docstring)."""
    from hetmm.core.scoring import match_plan  # torch: not when the tune stage only computes its key

    device = device or line.inspection.device
    prof = profile(device)
    f, m, p = line.features, line.matching, line.post
    height, width = f.image_size
    pixels = height * width
    backbone = _backbone(prof, line, device)
    channels = backbone["channels"][f.blocks]
    backbone_s = backbone["seconds_per_image"] * pixels / REFERENCE_PIXELS * (2 if f.flip_average else 1)
    matching_s = 0.0
    for step in match_plan(m.forward_windows, m.backward_windows, m.alphas, m.weights, m.mode):
        layer = f.layers[step.layer]
        stride = STRIDES[layer]
        h, w, c = height // stride, width // stride, channels[layer - 1]
        if step.patch:
            flops, kernel = 2.0 * (h * w) ** 2 * c * sheets, "patch"
        else:
            reach = max(h, w) - 1
            half = max(min(k // 2, reach) for k in (step.forward_window, step.backward_window) if k)
            side = 2 * half + 1
            flops, kernel = 2.0 * h * w * c * side * side * sheets, f"window {side}"
        matching_s += flops / _rate(prof["matching"], layer, c, kernel, device)
    post = prof["post"]
    taps = (p.blur_kernel or 2 * math.ceil(4 * p.blur_sigma) + 1) if p.blur_sigma > 0 else 0
    post_s = pixels / 1e6 * (post["seconds_per_megapixel"] + taps * post["blur_seconds_per_megapixel_tap"])
    return Estimate(backbone_s, matching_s, post_s, device)
