"""End-to-end CPU inference speed: backbone alone against the full ``Inspector.predict`` on real MTD images.

Target (issue): EfficientNet-Lite0 at 256 px with a PTS-60 template, layers 1-3, windows fwd 5/5/3 and
bwd 3/3/3: ``Inspector.predict`` (preprocess + backbone + matching + fusion + blur + score) at >= 8 images/s
on 2 CPU threads. Run for ``blocks: last`` (channels 24/40/112) and ``blocks: all`` (48/80/576), batch 1 and 8.

The template is PTS-60 built from ``--train`` MTD train (MT_Free) images' features, spread evenly over the
committed train list; queries are MTD dev test images of every class (decoded once beforehand, so JPEG
decoding is not timed). Each sample times every part once, interleaved (preprocess, backbone, features,
scoring of those features, predict, and scoring with the template in NCHW memory as before the pixel-major
fix), so load from other processes hits all parts alike; figures are medians over samples. With batch 1 a
sample is ``--batch1-images`` single-image calls.

The machine is shared, and OpenMP's default wait policy (libgomp spins ~300k iterations at every barrier)
makes 2 threads collapse when other processes keep the cores busy (measured 20x slower than 1 thread). So the
measurement runs in worker processes, one per *variant*, alternated over ``--rounds`` rounds so they see the
same load: ``2 threads`` (the environment as given), ``2 threads, OMP_WAIT_POLICY=PASSIVE`` and ``1 thread``.

    .venv/bin/python benchmarks/bench_inference.py            # writes benchmarks/results/inference.json
    .venv/bin/python benchmarks/bench_inference.py --quick    # fewer images and samples, smoke run
"""

from __future__ import annotations

import os
import sys

if "--worker" not in sys.argv:  # set-up only (template building), before torch loads libgomp; never timed
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from hetmm.config import FeatureConfig, MatchingConfig, PostConfig, ProductLine, TemplateConfig  # noqa: E402
from hetmm.core.features import FeatureExtractor, to_tensor  # noqa: E402
from hetmm.core.inspector import Inspector  # noqa: E402
from hetmm.core.matching import match_layer  # noqa: E402
from hetmm.core.scoring import fuse_layers, gaussian_blur, image_scores  # noqa: E402
from hetmm.core.templates import TemplateSet, build_pts, load_template, save_template  # noqa: E402
from hetmm.data.images import load_image  # noqa: E402
from hetmm.data.splits import MTD_CLASSES, load_mtd_split  # noqa: E402
from hetmm.io import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "inference.json"
TARGET_IMAGES_PER_S = 8.0
DEFAULT_MIRROR = "/work/shared/data/mtd"
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
# name -> (torch threads, OpenMP environment)
VARIANTS = {
    "2 threads": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, {}),
}


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


def template_path(workdir: Path, blocks: str, k: int, n_train: int) -> Path:
    return workdir / f"pts{k}_{blocks}_{n_train}.pt"


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


# --------------------------------------------------------------------------- worker: one variant's samples


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
def samples_per_image(line: ProductLine, inspector: Inspector, nchw: Inspector, queries: list, batch: int,
                      samples: int, batch1_images: int, offset: int) -> dict[str, list[float]]:
    """Per part, one seconds-per-image figure per interleaved sample."""
    extractor = inspector.extractor
    calls = 1 if batch > 1 else batch1_images
    out: dict[str, list[float]] = {}
    cursor = offset

    def take() -> list:
        nonlocal cursor
        picked = [queries[(cursor + i) % len(queries)] for i in range(batch)]
        cursor += batch
        return picked

    warm = take()  # warm-up: allocator, thread pool, first-call paths
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
        for f in feats:
            for key, value in score_parts(inspector, f).items():
                times[key] = times.get(key, 0.0) + value
        for key, value in times.items():
            out.setdefault(key, []).append(value / (calls * batch))
    return out


