#!/usr/bin/env python
"""Second round on the MTD dev half (issue 5): does anything move the frozen profile off its plateau?

Same protocol as ``mtd_sweep.py`` (templates = ``train`` stems, scores on ``dev`` only; the holdout is
never opened). For each feature setting the frozen combo (layers 2-3, windows 5/3 and 3/3, alpha 0.5,
lambda 1) is fused *unblurred* at 320x320 and kept; the variants are then cheap:

- the blur's border handling: zero padding (official), renormalised (blur / blur of ones), replicate, reflect;
- score-level ensembles: the mean of the unblurred maps of several settings (raw or each divided by its mean),
  e.g. Lite0 + Lite1 + Lite2, or Lite1 at 256 + 320 + 384;
- template augmentation: the template feature maps plus their vertical, horizontal and double mirrors.

Runs on CPU in about 15 minutes (2 cores). Usage::

    python research/mtd_plateau.py --data /work/shared/data/mtd --out research/results/6_plateau.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mtd_sweep as S  # noqa: E402

from hetmm.core.device import resolve_device  # noqa: E402
from hetmm.core.metrics import image_auroc, pixel_auroc  # noqa: E402
from hetmm.core.scoring import gaussian_blur  # noqa: E402

SIZE = 320
FROZEN = S.Combo(layers=(2, 3), kf=(5, 3), kb=(3, 3), alphas=(0.5, 0.5), weights=(1.0, 1.0), sigma=0.0)
BASE = dict(backbone="efficientnet_lite1", image_size=320, normalisation="image", blocks="last", pool=3,
            flip_average=True)
SETTINGS = {
    "lite1": {},
    "lite0": {"backbone": "efficientnet_lite0"},
    "lite2": {"backbone": "efficientnet_lite2"},
    "lite1_256": {"image_size": 256},
    "lite1_384": {"image_size": 384},
}
ENSEMBLES = [("lite1", "lite0"), ("lite1", "lite2"), ("lite0", "lite1", "lite2"),
             ("lite1", "lite1_256"), ("lite1_256", "lite1_384"), ("lite1", "lite1_256", "lite1_384"),
             ("lite1", "lite1_aug")]


def blur(maps: torch.Tensor, sigma: float, border: str) -> torch.Tensor:
    """[B, H, W] ``hetmm.core.scoring.gaussian_blur`` (kernel 2*ceil(4σ)+1) with another border handling:
    ``border``: zero (the official zero padding) | renormalised | replicate | reflect."""
    if border == "zero":
        return gaussian_blur(maps, sigma)
    if border == "renormalised":
        return gaussian_blur(maps, sigma) / gaussian_blur(torch.ones_like(maps[:1]), sigma)
    half = math.ceil(4 * sigma)
    padded = F.pad(maps[:, None], (half,) * 4, mode=border)[:, 0]
    return gaussian_blur(padded, sigma)[:, half:-half, half:-half]


def unblurred_maps(data: S.Data, name: str, device: torch.device, weights: str | None,
                   augment: bool = False) -> dict[str, torch.Tensor]:
    """Frozen-combo maps [B, SIZE, SIZE] of one setting; with ``augment`` also ``<name>_aug``, matched
    against the templates plus their mirrors."""
    cfg = S.feature_cfg(**{**BASE, **SETTINGS[name]})
    train = S.extract(data.train, cfg, device, weights)
    dev = S.extract(data.dev, cfg, device, weights)
    variants = {name: train}
    if augment:
        variants[f"{name}_aug"] = [torch.cat([t, t.flip(-2), t.flip(-1), t.flip(-1, -2)]) for t in train]
    out = {}
    for key, templates in variants.items():
        maps = S.fuse(S.match_all(dev, templates, layers=(2, 3), d={2: 2, 3: 1}), FROZEN, cfg.image_size)
        if cfg.image_size != (SIZE, SIZE):
            maps = F.interpolate(maps[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
        out[key] = maps
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/mtd")
    ap.add_argument("--out", default="research/results/6_plateau.json")
    ap.add_argument("--weights", default=None, help="directory of trimmed Lite weights (mtd_sweep --export-weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit-train", type=int, default=None, help="random subset of the templates (smoke runs)")
    ap.add_argument("--limit-dev", type=int, default=None, help="random subset of the dev images (smoke runs)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    data = S.load_data(args.data, args.limit_train, args.limit_dev)
    masks = S.masks_at(data, (SIZE, SIZE)).to(device)
    # the two near-identical pictures of one tile that hold most of the frozen profile's dev error
    hard = [i for i, stem in enumerate(data.stems) if stem in ("exp3_num_853", "exp0_num_797")]
    good = torch.from_numpy(~data.labels)
    rows = []

    def record(variant: str, maps: torch.Tensor) -> None:
        scores = maps.flatten(1).amax(1).cpu()
        row = {"variant": variant, "image_auroc": image_auroc(scores, data.labels),
               "pixel_auroc": pixel_auroc(maps, masks),
               "good_images_above_hard_pair": [int((scores[good] >= scores[i]).sum()) for i in hard]}
        rows.append(row)
        S.log(f"{variant:42s} image {row['image_auroc']:.2f} pixel {row['pixel_auroc']:.2f} "
              f"good >= hard pair {row['good_images_above_hard_pair']}")

    raw = {}
    for name in SETTINGS:
        for key, maps in unblurred_maps(data, name, device, args.weights, augment=name == "lite1").items():
            raw[key] = maps
            record(f"{key}, zero-padded blur", blur(maps, 4.0, "zero"))
    for border in ("renormalised", "replicate", "reflect"):
        record(f"lite1, {border} blur", blur(raw["lite1"], 4.0, border))
    for names in ENSEMBLES:
        record(" + ".join(names) + ", mean of maps", blur(sum(raw[n] for n in names) / len(names), 4.0, "zero"))
        record(" + ".join(names) + ", mean of scaled maps",
               blur(sum(raw[n] / raw[n].mean() for n in names) / len(names), 4.0, "zero"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "n_train": len(data.train), "n_dev": len(data.dev),
                               "rows": rows, "seconds": round(time.time() - S.T0, 1)}, indent=1))


if __name__ == "__main__":
    main()
