"""COVER templates: greedy k-center per pixel, on hand-made vectors whose coverage is known."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_templates import FEATURE, clustered, ids, unit

from hetmm.core.templates import build_cover, build_pts, hot_update, load_template, save_template
from hetmm.core.templates.cover import coverage_radius, farthest_first
from hetmm.errors import TemplateMismatchError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def at_angles(angles_deg: list[float], c: int = 8, h: int = 2, w: int = 3) -> torch.Tensor:
    """``[N, C, h, w]`` unit vectors in the plane of the first two channels, at the given angles (same per pixel)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    x = torch.zeros(len(a), c, h, w, dtype=torch.float64)
    x[:, 0], x[:, 1] = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    return x.float()


def test_three_clusters_at_known_angles_are_covered_by_one_vector_each():
    # clusters around 0, 90 and 180 degrees, spread +-5 degrees: K=3 takes one per cluster and the radius is at
    # most 1 - cos(10 deg) (a vector's distance to the farthest of its cluster); K=1 leaves 90 degrees or more
    angles = [0, 3, -5, 90, 94, 86, 180, 176, 184]
    x = at_angles(angles)
    three = build_cover([x], 3, ids("a", 9), FEATURE, progress=False)
    chosen = {round(math.degrees(math.atan2(float(v[1, 0, 0]), float(v[0, 0, 0])))) % 360 // 60
              for v in three.layers[0]}
    assert len(chosen) == 3  # one sheet in each cluster
    assert float(three.radius[0].max()) <= 1 - math.cos(math.radians(10)) + 1e-6
    one = build_cover([x], 1, ids("a", 9), FEATURE, progress=False)
    assert float(one.radius[0].min()) >= 1 - math.cos(math.radians(95)) - 1e-6
    # the recorded radius is what a fresh measurement finds
    for t in (one, three):
        assert torch.allclose(coverage_radius(x, t.layers[0]).float(), t.radius[0], atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_radius_is_within_twice_the_best_in_angle(seed):
    x = clustered(9, 6, 1, 1, modes=4, noise=0.8, seed=seed)[:, :, 0, 0].double()
    cos = (x @ x.T).clamp(-1, 1)
    for k in (1, 2, 3, 4):
        index, radius, _ = farthest_first(cos[None], torch.tensor([0]), k)
        best = min(float((1 - cos[:, list(s)].max(dim=1).values).max())
                   for s in itertools.combinations(range(9), k))
        assert math.acos(1 - float(radius)) <= 2 * math.acos(1 - best) + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_batched_over_pixels_equals_pixel_by_pixel(device):
    x = clustered(30, 16, 5, 4, modes=5, noise=0.7, seed=3).to(device)
    batched = build_cover([x], 7, ids("a", 30), FEATURE, progress=False)
    single = build_cover([x], 7, ids("a", 30), FEATURE, progress=False, chunk=1)
    assert torch.equal(batched.layers[0], single.layers[0]) and torch.equal(batched.radius[0], single.radius[0])
    if device == "cuda":  # the same choice as on the CPU
        cpu = build_cover([x.cpu()], 7, ids("a", 30), FEATURE, progress=False)
        assert torch.equal(cpu.layers[0], batched.layers[0].cpu())


def test_cover_beats_pts_coverage_at_equal_size_and_reports_it():
    x = clustered(60, 24, 6, 6, modes=12, noise=0.4, seed=7)
    cover = build_cover([x], 10, ids("a", 60), FEATURE, progress=False)
    pts = build_pts([x], 10, ids("a", 60), FEATURE, progress=False)
    assert coverage_radius(x, cover.layers[0]).mean() < coverage_radius(x, pts.layers[0]).mean()
    summary = cover.meta["coverage"][0]
    assert summary["max"] == pytest.approx(float(cover.radius[0].max()), abs=1e-5) and summary["mean_sheets"] == 10


def test_a_target_radius_stops_each_pixel_when_covered_and_keeps_the_neediest_count():
    x = clustered(40, 16, 4, 4, modes=3, noise=0.3, seed=1)
    # the greedy order is the same with or without a target, so K=10's worst radius is reached by 10 choices
    target = float(build_cover([x], 10, ids("a", 40), FEATURE, progress=False).radius[0].max())
    adaptive = build_cover([x], 20, ids("a", 40), FEATURE, progress=False, target=target)
    sheets = adaptive.layers[0].shape[0]
    assert sheets <= 10 and adaptive.meta["sheets"] == sheets
    radius = coverage_radius(x, adaptive.layers[0])
    assert (radius <= target + 1e-6).all()  # every pixel reached it (within the cap)
    assert adaptive.meta["coverage"][0]["mean_sheets"] <= sheets


def test_hot_update_changes_nothing_for_covered_images_and_bounds_the_radius_otherwise():
    old = clustered(30, 16, 4, 4, modes=3, noise=0.3, seed=2)
    tset = build_cover([old], 6, ids("a", 30), FEATURE, progress=False)
    # near-copies of training images lie within every pixel's radius: nothing changes
    copies = unit(old[:5] + 1e-4 * torch.randn(5, 16, 4, 4, generator=torch.Generator().manual_seed(0)))
    same = hot_update(tset, [copies], ids("b", 5))
    assert torch.equal(same.layers[0], tset.layers[0]) and torch.equal(same.radius[0], tset.radius[0])
    assert same.meta["history"][-1]["pixels_changed"] == 0 and same.meta["n_images"] == 35

    # images of a new mode enter; the recorded radius bounds the measured one over every image, old and new
    fresh = clustered(10, 16, 4, 4, modes=1, noise=0.3, seed=99)
    grown = hot_update(tset, [fresh], ids("c", 10))
    every = torch.cat([old, fresh])
    measured = coverage_radius(every, grown.layers[0]).float()
    assert (measured <= grown.radius[0] + 1e-5).all()
    assert grown.meta["history"][-1]["pixels_changed"] == 16
    before = coverage_radius(every, tset.layers[0])
    rebuild = build_cover([every], 6, ids("a", 30) + ids("c", 10), FEATURE, progress=False)
    assert measured.mean() < before.mean()  # the new mode is covered now ...
    assert measured.mean() <= 2.5 * rebuild.radius[0].mean()  # ... nearly as well as by a rebuild
    assert measured.max() <= 1 - math.cos(2 * math.acos(1 - float(rebuild.radius[0].max()))) + 0.35


def test_cover_file_round_trip_checks_the_radius(tmp_path):
    tset = build_cover([clustered(12, 8, 3, 3, seed=4)], 4, ids("a", 12), FEATURE, progress=False)
    path = tmp_path / "t.pt"
    save_template(path, tset)
    back = load_template(path)
    assert torch.equal(back.radius[0], tset.radius[0]) and back.meta["content_hash"] == tset.meta["content_hash"]
    payload = torch.load(path, weights_only=True)
    payload["radius"][0][0, 0] += 0.5
    torch.save(payload, path)
    with pytest.raises(TemplateMismatchError, match="content hash"):
        load_template(path)


def test_the_ablation_table_sets_cover_beside_pts_and_patch_matching_over_a_cover_bank(demo_tree, tmp_path):
    import pandas as pd

    from conftest import folder_line, run_stages, write_params

    root = tmp_path / "run"
    line = folder_line(demo_tree, kind="ALL", report={"ablation": True, "ablation_sizes": [4, 8], "overlays": 0})
    run_stages(write_params(root, {"line": line}), "line", root)
    table = pd.read_csv(root / "reports/line/ablation.csv").set_index("variant")
    for name in ("template=ALL", "template=PTS-4", "template=COVER-4", "template=COVER-8",
                 "mode=patch template=COVER-8", "mode=patch"):
        assert 0 <= table.loc[name, "image_auroc"] <= 100 and 0 <= table.loc[name, "pixel_auroc"] <= 100, name
    assert table.loc["template=COVER-8", "sheets"] == 8 and table.loc["template=COVER-8", "build_seconds"] >= 0
    assert pd.isna(table.loc["mode=patch", "build_seconds"])
