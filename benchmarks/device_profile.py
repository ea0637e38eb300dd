"""Measure a device's inspection costs once and record them in ``hetmm/resources/device_profile.json``.

The tuner turns a line's settings into images per second with these figures (:mod:`hetmm.pipeline.throughput`),
never with timings taken during a search, so a busy machine cannot change what it chooses. Measured here:

* per backbone: seconds per image at 256 x 256 (preprocessing, network, L2 normalisation; batches of 8) and the
  channels of its three layers;
* the matching kernels' effective GFLOP/s per layer geometry (at 256 px) and channel count: window passes of side
  1..11 (``match_layer``) and nearest-patch (``nearest_patch``) on pixel-major templates, as deployed;
* post-processing (fusion, upsampling, blur, image score) per megapixel of map, and per blur-kernel tap.

Times are this process's CPU time over torch's threads, the least of a few repeats, so other jobs inflate them
little; run it niced on an otherwise quiet machine:

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/device_profile.py [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetmm.config import FeatureConfig  # noqa: E402
from hetmm.core.backbones import REGISTRY, ResNetFeatures, build_backbone  # noqa: E402
from hetmm.core.features import FeatureExtractor  # noqa: E402
from hetmm.core.layout import to_pixel_major  # noqa: E402
from hetmm.core.matching import match_layer, nearest_patch  # noqa: E402
from hetmm.core.scoring import LayerMatches, PostPlan, match_plan, post_process  # noqa: E402
from hetmm.io import write_json_atomic  # noqa: E402
from hetmm.pipeline.throughput import PROFILE, STRIDES  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "random_resnet18",
             "resnet50", "wide_resnet50_2")
WINDOWS = (1, 3, 5, 7, 9, 11)
SIDE = 256


def work_seconds(fn, repeats: int = 3, device: torch.device = torch.device("cpu")) -> float:
    """Least CPU time over torch's threads (wall time after a sync on CUDA) of ``fn()``, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        else:
            start = time.process_time()
            fn()
            best = min(best, (time.process_time() - start) / max(1, torch.get_num_threads()))
    return best


def network(name: str, blocks: str):
    """The backbone's network; ResNets are built without their weights file (the cost does not depend on it)."""
    if REGISTRY[name].family == "resnet" and name != "random_resnet18":
        import torchvision

        return ResNetFeatures(getattr(torchvision.models, name)(weights=None), name, preact=True)
    return build_backbone(name, blocks=blocks)


def measure_backbones(device: torch.device) -> dict:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(8)]
    out = {}
    for name in BACKBONES:
        config = FeatureConfig(backbone=name, image_size=(SIDE, SIDE))
        extractor = FeatureExtractor(config, device, backbone=network(name, "last"))
        with torch.no_grad():
            seconds = work_seconds(lambda e=extractor: e(images), device=device) / len(images)
        channels = {"last": list(extractor.backbone.channels)}
        if REGISTRY[name].family == "efficientnet":
            channels["all"] = list(network(name, "all").channels)
        out[name] = {"seconds_per_image": round(seconds, 5), "channels": channels}
        print(f"{name}: {1e3 * seconds:.1f} ms per image at {SIDE} px, channels {channels}", flush=True)
    return out


def _unit(*shape: int, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dim=1).to(device)


def measure_matching(backbones: dict, device: torch.device) -> list[dict]:
    geometries = sorted({(layer, c) for b in backbones.values() for chans in b["channels"].values()
                         for layer, c in zip((1, 2, 3), chans, strict=True)})
    rows = []
    for layer, c in geometries:
        h = w = SIDE // STRIDES[layer]
        for kernel in [*(f"window {k}" for k in WINDOWS), "patch"]:
            patch = kernel == "patch"
            # enough work to time, little enough to stay quick on the widest layers
            queries, sheets = (1, 2) if patch else (4, 8)
            q = _unit(queries, c, h, w, device=device)
            t = to_pixel_major(_unit(sheets, c, h, w, device=device))
            if patch:
                flops = 2.0 * (h * w) ** 2 * c * sheets * queries
                seconds = work_seconds(lambda q=q, t=t: nearest_patch(q, t), repeats=2, device=device)
            else:
                k = int(kernel.split()[1])
                flops = 2.0 * h * w * c * k * k * sheets * queries
                seconds = work_seconds(lambda q=q, t=t, k=k: match_layer(q, t, k, k), repeats=2, device=device)
            rows.append({"layer": layer, "channels": c, "kernel": kernel, "gflops": round(flops / seconds / 1e9, 3)})
        print(f"layer {layer} ({h}x{w}), C={c}: " + ", ".join(f"{r['kernel']} {r['gflops']}" for r in rows[-7:]),
              flush=True)
    return rows


def measure_post(device: torch.device) -> dict:
    plan = match_plan((5, 5, 3), (3, 3, 3), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    batch = 8
    distances = [torch.rand(batch, SIDE // STRIDES[j], SIDE // STRIDES[j], device=device) for j in (1, 2, 3)]
    matches = LayerMatches(distances, distances, plan, batch)
    megapixels = batch * SIDE * SIDE / 1e6
    plain = work_seconds(lambda: post_process(matches, PostPlan((SIDE, SIDE), False, 0.0, None, "max", None)),
                         device=device) / megapixels
    kernel = 33  # sigma 4
    blurred = work_seconds(lambda: post_process(matches, PostPlan((SIDE, SIDE), False, 4.0, kernel, "max", None)),
                           device=device) / megapixels
    return {"seconds_per_megapixel": round(plain, 5),
            "blur_seconds_per_megapixel_tap": round(max(0.0, blurred - plain) / kernel, 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="the profile's name and torch device (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=PROFILE)
    args = parser.parse_args()
    device = torch.device(args.device)
    backbones = measure_backbones(device)
    body = json.loads(args.out.read_text()) if args.out.is_file() else {}
    devices = body.get("devices", {})
    devices[args.device] = {
        "measured": datetime.date.today().isoformat(),
        "command": f"OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/device_profile.py "
                   f"--device {args.device}",
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "backbones": backbones,
        "matching": measure_matching(backbones, device),
        "post": measure_post(device),
    }
    body = {"about": "inspection costs per device, read by hetmm.pipeline.throughput (the throughput contract); "
                     "regenerate a device with its command", "devices": devices}
    write_json_atomic(args.out, body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
