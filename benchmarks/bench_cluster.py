"""Scale-out on Ray, measured side by side in one run on real MTD images (this machine: 2 cores).

* Extract and infer, three ways: local (1 torch thread), Ray with 1 worker (1 CPU) and Ray with 2 workers. The
  Ray-over-local ratio at 1 worker is the path's overhead (goal <= 1.15x); 2 over 1 worker is the scaling.
* A sharded ALL template 3x larger than the per-worker budget (``cluster.shard_bytes``): 3 shard actors, their
  throughput and each worker's peak memory against the template's size.

Variants alternate over ``--rounds`` rounds so that load from other processes hits them alike; figures are medians.
Actor start-up (loading the backbone, receiving a shard) is reported apart from the steady-state throughput.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cluster.py          # benchmarks/results/cluster.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cluster.py --quick  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from hetmm.config import ClusterConfig, FeatureConfig, ProductLine
from hetmm.core.features import FeatureExtractor
from hetmm.core.inspector import Inspector
from hetmm.core.templates import build_all
from hetmm.data.images import load_image
from hetmm.data.sources import fetch
from hetmm.io import write_json_atomic
from hetmm.pipeline.cluster import ExtractorPool, ShardedMatcher

RESULTS = Path(__file__).parent / "results" / "cluster.json"
DEFAULT_MIRROR = "/work/shared/data/mtd"


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _extract_local(extractor: FeatureExtractor, batches: list[list]) -> float:
    start = time.perf_counter()
    for batch in batches:
        extractor(batch)
    return time.perf_counter() - start


def _extract_pool(pool: ExtractorPool, batches: list[list]) -> float:
    start = time.perf_counter()
    for _ in pool.imap(batches):
        pass
    return time.perf_counter() - start


def _infer(inspector: Inspector, matcher, queries: list[list[torch.Tensor]]) -> float:
    """Seconds to match and finish every query batch; ``matcher`` None = in this process."""
    start = time.perf_counter()
    if matcher is None:
        for layers in queries:
            inspector.finish(inspector.match(layers))
    else:
        pending = []
        for layers in queries:
            pending.append(matcher.submit(layers))
            if len(pending) >= matcher.depth:
                inspector.finish(matcher.collect(pending.pop(0)))
        for refs in pending:
            inspector.finish(matcher.collect(refs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mirror", default=os.environ.get("HETMM_MIRROR", DEFAULT_MIRROR))
    parser.add_argument("--limit", type=int, default=40, help="MTD train images and dev test images per class")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.rounds = 8, 1
    torch.set_num_threads(1)  # the driver and the local reference compute like one worker

    with tempfile.TemporaryDirectory() as tmp:
        df = fetch("mtd", Path(tmp) / "mtd", mirror=args.mirror, subset="dev", limit=args.limit)
        images = {row.path: load_image(Path(tmp) / "mtd" / row.path) for row in df.itertuples()}
    train = [images[p] for p in df.loc[df["split"] == "train", "path"]]
    test = [images[p] for p in df.loc[df["split"] == "test", "path"]]
    features = FeatureConfig(batch_size=8)  # Lite0, 256 px, layers 1-3: the defaults
    line = ProductLine(name="mtd", features=features)
    extractor = FeatureExtractor(features, "cpu")
    train_layers = [torch.cat(parts) for parts in zip(*(extractor(b) for b in _batches(train, 8)))]
    template = build_all(train_layers, [str(i) for i in range(len(train))], {})
    inspector = Inspector(line, template, torch.device("cpu"))
    queries = [extractor(b) for b in _batches(test, 8)]
    batches = _batches(test, 8)

    # logical CPUs for scheduling: every actor computes with 1 thread, and only the measured ones are busy
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows: dict[str, dict[str, list[float]]] = {"extract": {}, "infer": {}}
    startup: dict[str, float] = {}
    pools, matchers = {}, {}
    for workers in (1, 2):
        config = ClusterConfig(address="auto", workers=workers)
        start = time.perf_counter()
        pools[workers] = ExtractorPool(features, config)
        _extract_pool(pools[workers], batches[: workers])  # every actor has loaded its backbone
        startup[f"extract, {workers} worker(s)"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        matchers[workers] = ShardedMatcher(template, line.matching, config)
        _infer(inspector, matchers[workers], queries[: workers])
        startup[f"infer, {workers} worker(s)"] = round(time.perf_counter() - start, 2)
    for _ in range(args.rounds):
        rows["extract"].setdefault("local, 1 thread", []).append(_extract_local(extractor, batches))
        rows["infer"].setdefault("local, 1 thread", []).append(_infer(inspector, None, queries))
        for workers in (1, 2):
            name = f"ray, {workers} worker(s)"
            rows["extract"].setdefault(name, []).append(_extract_pool(pools[workers], batches))
            rows["infer"].setdefault(name, []).append(_infer(inspector, matchers[workers], queries))
    del pools, matchers

    budget = template.nbytes // 3 + 1
    sharded = ShardedMatcher(template, line.matching, ClusterConfig(address="auto", workers=3, shard_bytes=budget))
    _infer(inspector, sharded, queries[:1])
    shard_seconds = [_infer(inspector, sharded, queries) for _ in range(args.rounds)]
    peaks = sharded.peak_rss_bytes()
    ray.shutdown()

    def summary(stage: str) -> dict:
        med = {name: statistics.median(values) for name, values in rows[stage].items()}
        return {"images": len(test), "seconds": {k: round(v, 3) for k, v in med.items()},
                "images_per_second": {k: round(len(test) / v, 2) for k, v in med.items()},
                "overhead_ray1_over_local": round(med["ray, 1 worker(s)"] / med["local, 1 thread"], 3),
                "speedup_2_over_1_worker": round(med["ray, 1 worker(s)"] / med["ray, 2 worker(s)"], 3)}

    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads_per_worker": 1, "ray": ray.__version__},
        "data": {"train_images": len(train), "test_images": len(test), "template_sheets": len(train)},
        "extract": summary("extract"), "infer": summary("infer"), "startup_seconds": startup,
        "sharded_template": {
            "template_bytes": template.nbytes, "shard_budget_bytes": budget, "shards": len(sharded.ranges),
            "images_per_second": round(len(test) / statistics.median(shard_seconds), 2),
            "peak_rss_bytes_per_worker": peaks,
            "largest_shard_bytes": max(sum(t[a:b].nbytes for t in template.layers) for a, b in sharded.ranges)},
        "rounds": args.rounds, "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cluster.py",
    }
    print(json.dumps(result, indent=2))
    if not args.quick:
        write_json_atomic(RESULTS, result)


if __name__ == "__main__":
    main()
