#!/usr/bin/env python
"""MTD dev-split exploration for HETMM with offline EfficientNet-Lite backbones (issue 5).

Runs on CPU or CUDA. It only ever reads the ``train`` stems (templates) and the ``dev`` half of the
committed split (``hetmm.data.splits.load_mtd_split``); the ``holdout`` half is never opened.

Why a separate script and not the pipeline: a sweep over hundreds of matching settings must not
re-match for every setting. For each feature setting and template set we compute, once per layer,
the *offset table*

    M_δ(a) = max_n <Q(a), T_n(a+δ)>    for every offset δ with |δ|∞ <= D   (-inf outside the grid)

from which every window size k <= 2D+1 follows by max-reductions (spec §4.5):

    forward  F_k(p) = max_{δ∈W_k} M_δ(p)          backward B_k(p) = max_{δ∈W_k} M_δ(p-δ)

Everything after the offset table is the package's code: the matching modes (``match_plan``), layer
fusion (``fuse_layers``), blur (``gaussian_blur``) and image scores (``image_scores``) from
``hetmm.core.scoring``, ``resize: pad`` geometry from ``hetmm.core.scoring.post_process``, image
AUROC and AU-PRO from ``hetmm.core.metrics``, images and masks read by ``hetmm.data.images``; masks are
resized bilinearly to the model resolution and thresholded at 0.5, as in ``hetmm.pipeline.evaluation``.
Pixel AUROC is the one metric computed here, on the maps' device (see :func:`device_auroc`).

PTS on the device is an *approximation* (``pts_approx``): per pixel, the global medoid, then the
official hard-normal greedy step (argmin of summed cosine to the selected set). The real PTS
(OPTICS clusters first) comes from ``hetmm.core.templates``.

Usage (see research/README.md for the plans and the results)::

    python research/mtd_sweep.py --data /work/shared/data/mtd --plan explore --out results/
    python research/mtd_sweep.py --plan setting --settings '[{"backbone": "efficientnet_lite1", "pool": 3}]'
    python research/mtd_sweep.py --plan final --profile profile.json --save-maps   # ablation + neighbourhood
    python research/mtd_sweep.py --plan pts --profile profile.json                 # real OPTICS PTS-K
    python research/mtd_sweep.py --export-weights .carry/weights    # trimmed Lite weights for the device
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetmm.config import FeatureConfig  # noqa: E402
from hetmm.core.device import resolve_device  # noqa: E402
from hetmm.core.features import FeatureExtractor, content_box  # noqa: E402
from hetmm.core.matching import nearest_patch  # noqa: E402
from hetmm.core.metrics import UndefinedMetricError, aupro, image_auroc, pixel_auroc  # noqa: E402
from hetmm.core.scoring import LayerMatches, PostPlan, image_scores, match_plan, post_process  # noqa: E402
from hetmm.data.images import load_image, load_mask  # noqa: E402
from hetmm.data.splits import load_mtd_split  # noqa: E402

CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    train: list[Image.Image]
    dev: list[Image.Image]
    labels: np.ndarray  # [B] bool, True = defective
    classes: list[str]
    stems: list[str]
    masks: list[np.ndarray]  # original-size bool masks (all-False for MT_Free)


def load_data(root: str | Path, limit_train: int | None = None, limit_dev: int | None = None,
              seed: int = 0) -> Data:
    """Train templates and the dev half. Never touches ``holdout``."""
    root = Path(root)
    split = load_mtd_split()
    train_stems = list(split["train"])
    dev = [(cls, stem) for cls in sorted(split["dev"]) for stem in split["dev"][cls]]
    rng = random.Random(seed)
    if limit_train:
        train_stems = sorted(rng.sample(train_stems, limit_train))
    if limit_dev:
        dev = sorted(rng.sample(dev, limit_dev))

    train = [load_image(root / "MT_Free" / "Imgs" / f"{s}.jpg") for s in train_stems]
    imgs, masks = [], []
    for cls, stem in dev:
        imgs.append(load_image(root / cls / "Imgs" / f"{stem}.jpg"))
        mpath = root / cls / "Imgs" / f"{stem}.png"
        masks.append(load_mask(mpath, imgs[-1].size) if mpath.is_file() else np.zeros(imgs[-1].size[::-1], bool))
    labels = np.array([cls != "MT_Free" for cls, _ in dev])
    return Data(train, imgs, labels, [c for c, _ in dev], [s for _, s in dev], masks)


def masks_at(data: Data, size: tuple[int, int]) -> torch.Tensor:
    """GT masks at the model resolution [B, H, W] bool, resized as ``hetmm.pipeline.evaluation.gt_masks`` does
    (bilinear, >= 0.5) but from the masks already in memory."""
    h, w = size
    out = np.zeros((len(data.masks), h, w), bool)
    for i, m in enumerate(data.masks):
        if m.any():
            out[i] = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) >= 128
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- backbones / features


def export_weights(out_dir: str | Path) -> None:
    """Trimmed state dicts (stem + blocks up to stride 16) of Lite0/1/2: exact features, ~4 MB each."""
    from hetmm.core.backbones import build_backbone

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        bb = build_backbone(name, blocks="all")
        torch.save(bb.state_dict(), out_dir / f"{name}.pth")
        print(name, (out_dir / f"{name}.pth").stat().st_size)


_BACKBONES: dict = {}


def backbone(name: str, blocks: str, weights_dir: str | None):
    key = (name, blocks)
    if key not in _BACKBONES:
        if weights_dir:
            from efficientnet_lite_pytorch import EfficientNet

            from hetmm.core.backbones import EfficientNetLiteFeatures

            net = EfficientNet.from_name(name.replace("_", "-"))
            bb = EfficientNetLiteFeatures(net, name, blocks)
            bb.load_state_dict(torch.load(Path(weights_dir) / f"{name}.pth", map_location="cpu", weights_only=True))
            bb.eval()
            for p in bb.parameters():
                p.requires_grad_(False)
        else:
            from hetmm.core.backbones import build_backbone

            bb = build_backbone(name, blocks=blocks)
        _BACKBONES[key] = bb
    return _BACKBONES[key]


@torch.no_grad()
def extract(images: list[Image.Image], cfg: FeatureConfig, device: torch.device, weights_dir: str | None,
            batch: int = 32) -> list[torch.Tensor]:
    """All three layers, float32 on ``device``: [len(images), C_j, H_j, W_j]."""
    names = cfg.backbone.split("+")  # "a+b": channel concatenation of two backbones (each part L2-normalised)
    parts = []
    for name in names:
        c = replace(cfg, backbone=name, layers=(1, 2, 3))
        fe = FeatureExtractor(c, device, backbone=backbone(name, cfg.blocks, weights_dir))
        outs = [fe(images[i:i + batch]) for i in range(0, len(images), batch)]
        parts.append([torch.cat([o[j] for o in outs]).float() for j in range(3)])
    if len(parts) == 1:
        return parts[0]
    return [F.normalize(torch.cat([p[j] for p in parts], 1), dim=1) for j in range(3)]


# --------------------------------------------------------------------------- matching


def offsets(d: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-d, d + 1) for dx in range(-d, d + 1)]


@torch.no_grad()
def offset_table(query: torch.Tensor, templates: torch.Tensor, d: int, budget: int = 1 << 29) -> torch.Tensor:
    """M [(2d+1)², B, H, W] with M_δ(a) = max_n <Q(a), T_n(a+δ)>, -inf where a+δ is outside the grid."""
    b, c, h, w = query.shape
    n = templates.shape[0]
    qp = query.permute(2, 3, 0, 1).contiguous()  # [H, W, B, C]
    tp = templates.permute(2, 3, 1, 0).contiguous()  # [H, W, C, N]
    out = query.new_full(((2 * d + 1) ** 2, b, h, w), -math.inf)
    for i, (dy, dx) in enumerate(offsets(d)):
        y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        if y1 <= y0 or x1 <= x0:
            continue
        q = qp[y0:y1, x0:x1].reshape(-1, b, c)
        t = tp[y0 + dy:y1 + dy, x0 + dx:x1 + dx].reshape(-1, c, n)
        p = q.shape[0]
        step = max(1, budget // max(1, b * n))
        res = torch.empty(p, b, device=query.device)
        for s in range(0, p, step):
            res[s:s + step] = torch.bmm(q[s:s + step], t[s:s + step]).amax(-1)
        out[i, :, y0:y1, x0:x1] = res.t().reshape(b, y1 - y0, x1 - x0)
    return out


def forward_sim(table: torch.Tensor, d: int, k: int) -> torch.Tensor:
    r = k // 2
    idx = [i for i, (dy, dx) in enumerate(offsets(d)) if abs(dy) <= r and abs(dx) <= r]
    return table[idx].amax(0)


def backward_sim(table: torch.Tensor, d: int, k: int) -> torch.Tensor:
    r = k // 2
    _, b, h, w = table.shape
    out = table.new_full((b, h, w), -math.inf)
    for i, (dy, dx) in enumerate(offsets(d)):
        if abs(dy) > r or abs(dx) > r:
            continue
        # B(p) = max_δ M_δ(p - δ): shift M_δ by +δ
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[:, yd, xd] = torch.maximum(out[:, yd, xd], table[i][:, ys, xs])
    return out


@torch.no_grad()
def pts_approx(templates: torch.Tensor, k: int) -> torch.Tensor:
    """Per-pixel K sheets: global medoid, then greedy argmin of summed cosine to the selected set.

    [N, C, H, W] -> [K, C, H, W]. An approximation of PTS (no OPTICS cluster medoids).
    """
    n, c, h, w = templates.shape
    x = templates.permute(2, 3, 0, 1).reshape(h * w, n, c)
    k = min(k, n)
    total = x.sum(1, keepdim=True)  # [P, 1, C]
    score = (x * total).sum(-1)  # [P, N]
    ar = torch.arange(h * w, device=x.device)
    chosen = [score.argmax(1)]
    used = torch.zeros(h * w, n, dtype=torch.bool, device=x.device)
    used[ar, chosen[0]] = True
    acc = x[ar, chosen[0]].clone()
    for _ in range(1, k):
        s = (x * acc[:, None]).sum(-1).masked_fill(used, math.inf)
        nxt = s.argmin(1)
        chosen.append(nxt)
        used[ar, nxt] = True
        acc += x[ar, nxt]
    sel = torch.stack(chosen, 1)  # [P, K]
    out = x[ar[:, None], sel]  # [P, K, C]
    return out.reshape(h, w, k, c).permute(2, 3, 0, 1).contiguous()


@dataclass
class Matched:
    """Per-layer offset tables for one feature setting and template set (dev queries)."""

    tables: dict[int, torch.Tensor]  # layer -> [(2D+1)², B, H, W] similarities
    d: dict[int, int]  # layer -> D (largest window 2D+1)
    patch: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> nearest-patch distance [B, H, W]

    def distances(self, layer: int, kf: int, kb: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Forward and backward distances ``1 - F_kf``, ``1 - B_kb`` [B, H, W]; a window of 0 gives None."""
        t, d = self.tables[layer], self.d[layer]
        if max(kf, kb) > 2 * d + 1:
            raise ValueError(f"layer {layer}: window {max(kf, kb)} > table size {2 * d + 1}")
        return (1 - forward_sim(t, d, kf) if kf else None), (1 - backward_sim(t, d, kb) if kb else None)


