"""Scale-out on a real Ray cluster started by the test: a head and two worker nodes on this machine.

Distributed extract, PTS and infer equal the local run at the same torch thread count (1: each Ray worker computes
with one thread, and reductions split over threads round differently); a 3-shard template min-merges exactly;
a killed actor is restarted and its work retried, and past the retries the stage fails and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import folder_line, run_stages, write_params
from hetmm.config import ClusterConfig

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from hetmm.core.templates import load_template  # noqa: E402
from hetmm.pipeline import cluster as hcluster  # noqa: E402
from hetmm.pipeline.cluster import ShardedMatcher, WorkerLost, shard_ranges  # noqa: E402
from hetmm.pipeline.feature_cache import FeatureCache  # noqa: E402
from hetmm.pipeline.models import load_scorer  # noqa: E402
from hetmm.pipeline.provenance import FeatureKey  # noqa: E402

pytestmark = pytest.mark.slow  # a real Ray cluster started by the tests


@pytest.fixture(scope="module")
def ray_cluster():
    """Three nodes (1 CPU each): the actors of one stage land on different nodes."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the local reference computes like a worker
    yield nodes
    torch.set_num_threads(threads)
    ray.shutdown()
    nodes.shutdown()


def _line(tree: Path, kind: str) -> dict:
    return folder_line(tree, backbone="efficientnet_lite0", size=64, kind=kind, k=6, report={"overlays": 0})


def _run(tmp: Path, name: str, tree: Path, kind: str, cluster: dict | None) -> Path:
    root = tmp / name
    params = write_params(root, {"line": _line(tree, kind)})
    if cluster is not None:
        import yaml

        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["cluster"] = cluster
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        from hetmm.config import load_params

        params = load_params(root / "params.yaml")
    run_stages(params, "line", root)
    return root


def _features(root: Path) -> dict[str, list[torch.Tensor]]:
    out = {}
    for path in sorted((root / "features/line").rglob("*.pt")):
        out[path.name] = [t for t in torch.load(path, weights_only=True)["layers"]]
    return out


