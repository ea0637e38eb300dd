"""End-to-end CPU inference speed: backbone alone against the full ``Inspector.predict`` on real MTD images.

Target (issue): EfficientNet-Lite0 at 256 px with a PTS-60 template, layers 1-3, windows fwd 5/5/3 and
bwd 3/3/3: ``Inspector.predict`` (preprocess + backbone + matching + fusion + blur + score) at >= 8 images/s
on 2 CPU threads. Run for ``blocks: last`` (channels 24/40/112) and ``blocks: all`` (48/80/576).

The template is PTS-60 built from ``--train`` MTD train (MT_Free) images' features, spread evenly over the
committed train list; queries are MTD dev test images of every class (decoded once beforehand, so JPEG
decoding is not timed). Each sample times every part once, interleaved (preprocess, backbone, features,
scoring of the cached features, predict, and the old NCHW-template scoring), so load from other processes hits
all parts alike; the figures are medians over samples. With batch 1 a sample is ``--batch1-images``
single-image calls.

    .venv/bin/python benchmarks/bench_inference.py            # writes benchmarks/results/inference.json
    .venv/bin/python benchmarks/bench_inference.py --quick    # fewer images and samples, smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hetmm.config import FeatureConfig, MatchingConfig, PostConfig, ProductLine, TemplateConfig
from hetmm.data import load_image
from hetmm.features import FeatureExtractor, to_tensor
from hetmm.inspector import Inspector
from hetmm.io import write_json_atomic
from hetmm.matching import match_layer
from hetmm.scoring import fuse_layers, gaussian_blur, image_scores
from hetmm.splits import MTD_CLASSES, load_mtd_split
from hetmm.templates import TemplateSet, build_pts

RESULTS = Path(__file__).parent / "results" / "inference.json"
TARGET_IMAGES_PER_S = 8.0
DEFAULT_MIRROR = "/work/shared/data/mtd"


def issue_line(blocks: str, k: int) -> ProductLine:
    """The issue's setting, pinned here (params.yaml is tuned separately): Lite0 at 256 px, ImageNet
    normalisation, layers 1-3, fwd 5/5/3, bwd 3/3/3, alpha 0.5, weights 1, blur sigma 4, image score max."""
    return ProductLine(
        name="mtd",
        features=FeatureConfig(backbone="efficientnet_lite0", layers=(1, 2, 3), image_size=(256, 256),
                               resize="squash", normalisation="imagenet", blocks=blocks, dtype="float32",
                               batch_size=8),
        templates=TemplateConfig(kind="PTS", size=k),
        matching=MatchingConfig(mode="mutual", forward_windows=(5, 5, 3), backward_windows=(3, 3, 3),
                                alphas=(0.5, 0.5, 0.5), weights=(1.0, 1.0, 1.0)),
        post=PostConfig(blur_sigma=4.0, image_score="max"),
    )


def _clock(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mtd_images(mirror: Path, n_train: int, n_queries: int) -> tuple[list, list]:
    """``n_train`` MT_Free train images spread over the committed train list, ``n_queries`` dev test images
    taken round-robin over the classes (decoded, RGB)."""
    split = load_mtd_split()
    train = split["train"]
    picks = [train[round(i * (len(train) - 1) / max(1, n_train - 1))] for i in range(n_train)]
    train_images = [load_image(mirror / "MT_Free" / "Imgs" / f"{s}.jpg") for s in dict.fromkeys(picks)]
    pools = {cls: list(split["dev"][cls]) for cls in MTD_CLASSES}
    queries = []
    while len(queries) < n_queries and any(pools.values()):
        for cls in MTD_CLASSES:
            if pools[cls] and len(queries) < n_queries:
                queries.append(load_image(mirror / cls / "Imgs" / f"{pools[cls].pop(0)}.jpg"))
    return train_images, queries


def build_template(extractor: FeatureExtractor, images: list, k: int, batch: int) -> tuple[TemplateSet, dict]:
    start = time.perf_counter()
    feats = [extractor(images[i : i + batch]) for i in range(0, len(images), batch)]
    layers = [torch.cat([f[j] for f in feats]) for j in range(len(feats[0]))]
    t_extract = time.perf_counter() - start
    start = time.perf_counter()
    tset = build_pts(layers, k, [str(i) for i in range(len(images))], extractor.config.fingerprint(), progress=False)
    info = {"train_images": len(images), "K": k, "sheets": int(tset.layers[0].shape[0]), "bytes": int(tset.nbytes),
            "extract_s": round(t_extract, 2), "build_pts_s": round(time.perf_counter() - start, 2)}
    return tset, info


def score_parts(inspector: Inspector, feats: list[torch.Tensor]) -> dict[str, float]:
    """Seconds of each step of ``Inspector.score_features`` (same calls, timed one by one)."""
    m, post, size = inspector.line.matching, inspector.line.post, inspector.line.features.image_size
    out, fwd, bwd = {}, [], []
    for j, (q, t) in enumerate(zip(feats, inspector.template.layers)):
        start = time.perf_counter()
        f, b = match_layer(q, t, m.forward_windows[j], m.backward_windows[j])
        out[f"match_layer{inspector.line.features.layers[j]}"] = time.perf_counter() - start
        fwd.append(f)
        bwd.append(b)
    start = time.perf_counter()
    maps = fuse_layers(fwd, bwd, m.alphas, m.weights, size)
    out["fuse"] = time.perf_counter() - start
    start = time.perf_counter()
    maps = gaussian_blur(maps, post.blur_sigma, post.blur_kernel)
    out["blur"] = time.perf_counter() - start
    start = time.perf_counter()
    image_scores(maps, post.image_score, post.block)
    out["score"] = time.perf_counter() - start
    return out


@torch.no_grad()
def measure(line, inspector: Inspector, nchw: Inspector, queries: list, batch: int, samples: int,
            batch1_images: int) -> dict:
    """Median seconds per image of every part, over interleaved samples."""
    extractor = inspector.extractor
    calls = 1 if batch > 1 else batch1_images
    per_image: dict[str, list[float]] = {}
    cursor = 0

    def take() -> list:
        nonlocal cursor
        picked = [queries[(cursor + i) % len(queries)] for i in range(batch)]
        cursor += batch
        return picked

    # Warm-up (allocator, thread pool, first-call paths).
    warm = take()
    inspector.predict(warm)
    nchw.score_features(extractor(warm))
    for _ in range(samples):
        batches = [take() for _ in range(calls)]
        tensors = [to_tensor(b, line.features) for b in batches]
        feats = [extractor(b) for b in batches]
        times = {
            "preprocess": sum(_clock(lambda b=b: to_tensor(b, line.features)) for b in batches),
            "backbone": sum(_clock(lambda x=x: extractor.backbone(x)) for x in tensors),
            "features": sum(_clock(lambda b=b: extractor(b)) for b in batches),
            "score_features": sum(_clock(lambda f=f: inspector.score_features(f)) for f in feats),
            "predict": sum(_clock(lambda b=b: inspector.predict(b)) for b in batches),
            "score_features_nchw_template": sum(_clock(lambda f=f: nchw.score_features(f)) for f in feats),
        }
        parts: dict[str, float] = {}
        for f in feats:
            for key, value in score_parts(inspector, f).items():
                parts[key] = parts.get(key, 0.0) + value
        for key, value in {**times, **parts}.items():
            per_image.setdefault(key, []).append(value / (calls * batch))
    ms = {key: 1e3 * statistics.median(values) for key, values in per_image.items()}
    spread = {key: [1e3 * min(v), 1e3 * max(v)] for key, v in per_image.items()}
    predict = ms["predict"]
    return {
        "ms_per_image": {k: round(v, 2) for k, v in ms.items()},
        "ms_per_image_range": {k: [round(a, 2), round(b, 2)] for k, (a, b) in spread.items()},
        "images_per_s": {
            "backbone": round(1e3 / ms["backbone"], 2),
            "features": round(1e3 / ms["features"], 2),
            "predict": round(1e3 / predict, 2),
            "predict_with_nchw_template": round(
                1e3 / (ms["features"] + ms["score_features_nchw_template"]), 2),
        },
        "share_of_predict": {
            "preprocess": round(ms["preprocess"] / predict, 3),
            "backbone": round(ms["backbone"] / predict, 3),
            "matching_fusion_blur_score": round(ms["score_features"] / predict, 3),
        },
        "nchw_over_pixel_major_scoring": round(ms["score_features_nchw_template"] / ms["score_features"], 2),
    }


def profile(inspector: Inspector, queries: list, batch: int, top: int = 15) -> list[dict]:
    """torch.profiler over one ``predict`` of ``batch`` images: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    images = queries[:batch]
    inspector.predict(images)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        inspector.predict(images)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_ms_per_image": round(e.self_cpu_time_total / 1e3 / batch, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=os.environ.get("HETMM_MIRROR", DEFAULT_MIRROR), help="MTD mirror folder")
    parser.add_argument("--train", type=int, default=200, help="train images for the PTS template")
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--queries", type=int, default=48, help="distinct query images (cycled)")
    parser.add_argument("--samples", type=int, default=9, help="interleaved samples per setting")
    parser.add_argument("--batch1-images", type=int, default=8, help="single-image calls per batch-1 sample")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--blocks", nargs="+", default=["last", "all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--quick", action="store_true", help="60 train images, 16 queries, 3 samples")
    args = parser.parse_args()
    if args.quick:
        args.train, args.queries, args.samples = 60, 16, 3
    torch.set_num_threads(args.threads)
    base = issue_line("last", args.k)
    load_before = os.getloadavg()
    start = time.perf_counter()
    train_images, queries = mtd_images(Path(args.mirror), args.train, args.queries)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(train_images)} train images, "
          f"{len(queries)} queries decoded in {time.perf_counter() - start:.1f} s; load average {load_before}",
          flush=True)

    runs = []
    for blocks in args.blocks:
        line = issue_line(blocks, args.k)
        extractor = FeatureExtractor(line.features, "cpu")
        tset, info = build_template(extractor, train_images, args.k, line.features.batch_size)
        inspector = Inspector(line, tset, "cpu", extractor)
        nchw = Inspector(line, tset, "cpu", extractor)
        nchw.template = TemplateSet(layers=[t.contiguous() for t in tset.layers], meta=tset.meta, easy=tset.easy)
        print(f"blocks={blocks}: channels {extractor.channels}, PTS-{args.k} from {info['train_images']} images: "
              f"{info['bytes'] / 2**20:.1f} MiB, built in {info['build_pts_s']} s", flush=True)
        for batch in args.batches:
            row = {"blocks": blocks, "channels": extractor.channels, "batch": batch,
                   **measure(line, inspector, nchw, queries, batch, args.samples, args.batch1_images)}
            row["target_met"] = row["images_per_s"]["predict"] >= TARGET_IMAGES_PER_S
            ms, ips = row["ms_per_image"], row["images_per_s"]
            print(f"  B={batch}: backbone {ips['backbone']:5.1f} img/s | predict {ips['predict']:5.1f} img/s "
                  f"({ms['predict']:.0f} ms/img = preprocess {ms['preprocess']:.0f} + backbone {ms['backbone']:.0f} "
                  f"+ score {ms['score_features']:.0f} [L1 {ms['match_layer1']:.0f}, L2 {ms['match_layer2']:.0f}, "
                  f"L3 {ms['match_layer3']:.0f}, fuse {ms['fuse']:.1f}, blur {ms['blur']:.1f}]) | NCHW template "
                  f"scoring {ms['score_features_nchw_template']:.0f} ms/img ({row['nchw_over_pixel_major_scoring']}x) "
                  f"| target {'met' if row['target_met'] else 'MISSED'}", flush=True)
            runs.append({**row, "template": info})
        if not args.no_profile:
            top = profile(inspector, queries, max(args.batches))
            runs[-1]["profile_top_ops"] = top
            print(f"  profile, B={max(args.batches)}, top ops by self CPU time (ms/img): " +
                  ", ".join(f"{e['op']} {e['self_ms_per_image']}" for e in top[:8]), flush=True)

    write_json_atomic(RESULTS, {
        "benchmark": "inference",
        "command": "python benchmarks/bench_inference.py" + (" --quick" if args.quick else ""),
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"torch": torch.__version__},
        "settings": {"backbone": "efficientnet_lite0", "image_size": [256, 256], "layers": [1, 2, 3],
                     "forward_windows": [5, 5, 3], "backward_windows": [3, 3, 3], "alphas": list(base.matching.alphas),
                     "weights": list(base.matching.weights), "blur_sigma": base.post.blur_sigma,
                     "image_score": base.post.image_score, "template": f"PTS-{args.k}"},
        "definitions": {
            "backbone": "extractor.backbone on a preprocessed batch (no resize/normalise, no L2 norm)",
            "features": "FeatureExtractor: preprocess + backbone + L2 normalisation",
            "score_features": "Inspector.score_features on those features: matching + fusion + blur + score",
            "predict": "Inspector.predict on decoded PIL images: everything above (the target's figure)",
            "score_features_nchw_template": "score_features with the template in contiguous NCHW memory, as "
                                            "Inspector held it before the pixel-major fix",
            "match_layerN/fuse/blur/score": "the steps of score_features timed one by one",
            "share_of_predict": "median part time / median predict time (parts timed separately, so they need not "
                                "sum to 1)",
        },
        "target": {"images_per_s": TARGET_IMAGES_PER_S, "measure": "images_per_s.predict"},
        "runs": runs,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