def match_all(query: list[torch.Tensor], templates: list[torch.Tensor], layers=(1, 2, 3), d=3,
              patch: bool = False) -> Matched:
    """``d``: an int for every layer or {layer: D}."""
    ds = {layer: (d[layer] if isinstance(d, dict) else d) for layer in layers}
    tables, pt = {}, {}
    for layer in layers:
        tables[layer] = offset_table(query[layer - 1], templates[layer - 1], ds[layer])
        if patch:
            pt[layer] = nearest_patch(query[layer - 1], templates[layer - 1])
    return Matched(tables, ds, pt)


# --------------------------------------------------------------------------- fusion, post-processing


@dataclass(frozen=True)
class Combo:
    layers: tuple[int, ...] = (1, 2)
    kf: tuple[int, ...] = (3, 3)
    kb: tuple[int, ...] = (3, 3)
    alphas: tuple[float, ...] = (0.5, 0.5)
    weights: tuple[float, ...] = (1.0, 1.0)
    sigma: float = 4.0
    score: str = "max"  # max | block<k>
    mode: str = "mutual"  # mutual | pixel | patch | forward | backward

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def fuse(m: Matched, combo: Combo, size: tuple[int, int], boxes=None) -> torch.Tensor:
    """Fused, geometry-restored, blurred anomaly maps [B, H, W] at the image size.

    The modes and the recipe after matching are the package's (``match_plan``, ``post_process``); only the
    distances come from the offset tables.
    """
    found = LayerMatches([], [], [], 0)
    for step in match_plan(combo.kf, combo.kb, combo.alphas, combo.weights, combo.mode):
        layer = combo.layers[step.layer]
        if step.patch:
            fwd, bwd = m.patch[layer], None
        else:
            fwd, bwd = m.distances(layer, step.forward_window, step.backward_window)
        found.forward.append(fwd)
        found.backward.append(bwd)
        found.plan.append(step)
        found.batch = (fwd if fwd is not None else bwd).shape[0]
    plan = PostPlan(tuple(size), boxes is not None, combo.sigma, None, "max", None)
    return post_process(found, plan, boxes)[0]