@pytest.mark.parametrize("kind", ["ALL", "PTS"])
def test_distributed_stages_equal_the_local_run(ray_cluster, demo_tree, tmp_path, kind):
    local = _run(tmp_path, "local", demo_tree, kind, None)
    # a template budget that needs 3 shards: every distance is min-merged across actors
    size = load_template(local / "models/line/template.pt").nbytes
    remote = _run(tmp_path, "remote", demo_tree, kind, {"address": "auto", "workers": 3, "shard_bytes": size // 3 + 1})

    a, b = _features(local), _features(remote)
    assert a.keys() == b.keys() and len(a) == 50
    assert max(float((x - y).abs().max()) for k in a for x, y in zip(a[k], b[k])) <= 1e-6
    ta, tb = load_template(local / "models/line/template.pt"), load_template(remote / "models/line/template.pt")
    assert all(torch.equal(x, y) for x, y in zip(ta.layers, tb.layers))  # PTS: the same choice at every pixel
    sa = pd.read_csv(local / "outputs/line/scores.csv")
    sb = pd.read_csv(remote / "outputs/line/scores.csv")
    assert np.abs(sa["score"] - sb["score"]).max() <= 1e-6
    threshold = json.loads((local / "models/line/threshold.json").read_text())["threshold"]
    assert ((sa["score"] >= threshold) == (sb["score"] >= threshold)).all()
    infer = json.loads((remote / "reports/line/infer.json").read_text())
    assert infer["cluster"] == {"shards": 3, "replicas": 1, "actors": 3}


def _matcher_setup(tmp_path: Path, demo_tree: Path):
    root = _run(tmp_path, "base", demo_tree, "ALL", None)
    from hetmm.config import load_params
    from hetmm.pipeline.line import StageRun

    ctx = StageRun.for_line(load_params(root / "params.yaml"), "line", root, "cpu", progress=False, stage="infer")
    inspector = load_scorer(ctx.line, ctx.paths, "cpu")
    cache = FeatureCache(ctx.paths.features, FeatureKey.of(ctx.line.features))
    test = pd.read_csv(root / "outputs/line/scores.csv")
    layers, _ = cache.load(list(test["sha256"][:8]))
    return ctx, inspector, layers


def _kill(actor) -> None:
    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)


def test_a_killed_worker_is_restarted_and_its_shard_retried(ray_cluster, demo_tree, tmp_path):
    ctx, inspector, layers = _matcher_setup(tmp_path, demo_tree)
    expected = inspector.match(layers)
    budget = inspector.template.nbytes // 3 + 1
    config = ClusterConfig(address="auto", workers=3, shard_bytes=budget, max_retries=2)
    matcher = ShardedMatcher(inspector.template, ctx.line.matching, config)
    assert len(shard_ranges(inspector.template, budget)) == 3
    refs = matcher.submit(layers)
    _kill(matcher.actors[1])  # mid-stage: its task is running or queued
    found = matcher.collect(refs)
    for x, y in zip(expected.forward + expected.backward, found.forward + found.backward):
        assert (x is None and y is None) or torch.allclose(x, y, atol=1e-6)


def test_past_its_retries_a_dead_worker_fails_the_stage_and_nothing_is_written(ray_cluster, demo_tree, tmp_path,
                                                                               monkeypatch):
    ctx, inspector, layers = _matcher_setup(tmp_path, demo_tree)
    config = ClusterConfig(address="auto", workers=1, max_retries=0)
    matcher = ShardedMatcher(inspector.template, ctx.line.matching, config)
    _kill(matcher.actors[0])
    with pytest.raises(WorkerLost, match="retries are used up"):
        matcher.match(layers)

    # the infer stage with such a matcher: it fails, and neither outputs nor its record are replaced
    outputs = ctx.paths.outputs / "scores.csv"
    before = outputs.read_bytes(), (ctx.paths.reports / "infer.json").read_bytes()

    class Dying(ShardedMatcher):
        def __init__(self, *args):
            super().__init__(*args)
            _kill(self.actors[0])

    monkeypatch.setattr(hcluster, "ShardedMatcher", lambda t, m, c: Dying(t, m, config))
    from hetmm.config import load_params
    from hetmm.pipeline.line import StageRun
    from hetmm.pipeline.stages import stage

    root = tmp_path / "base"
    (root / "outputs/line/matches.pt").unlink()  # else every distance is reused and no worker is asked
    params = dataclasses.replace(load_params(root / "params.yaml"), cluster=config)
    with pytest.raises(WorkerLost):
        stage("infer")(StageRun.for_line(params, "line", root, "cpu", progress=False, stage="infer"))
    assert (outputs.read_bytes(), (ctx.paths.reports / "infer.json").read_bytes()) == before


def test_shards_fit_the_budget_and_cover_every_sheet():
    from hetmm.core.templates import build_all

    layers = [torch.nn.functional.normalize(torch.randn(10, 4, 3, 3), dim=1),
              torch.nn.functional.normalize(torch.randn(10, 8, 2, 2), dim=1)]
    template = build_all(layers, [str(i) for i in range(10)], {})
    per_sheet = sum(t[0].nbytes for t in template.layers)
    for budget in (1, per_sheet, 3 * per_sheet - 1, 3 * per_sheet, template.nbytes, 10 * template.nbytes):
        ranges = shard_ranges(template, budget)
        assert ranges[0][0] == 0 and ranges[-1][1] == 10 and all(a < b for a, b in ranges)
        assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert all((b - a) * per_sheet <= max(budget, per_sheet) for a, b in ranges), (budget, ranges)
    assert len(shard_ranges(template, template.nbytes // 3 + 1)) == 4  # 3.3 sheets' worth: 3 per shard