def profile(inspector: Inspector, queries: list, batch: int, top: int = 15) -> list[dict]:
    """torch.profiler over one ``predict`` of ``batch`` images: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    images = queries[:batch]
    inspector.predict(images)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        inspector.predict(images)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_ms_per_image": round(e.self_cpu_time_total / 1e3 / batch, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    _, queries = mtd_images(Path(args.mirror), 0, args.queries)
    out = {"threads": torch.get_num_threads(), "omp_env": {k: os.environ.get(k) for k in OMP_KEYS}, "runs": {}}
    for blocks in args.blocks:
        line = issue_line(blocks, args.k)
        extractor = FeatureExtractor(line.features, "cpu")
        tset = load_template(template_path(Path(args.workdir), blocks, args.k, args.train))
        inspector = Inspector(line, tset, "cpu", extractor)
        nchw = Inspector(line, tset, "cpu", extractor)
        nchw.template = TemplateSet(layers=[t.contiguous() for t in tset.layers], meta=tset.meta, easy=tset.easy)
        for batch in args.batches:
            key = f"{blocks}/{batch}"
            if args.profile:
                out["runs"][key] = {"profile_top_ops": profile(inspector, queries, batch)}
            else:
                out["runs"][key] = samples_per_image(line, inspector, nchw, queries, batch, args.samples,
                                                     args.batch1_images, offset=args.round * 7)
    return out


# --------------------------------------------------------------------------- parent


def run_worker(args: argparse.Namespace, variant: str, samples: int, round_: int, profile_: bool = False) -> dict:
    threads, omp = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS} | omp | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--samples", str(samples),
               "--round", str(round_), "--mirror", args.mirror, "--workdir", args.workdir, "--train", str(args.train),
               "--k", str(args.k), "--queries", str(args.queries), "--batch1-images", str(args.batch1_images),
               "--batches", *map(str, args.batches), "--blocks", *args.blocks] + (["--profile"] if profile_ else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"worker {variant!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(per_image: dict[str, list[float]]) -> dict:
    ms = {key: 1e3 * statistics.median(values) for key, values in per_image.items()}
    predict = ms["predict"]
    return {
        "samples": len(per_image["predict"]),
        "ms_per_image": {k: round(v, 2) for k, v in ms.items()},
        "ms_per_image_range": {k: [round(1e3 * min(v), 2), round(1e3 * max(v), 2)] for k, v in per_image.items()},
        "images_per_s": {
            "backbone": round(1e3 / ms["backbone"], 2),
            "features": round(1e3 / ms["features"], 2),
            "predict": round(1e3 / predict, 2),
            "predict_with_nchw_template": round(1e3 / (ms["features"] + ms["score_features_nchw_template"]), 2),
        },
        "share_of_predict": {
            "preprocess": round(ms["preprocess"] / predict, 3),
            "backbone": round(ms["backbone"] / predict, 3),
            "matching_fusion_blur_score": round(ms["score_features"] / predict, 3),
        },
        "nchw_over_pixel_major_scoring": round(ms["score_features_nchw_template"] / ms["score_features"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=os.environ.get("HETMM_MIRROR", DEFAULT_MIRROR), help="MTD mirror folder")
    parser.add_argument("--workdir", default="/tmp/hetmm-bench-inference", help="templates are kept here")
    parser.add_argument("--train", type=int, default=200, help="train images for the PTS template")
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--queries", type=int, default=48, help="distinct query images (cycled)")
    parser.add_argument("--samples", type=int, default=9, help="interleaved samples per variant and setting")
    parser.add_argument("--rounds", type=int, default=3, help="variants alternate this many times")
    parser.add_argument("--batch1-images", type=int, default=8, help="single-image calls per batch-1 sample")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--blocks", nargs="+", default=["last", "all"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--quick", action="store_true", help="60 train images, 16 queries, 2 rounds of 1 sample")
    # internal (worker processes)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.train, args.queries, args.samples, args.rounds = 60, 16, 2, 2
    if args.worker:
        print(json.dumps(worker(args)))
        return

    torch.set_num_threads(2)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    train_images, _ = mtd_images(Path(args.mirror), args.train, 0)
    templates = {}
    for blocks in args.blocks:
        line = issue_line(blocks, args.k)
        extractor = FeatureExtractor(line.features, "cpu")
        tset, info = build_template(extractor, train_images, args.k, line.features.batch_size)
        save_template(template_path(workdir, blocks, args.k, args.train), tset)
        templates[blocks] = {**info, "channels": extractor.channels}
        print(f"blocks={blocks}: channels {extractor.channels}, PTS-{args.k} from {info['train_images']} MTD train "
              f"images: {info['bytes'] / 2**20:.1f} MiB, built in {info['build_pts_s']} s", flush=True)

    per_round = max(1, -(-args.samples // args.rounds))
    raw: dict[str, dict[str, dict[str, list[float]]]] = {v: {} for v in args.variants}
    meta: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for variant in args.variants:
            result = run_worker(args, variant, per_round, round_)
            meta[variant] = {"threads": result["threads"], "omp_env": result["omp_env"]}
            for key, parts in result["runs"].items():
                for part, values in parts.items():
                    raw[variant].setdefault(key, {}).setdefault(part, []).extend(values)
        print(f"round {round_ + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)

    runs = []
    print(f"{'variant':<36} {'blocks':<5} {'B':>2} {'backbone':>9} {'predict':>8} {'ms/img':>7} = {'prep':>5} + "
          f"{'bbone':>5} + {'score':>5} [{'L1':>4} {'L2':>4} {'L3':>4} {'blur':>4}] {'NCHW':>6} target")
    for variant in args.variants:
        for blocks in args.blocks:
            for batch in args.batches:
                row = {"variant": variant, **meta[variant], "blocks": blocks, "batch": batch,
                       "channels": templates[blocks]["channels"], **summarise(raw[variant][f"{blocks}/{batch}"])}
                row["target_met"] = row["images_per_s"]["predict"] >= TARGET_IMAGES_PER_S
                runs.append(row)
                ms, ips = row["ms_per_image"], row["images_per_s"]
                print(f"{variant:<36} {blocks:<5} {batch:>2} {ips['backbone']:>9.1f} {ips['predict']:>8.1f} "
                      f"{ms['predict']:>7.1f} = {ms['preprocess']:>5.1f} + {ms['backbone']:>5.1f} + "
                      f"{ms['score_features']:>5.1f} [{ms['match_layer1']:>4.1f} {ms['match_layer2']:>4.1f} "
                      f"{ms['match_layer3']:>4.1f} {ms['blur']:>4.1f}] {row['nchw_over_pixel_major_scoring']:>5.2f}x "
                      f"{'met' if row['target_met'] else 'MISSED'}", flush=True)
    profiles = {}
    if not args.no_profile:
        variant = "2 threads, OMP_WAIT_POLICY=PASSIVE"  # the steadiest 2-thread variant here
        prof_args = argparse.Namespace(**{**vars(args), "batches": [max(args.batches)]})
        profiles = {"variant": variant, "batch": max(args.batches),
                    "top_ops": {k.split("/")[0]: v["profile_top_ops"]
                                for k, v in run_worker(prof_args, variant, 1, 0, profile_=True)["runs"].items()}}
        for blocks, top in profiles["top_ops"].items():
            print(f"profile {blocks}, B={profiles['batch']} ({variant}), ms/img by self CPU time: " +
                  ", ".join(f"{e['op']} {e['self_ms_per_image']}" for e in top[:8]), flush=True)

    write_json_atomic(RESULTS, {
        "benchmark": "inference",
        "command": "python benchmarks/bench_inference.py" + (" --quick" if args.quick else ""),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "threads", "round", "profile")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"torch": torch.__version__},
        "settings": {"backbone": "efficientnet_lite0", "image_size": [256, 256], "layers": [1, 2, 3],
                     "forward_windows": [5, 5, 3], "backward_windows": [3, 3, 3], "alphas": [0.5, 0.5, 0.5],
                     "weights": [1.0, 1.0, 1.0], "blur_sigma": 4.0, "image_score": "max",
                     "template": f"PTS-{args.k}", "queries": "MTD dev test images, all classes"},
        "templates": templates,
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
            "variant": "worker process settings: torch threads and the OpenMP wait policy environment",
        },
        "target": {"images_per_s": TARGET_IMAGES_PER_S, "measure": "images_per_s.predict"},
        "runs": runs,
        "profile": profiles,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