def score_images(maps: torch.Tensor, rule: str) -> torch.Tensor:
    """Image scores [B] for a ``Combo.score``: ``max`` or ``block<k>`` (the package's ``block_mean`` with block k)."""
    if rule.startswith("block"):
        return image_scores(maps, "block_mean", int(rule[len("block"):]))
    return image_scores(maps, rule)


# --------------------------------------------------------------------------- metrics


def device_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact pooled AUROC in percent (ties count 1/2) of any shape, NaN where undefined (one class only).

    On the CPU this is ``hetmm.core.metrics.pixel_auroc``. On an accelerator it is the same Mann-Whitney
    count with the sort kept on the device, because the package's metric is numpy on the CPU: about 2 s
    per call for 294 maps of 320² (2 cores), and one setting's naive, paper, grid and search evaluations
    call it ~125 times, while the recorded GPU sweeps took 4-18 s per setting (results/1_explore.json).
    """
    if scores.device.type == "cpu":
        return defined(pixel_auroc, scores.reshape(1, 1, -1), labels.reshape(1, 1, -1))
    scores = scores.flatten().float()
    labels = labels.flatten().bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg = torch.sort(scores[~labels]).values
    pos = scores[labels]
    lo = torch.searchsorted(neg, pos, right=False).double().sum()
    hi = torch.searchsorted(neg, pos, right=True).double().sum()
    return float((lo + hi) / (2.0 * n_pos * n_neg)) * 100.0


def defined(metric, *args) -> float:
    """A ``hetmm.core.metrics`` metric (percent), NaN where it is undefined (e.g. one class only)."""
    try:
        return metric(*args)
    except UndefinedMetricError:
        return float("nan")


def pixel_report(maps: torch.Tensor, masks: torch.Tensor, data: Data, full: bool = False) -> dict:
    """Pixel AUROC pooled, and (full) the diagnostics: per class, per image, normalised, border."""
    gt = masks.to(maps.device)
    out = {"pixel_auroc": device_auroc(maps, gt)}
    if not full:
        return out
    out["aupro"] = defined(aupro, maps, masks)
    classes = np.array(data.classes)
    good = torch.from_numpy(classes == "MT_Free")
    per_class = {}
    for cls in CLASSES:
        keep = torch.from_numpy(classes == cls) | good
        per_class[cls] = device_auroc(maps[keep.to(maps.device)], gt[keep.to(maps.device)])
    out["pixel_auroc_per_class"] = per_class
    keep = torch.from_numpy(classes != "MT_Uneven").to(maps.device)
    out["pixel_auroc_without_uneven"] = device_auroc(maps[keep], gt[keep])
    keep2 = torch.from_numpy(~np.isin(classes, ["MT_Uneven", "MT_Fray"])).to(maps.device)
    out["pixel_auroc_without_uneven_fray"] = device_auroc(maps[keep2], gt[keep2])
    # localisation inside each defective image, independent of cross-image calibration
    per_img = {}
    for i in range(len(classes)):
        g = gt[i]
        if 0 < int(g.sum()) < g.numel():
            per_img.setdefault(classes[i], []).append(device_auroc(maps[i], g))
    out["per_image_auroc_mean"] = {c: float(np.mean(v)) for c, v in per_img.items()}
    out["per_image_auroc_mean_all"] = float(np.mean([x for v in per_img.values() for x in v]))
    # cross-image calibration: subtract each map's median (a per-image offset)
    med = maps.flatten(1).median(1).values[:, None, None]
    out["pixel_auroc_median_normalised"] = device_auroc(maps - med, gt)
    z = (maps - med) / (maps.flatten(1).std(1)[:, None, None] + 1e-6)
    out["pixel_auroc_z_normalised"] = device_auroc(z, gt)
    # border band: share of the top-1% normal pixels lying in the outer 1/16 of the map
    h, w = maps.shape[-2:]
    bh, bw = max(1, h // 16), max(1, w // 16)
    border = torch.zeros(h, w, dtype=torch.bool, device=maps.device)
    border[:bh], border[-bh:], border[:, :bw], border[:, -bw:] = True, True, True, True
    bmask = border.expand_as(gt)
    negs = maps[~gt]
    t99 = torch.quantile(negs[torch.randperm(negs.numel(), device=maps.device)[:1_000_000]], 0.99)
    top = (maps > t99) & ~gt
    out["border_share_of_pixels"] = float(border.float().mean())
    out["border_share_of_top1pct_normal"] = float((top & bmask).sum() / top.sum().clamp(min=1))
    inner = ~bmask
    out["pixel_auroc_inner"] = device_auroc(maps[inner], gt[inner])
    # a misalignment bug for scale: the same maps against horizontally flipped masks
    out["pixel_auroc_if_masks_flipped"] = device_auroc(maps, gt.flip(-1))
    return out


# --------------------------------------------------------------------------- evaluation of one combo


class Evaluator:
    def __init__(self, data: Data, cfg: FeatureConfig, matched: Matched, device: torch.device):
        self.data, self.cfg, self.m = data, cfg, matched
        self.size = cfg.image_size
        self.boxes = ([content_box(im.size, cfg.image_size, "pad") for im in data.dev]
                      if cfg.resize == "pad" else None)
        self.masks = masks_at(data, self.size)
        self.masks_dev = self.masks.to(device)
        self.cache: dict = {}

    def __call__(self, combo: Combo, pixel: bool = True, full: bool = False) -> dict:
        key = (combo, pixel, full)
        if key in self.cache:
            return self.cache[key]
        maps = fuse(self.m, combo, self.size, self.boxes)
        out = {}
        for rule in dict.fromkeys([combo.score, "max"]):
            name = "image_auroc" if rule == combo.score else f"image_auroc_{rule}"
            out[name] = defined(image_auroc, score_images(maps, rule), self.data.labels)
        labels = self.data.labels
        classes = np.array(self.data.classes)
        s = score_images(maps, combo.score).cpu().numpy()
        if full:
            out["image_auroc_per_class"] = {
                c: defined(image_auroc, s[(classes == c) | ~labels], labels[(classes == c) | ~labels]) for c in CLASSES}
        if pixel:
            out.update(pixel_report(maps, self.masks_dev, self.data, full=full))
        self.cache[key] = out
        return out


def objective(r: dict) -> float:
    """Image AUROC first; pixel AUROC as a small tie-breaker."""
    return r["image_auroc"] + 0.02 * r.get("pixel_auroc", 0.0)


def local_search(ev: Evaluator, start: Combo, layer_sets=((1, 2), (1, 2, 3), (2, 3), (1,), (2,)),
                 passes: int = 2, windows=(1, 3, 5, 7, 9), alphas=(0.0, 0.3, 0.5, 0.7, 1.0),
                 weights=(0.3, 0.5, 0.8, 1.0), sigmas=(0.0, 2.0, 4.0, 6.0, 8.0),
                 scores=("max", "block16", "block32")) -> tuple[Combo, dict, list]:
    """Coordinate ascent over the matching/fusion parameters on one feature setting."""
    best = start
    best_r = ev(best)
    trail = [(best.as_dict(), best_r)]

    def per_layer(c: Combo, layers: tuple[int, ...]) -> Combo:
        def pick(vals, default):
            old = dict(zip(c.layers, vals))
            return tuple(old.get(layer, default) for layer in layers)
        return replace(c, layers=layers, kf=pick(c.kf, 3), kb=pick(c.kb, 3), alphas=pick(c.alphas, 0.5),
                       weights=pick(c.weights, 1.0))

    def consider(c: Combo):
        nonlocal best, best_r
        r = ev(c)
        trail.append((c.as_dict(), r))
        if objective(r) > objective(best_r) + 1e-9:
            best, best_r = c, r

    for _ in range(passes):
        before = best
        for ls in layer_sets:
            if all(layer in ev.m.tables for layer in ls):
                consider(per_layer(best, ls))
        for j in range(len(best.layers)):
            for name, values in (("kf", windows), ("kb", windows), ("alphas", alphas), ("weights", weights)):
                if name == "weights" and j == 0:
                    continue  # λ1 = 1 fixes the scale
                base = best
                if name in ("kf", "kb"):
                    values = tuple(k for k in values if k <= 2 * ev.m.d[base.layers[j]] + 1)
                for v in values:
                    vals = list(getattr(base, name))
                    vals[j] = v
                    consider(replace(base, **{name: tuple(vals)}))
        for sg in sigmas:
            consider(replace(best, sigma=sg))
        for sc in scores:
            consider(replace(best, score=sc))
        if best == before:
            break
    return best, best_r, trail


# --------------------------------------------------------------------------- plans


def feature_cfg(**kw) -> FeatureConfig:
    base = dict(backbone="efficientnet_lite0", layers=(1, 2, 3), image_size=(256, 256), resize="squash",
                normalisation="imagenet", blocks="all", pool=1, flip_average=False)
    base.update(kw)
    if isinstance(base["image_size"], int):
        base["image_size"] = (base["image_size"], base["image_size"])
    return FeatureConfig(**base)


def cfg_key(cfg: FeatureConfig) -> str:
    return (f"{cfg.backbone}|{cfg.blocks}|{cfg.image_size[0]}x{cfg.image_size[1]}|{cfg.resize}|"
            f"{cfg.normalisation}|pool{cfg.pool}|flip{int(cfg.flip_average)}")


NAIVE = Combo(layers=(1, 2, 3), kf=(5, 5, 3), kb=(3, 3, 3), alphas=(0.5,) * 3, weights=(1.0,) * 3, sigma=4.0)
PAPER = Combo(layers=(1, 2), kf=(3, 3), kb=(3, 3), alphas=(0.5, 0.5), weights=(1.0, 1.0), sigma=4.0)
ROBUST_GRID = [Combo(layers=(2, 3), kf=(kf2, kf3), kb=(kb2, kb3), alphas=(0.5, 0.5), weights=(1.0, 1.0), sigma=4.0)
               for kf2 in (3, 5, 7) for kb2 in (1, 3, 5) for kf3 in (3, 5) for kb3 in (1, 3)]


class Runner:
    def __init__(self, args):
        self.args = args
        self.device = resolve_device(args.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.data = load_data(args.data, args.limit_train, args.limit_dev)
        log(f"data: {len(self.data.train)} templates, {len(self.data.dev)} dev "
            f"({int(self.data.labels.sum())} defective), device {self.device}")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"settings": {}, "meta": {"device": str(self.device), "n_train": len(self.data.train),
                                                       "n_dev": len(self.data.dev)}}
        self.deadline = T0 + args.budget_s

    def save(self, name: str = "results.json") -> None:
        (self.out / name).write_text(json.dumps(self.results, indent=1, default=float))

    def features(self, cfg: FeatureConfig):
        t = time.time()
        tr = extract(self.data.train, cfg, self.device, self.args.weights)
        dv = extract(self.data.dev, cfg, self.device, self.args.weights)
        log(f"features {cfg_key(cfg)}: {[tuple(x.shape[1:]) for x in tr]} in {time.time() - t:.1f}s")
        return tr, dv

    def run_setting(self, cfg: FeatureConfig, search: bool = True, d=None, frozen: "Combo | None" = None) -> dict:
        """Features + offset tables once, then: naive and paper combos, the fixed robustness grid
        (``ROBUST_GRID``: median over 36 plausible layer-2/3 combos measures the features, not the tuning),
        and a coordinate-ascent search (optimistic: it is tuned on dev)."""
        key = cfg_key(cfg)
        if key in self.results["settings"]:
            return self.results["settings"][key]
        t = time.time()
        tr, dv = self.features(cfg)
        m = match_all(dv, tr, d=d or {1: 3, 2: 4, 3: 4})
        del tr
        ev = Evaluator(self.data, cfg, m, self.device)
        rec = {"naive": {"combo": NAIVE.as_dict(), **ev(NAIVE)}, "paper": {"combo": PAPER.as_dict(), **ev(PAPER)}}
        grid = [ev(c) for c in ROBUST_GRID]
        img = np.array([g["image_auroc"] for g in grid])
        pix = np.array([g["pixel_auroc"] for g in grid])
        rec["grid"] = {"image_median": float(np.median(img)), "image_mean": float(img.mean()),
                       "image_min": float(img.min()), "image_max": float(img.max()),
                       "pixel_median": float(np.median(pix)), "pixel_max": float(pix.max())}
        if frozen is not None:
            rec["frozen"] = {"combo": frozen.as_dict(), **ev(frozen, full=True)}
        if search:
            best, best_r, trail = local_search(ev, PAPER)
            rec["best"] = {"combo": best.as_dict(), **ev(best, full=True)}
            rec["best"]["scores"] = score_images(fuse(m, best, cfg.image_size, ev.boxes), best.score).cpu().tolist()
            rec["n_evaluated"] = len(trail)
        rec["seconds"] = round(time.time() - t, 1)
        self.results["settings"][key] = rec
        log(f"{key}: naive {rec['naive']['image_auroc']:.2f}/{rec['naive']['pixel_auroc']:.2f} "
            f"paper {rec['paper']['image_auroc']:.2f}/{rec['paper']['pixel_auroc']:.2f} "
            f"grid median {rec['grid']['image_median']:.2f}/{rec['grid']['pixel_median']:.2f} "
            + (f"frozen {rec['frozen']['image_auroc']:.2f}/{rec['frozen']['pixel_auroc']:.2f} " if frozen else "")
            + (f"best {rec['best']['image_auroc']:.2f}/{rec['best']['pixel_auroc']:.2f} {rec['best']['combo']}"
               if search else ""))
        self.save()
        del m, ev, dv
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rec

    def time_left(self) -> float:
        return self.deadline - time.time()

    # ---------------------------------------------------------------- plan: explore
    def plan_explore(self) -> None:
        """Diagnosis of the naive run, then greedy coordinate ascent over the feature options."""
        self.diagnose_naive()
        axes = [
            ("normalisation", ["imagenet", "image"]),
            ("image_size", [(256, 256), (320, 320), (384, 384), (448, 448), (512, 512)]),
            ("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]),
            ("resize", ["squash", "pad"]),
            ("blocks", ["all", "last"]),
            ("pool", [1, 3]),
            ("flip_average", [False, True]),
        ]
        current = feature_cfg()
        cur_r = self.run_setting(current)
        history = []
        for pass_no in range(2):
            changed = False
            for name, values in axes:
                for v in values:
                    if getattr(current, name) == v:
                        continue
                    if self.time_left() < 60:
                        log("time budget reached")
                        self.results["greedy"] = history
                        self.save()
                        return
                    cand = replace(current, **{name: v})
                    r = self.run_setting(cand)
                    history.append({"pass": pass_no, "axis": name, "value": v, "key": cfg_key(cand),
                                    "image_auroc": r["best"]["image_auroc"], "pixel_auroc": r["best"]["pixel_auroc"]})
                    if objective(r["best"]) > objective(cur_r["best"]) + 0.05:
                        current, cur_r, changed = cand, r, True
                        log(f"  -> adopt {name}={v}")
            self.results["greedy"] = history
            self.results["greedy_best"] = cfg_key(current)
            self.save()
            if not changed:
                break

    def diagnose_naive(self) -> None:
        """The naive user's run (Lite0, all blocks, 256 squash, ALL, windows 5/3,5/3,3/3) plus 200 templates."""
        cfg = feature_cfg()
        tr, dv = self.features(cfg)
        diag = {}
        for n_t in (None, 200):
            t = tr if n_t is None else [x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n_t]
                                            .to(x.device)] for x in tr]
            m = match_all(dv, t, d=2)
            ev = Evaluator(self.data, cfg, m, self.device)
            diag[f"templates_{n_t or 'ALL'}"] = ev(NAIVE, full=True)
            # raw (no blur) maps too
            diag[f"templates_{n_t or 'ALL'}_noblur"] = ev(replace(NAIVE, sigma=0.0), full=True)
        # pad geometry without restoring (a plausible bug): pad features, maps not cropped, squash masks
        cfg_pad = replace(cfg, resize="pad")
        trp, dvp = self.features(cfg_pad)
        mp = match_all(dvp, trp, d=2)
        evp = Evaluator(self.data, cfg_pad, mp, self.device)
        diag["pad_restored"] = evp(NAIVE, full=True)
        maps_unrestored = fuse(mp, NAIVE, cfg.image_size, None)
        diag["pad_not_restored_vs_squash_masks"] = pixel_report(maps_unrestored, evp.masks_dev, self.data)
        self.results["naive_diagnosis"] = diag
        log("naive diagnosis:", json.dumps({k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
                                            for k, v in diag.items()}, default=float)[:3000])
        self.save()
        del tr, dv, trp, dvp, m, mp
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- plan: final (profile + ablation)
    def plan_final(self) -> None:
        prof = json.loads(Path(self.args.profile).read_text()) if os.path.isfile(self.args.profile) \
            else json.loads(self.args.profile)
        variants = prof.pop("variants", [])
        cfg = feature_cfg(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in prof["features"].items()})
        combo = Combo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in prof["combo"].items()})
        tr, dv = self.features(cfg)
        res = {"features": cfg_key(cfg), "combo": combo.as_dict(), "rows": []}
        sets = [("ALL", tr)]
        for k in prof.get("pts_sizes", [10, 20, 40, 60]):
            sets.append((f"PTSapprox-{k}", [pts_approx(x, k) for x in tr]))
        for k in prof.get("random_sizes", []):
            g = torch.Generator().manual_seed(0)
            sets.append((f"random-{k}", [x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)] for x in tr]))
        for name, t in sets:
            d = {int(k): v for k, v in prof.get("d", {"1": 3, "2": 4, "3": 4}).items()}
            layers = combo.layers
            if name == "ALL":  # the neighbourhood may use other layers
                layers = tuple(sorted(set(combo.layers).union(*[v.get("layers", ()) for v in variants])))
            m = match_all(dv, t, layers=layers, d=d, patch=(name == "ALL"))
            ev = Evaluator(self.data, cfg, m, self.device)
            modes = ["pixel", "patch", "forward", "backward", "mutual"] if name == "ALL" else ["mutual"]
            for mode in modes:
                r = ev(replace(combo, mode=mode), full=True)
                res["rows"].append({"templates": name, "mode": mode, **r})
                log(f"{name} {mode}: img {r['image_auroc']:.2f} pix {r['pixel_auroc']:.2f} pro {r['aupro']:.2f}")
            if name == "ALL":
                # robustness: one-at-a-time perturbations of the frozen combo
                res["neighbourhood"] = []
                for v in variants:
                    c = replace(combo, **{k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()})
                    r = ev(c)
                    res["neighbourhood"].append({"change": v, **r})
                maps = fuse(m, combo, cfg.image_size, ev.boxes)
                res["scores"] = score_images(maps, combo.score).cpu().tolist()
                res["stems"] = self.data.stems
                res["classes"] = self.data.classes
                if self.args.save_maps:  # 128 x 128 float16 copies for figures
                    small = F.interpolate(maps[:, None], size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
                    np.savez_compressed(self.out / "maps_all.npz", maps=small.half().cpu().numpy(),
                                        labels=self.data.labels, classes=np.array(self.data.classes),
                                        stems=np.array(self.data.stems))
            del m, ev
            self.results["final"] = res
            self.save()


def pts_real(templates: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, dict]:
    """The pipeline's PTS (``hetmm.core.templates``: exact batched OPTICS + medoids + hard normals)."""
    from hetmm.core.templates import optics_labels, select_prototypes

    t = time.time()
    labels = optics_labels(templates, k, chunk=chunk)
    sheets = select_prototypes(templates, labels, k, chunk=chunk)
    n_clusters = (labels.amax(0) + 1).float()
    stats = {"seconds": round(time.time() - t, 1), "clusters_mean": float(n_clusters.mean()),
             "clusters_max": int(n_clusters.max()), "noise_fraction": float((labels < 0).float().mean()),
             "pixels_with_K_or_more_clusters": float((n_clusters >= k).float().mean())}
    return sheets.float(), stats


def plan_pts(runner: "Runner") -> None:
    """Real PTS-K (OPTICS) for the profile's features, the frozen combo and ``pts_variants`` on ALL and each PTS."""
    args = runner.args
    prof = json.loads(Path(args.profile).read_text()) if os.path.isfile(args.profile) else json.loads(args.profile)
    cfg = feature_cfg(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in prof["features"].items()})
    combo = Combo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in prof["combo"].items()})
    variants = [replace(combo, **{k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()})
                for v in prof.get("pts_variants", [])]
    d = {int(k): v for k, v in prof.get("d", {"2": 4, "3": 4}).items()}
    tr, dv = runner.features(cfg)
    res = {"features": cfg_key(cfg), "combo": combo.as_dict(), "rows": [], "pts_stats": {}}
    runner.results["pts"] = res

    def evaluate(name: str, templates: list[torch.Tensor]) -> None:
        m = match_all(dv, templates, layers=combo.layers, d=d)
        ev = Evaluator(runner.data, cfg, m, runner.device)
        for i, c in enumerate([combo, *variants]):
            r = ev(c, full=(i == 0))
            res["rows"].append({"templates": name, "combo": c.as_dict(), "variant": i, **r})
        r0 = res["rows"][-len(variants) - 1]
        log(f"{name}: img {r0['image_auroc']:.2f} pix {r0['pixel_auroc']:.2f} pro {r0['aupro']:.2f}; variants "
            + " ".join(f"{x['image_auroc']:.2f}" for x in res["rows"][-len(variants):]))
        runner.save()

    evaluate("ALL", tr)
    for k in prof.get("pts_real_sizes", [60]):
        if runner.time_left() < 40:
            log("time budget reached")
            break
        sheets, stats = [], {}
        for layer in combo.layers:
            sh, st = pts_real(tr[layer - 1], k)
            sheets.append(sh)
            stats[layer] = st
        res["pts_stats"][k] = stats
        log(f"PTS-{k} built: {stats}")
        full = [None, None, None]
        for layer, sh in zip(combo.layers, sheets):
            full[layer - 1] = sh
        evaluate(f"PTS-{k}", full)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/mtd", help="MTD root with MT_*/Imgs/")
    ap.add_argument("--out", default="research/results")
    ap.add_argument("--plan", default="explore", choices=["explore", "final", "setting", "pts"])
    ap.add_argument("--profile", default="", help="final: JSON (or file) {features:{...}, combo:{...}, ...}")
    ap.add_argument("--settings", default="", help="setting: JSON list of feature dicts, each searched")
    ap.add_argument("--weights", default=None, help="directory of trimmed Lite weights (--export-weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-dev", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new settings after this")
    ap.add_argument("--save-maps", action="store_true")
    ap.add_argument("--no-search", action="store_true", help="setting: skip the coordinate-ascent search")
    ap.add_argument("--export-weights", default=None, help="write trimmed weights to this directory and exit")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_weights:
        export_weights(args.export_weights)
        return
    runner = Runner(args)
    if args.plan == "explore":
        runner.plan_explore()
    elif args.plan == "final":
        runner.plan_final()
    elif args.plan == "pts":
        plan_pts(runner)
    else:
        frozen = None
        if args.profile:
            prof = (json.loads(Path(args.profile).read_text()) if os.path.isfile(args.profile)
                    else json.loads(args.profile))
            frozen = Combo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in prof["combo"].items()})
        for s in json.loads(Path(args.settings).read_text() if os.path.isfile(args.settings) else args.settings):
            if runner.time_left() < 45:
                break
            runner.run_setting(feature_cfg(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in s.items()}),
                               search=not args.no_search, frozen=frozen)
    runner.results["meta"]["seconds"] = round(time.time() - T0, 1)
    runner.save()
    log("done")


if __name__ == "__main__":
    main()
