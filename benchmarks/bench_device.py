"""End-to-end inference throughput on the best device here (CUDA when present, else CPU).

Times ``Inspector.predict`` (preprocess + backbone + matching + fusion + blur + score) and the backbone alone,
with EfficientNet-Lite0 at 256 px and a 60-sheet template, for several batch sizes. Template values do not
change the cost, so the 60 sheets are the features of real images repeated.

    python benchmarks/bench_device.py [--images DIR] [--out benchmarks/results/device_<cuda|cpu>.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from hetmm.config import FeatureConfig, MatchingConfig, PostConfig, ProductLine, TemplateConfig
from hetmm.core.device import resolve_device
from hetmm.core.features import FeatureExtractor
from hetmm.core.inspector import Inspector
from hetmm.core.templates import build_all

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, count: int) -> list[Image.Image]:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".png"} and "ground_truth" not in p.parts
    )
    if not files:
        raise SystemExit(f"no images under {folder}")
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(count)]


def _rate(fn, images: list[Image.Image], batch: int, device: torch.device, repeats: int) -> float:
    def once():
        for start in range(0, len(images), batch):
            fn(images[start : start + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return len(images) / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "hazelnut_toy")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--sheets", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = resolve_device("auto")
    line = ProductLine(
        name="bench",
        features=FeatureConfig(backbone="efficientnet_lite0", image_size=(256, 256)),
        templates=TemplateConfig(kind="ALL"),
        matching=MatchingConfig(forward_windows=(5, 5, 3), backward_windows=(3, 3, 3)),
        post=PostConfig(blur_sigma=4.0),
    )
    extractor = FeatureExtractor(line.features, device)
    images = _images(args.images, args.count)
    feats = extractor(images[: args.sheets])
    reps = -(-args.sheets // feats[0].shape[0])
    layers = [f.repeat(reps, 1, 1, 1)[: args.sheets].cpu() for f in feats]
    template = build_all(layers, [f"s{i}" for i in range(args.sheets)], line.features.fingerprint())
    inspector = Inspector(line, template, device, extractor)

    rows = []
    for batch in (1, 8, 32):
        backbone = _rate(extractor, images, batch, device, args.repeats)
        full = _rate(inspector.predict, images, batch, device, args.repeats)
        rows.append({"batch": batch, "backbone_img_s": round(backbone, 1), "end_to_end_img_s": round(full, 1),
                     "time_share_outside_backbone": round(1 - full / backbone, 3)})
        print(f"batch {batch:>2}: backbone {backbone:7.1f} img/s   end to end {full:7.1f} img/s")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    result = {"device": name, "torch": torch.__version__, "sheets": args.sheets, "image_size": 256,
              "backbone": "efficientnet_lite0", "windows": "fwd 5/5/3, bwd 3/3/3", "rows": rows}
    out = args.out or ROOT / "benchmarks" / "results" / f"device_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
