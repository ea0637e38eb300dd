"""Report artefacts: overlays, panels, PIL plots, plot CSVs, tables, model cards, the vega template."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetmm.pipeline import evaluation
from hetmm.report import model_card, overlays, plots
from hetmm.report.overlays import GT_COLOUR, PRED_COLOUR, OverlayCase


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _square(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


# ----------------------------------------------------------------------------- overlays


def test_colormap_shapes_and_ends() -> None:
    rgb = overlays.colormap(np.linspace(0, 1, 12).reshape(3, 4))
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 0, 128) and tuple(rgb[-1, -1]) == (128, 0, 0)  # jet: dark blue .. dark red
    assert tuple(overlays.colormap(np.array([2.0, -1.0]), "inferno")[0]) == (252, 255, 164)  # clipped to 1
    with pytest.raises(ValueError, match="unknown colormap"):
        overlays.colormap(np.zeros(2), "viridis")


def test_overlay_blends_and_outlines_mask_borders() -> None:
    image = np.full((32, 40, 3), 100, dtype=np.uint8)
    gt = _square((32, 40), slice(8, 20), slice(10, 30))
    pred = _square((32, 40), slice(24, 30), slice(2, 8))
    out = overlays.overlay(image, np.zeros((32, 40), np.float32), gt, pred)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (40, 32)
    arr = np.asarray(out)
    border = gt & ~_square((32, 40), slice(9, 19), slice(11, 29))
    assert (arr[border] == GT_COLOUR).all()
    assert (arr[~border & ~pred] != GT_COLOUR).any(axis=-1).all()
    pred_border = pred & ~_square((32, 40), slice(25, 29), slice(3, 7))
    assert (arr[pred_border] == PRED_COLOUR).all()
    # a constant map sits at the bottom of the scale: 0.5 * grey 100 + 0.5 * jet(0) = (50, 50, 114)
    assert tuple(arr[14, 20]) == (50, 50, 114)


def test_overlay_resizes_map_and_mask_and_closes_regions_at_the_border() -> None:
    image = Image.new("L", (64, 48), 30)  # any PIL mode is accepted
    amap = torch.linspace(0, 1, 12 * 16).reshape(12, 16)  # coarser than the image
    mask = _square((12, 16), slice(0, 6), slice(0, 8))  # touches the top-left corner
    arr = np.asarray(overlays.overlay(image, amap, mask))
    assert arr.shape == (48, 64, 3)
    assert (arr[0, :32] == GT_COLOUR).all() and (arr[:24, 0] == GT_COLOUR).all()
    assert (arr[24:, 40:] != GT_COLOUR).any(axis=-1).all()
    with pytest.raises(ValueError, match="uint8"):
        overlays.overlay(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4)))


def test_panel_layout() -> None:
    image = np.zeros((32, 40, 3), dtype=np.uint8)
    out = overlays.panel(image, np.random.default_rng(0).random((32, 40)), None, 0.75, "crack/003", tile=64)
    assert out.size == (3 * 80, 64 + 92)


def test_save_overlays_writes_pngs_atomically(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    cases = [
        OverlayCase("crack/001", image, rng.random((16, 16)), _square((16, 16), slice(4, 9), slice(4, 9)), score=0.9),
        OverlayCase("good 002", image, np.zeros((16, 16))),
    ]
    paths = overlays.save_overlays(tmp_path / "overlays", cases, threshold=0.5)
    assert [p.name for p in paths] == ["crack_001.png", "good_002.png"]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["crack_001.png", "good_002.png"]
    # the shared colour scale makes the all-zero map the bottom colour, not a stretched one
    good = _pixels(paths[1])
    assert (good == good[0, 0]).all()
    # threshold 0.5 outlines the predicted region in the first case
    assert (_pixels(paths[0]) == PRED_COLOUR).all(axis=-1).any()
    panels = overlays.save_overlays(tmp_path / "panels", cases[:1], kind="panel")
    assert _pixels(panels[0]).shape[1] == 3 * 256
    with pytest.raises(ValueError, match="unique"):
        overlays.save_overlays(tmp_path / "dup", [cases[0], OverlayCase("crack:001", image, np.zeros((16, 16)))])


# ----------------------------------------------------------------------------- plots


def test_curve_png_is_a_png_of_the_requested_size(tmp_path: Path) -> None:
    curves = {"HETMM": ([0, 0.1, 0.5, 1], [0, 0.7, 0.95, 1]), "single point": ([0.5], [0.5])}
    path = plots.curve_png(tmp_path / "roc.png", curves, "FPR", "TPR", "ROC", xlim=(0, 1), diagonal=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.size == (640, 480) and img.mode == "RGB"
    assert (_pixels(path) == (31, 119, 180)).all(axis=-1).any()  # the first curve's colour is drawn
    small = plots.curve_png(tmp_path / "t.png", {"t": ([1, 2, 4], [3, 9, 30])}, "n", "ms", "t", size=(300, 200))
    assert _pixels(small).shape == (200, 300, 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(ValueError, match="equal length"):
        plots.curve_png(tmp_path / "bad.png", {"a": ([0, 1], [0])}, "x", "y", "t")


def test_nice_ticks() -> None:
    assert plots._nice_ticks(0.0, 1.0) == ([0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0], 1)
    ticks, decimals = plots._nice_ticks(120.0, 3100.0)
    assert ticks[0] == 500 and ticks[-1] == 3000 and decimals == 0


def test_write_plot_csv(tmp_path: Path) -> None:
    path = plots.write_plot_csv(tmp_path / "roc.csv", {"fpr": [0.0, 0.5], "tpr": np.array([0.25, float("nan")])})
    assert path.read_text() == "fpr,tpr\n0.0,0.25\n0.5,\n"
    with pytest.raises(ValueError, match="equal length"):
        plots.write_plot_csv(tmp_path / "bad.csv", {"a": [1], "b": [1, 2]})


# ----------------------------------------------------------------------------- tables and cards


def test_markdown_table() -> None:
    rows = [{"type": "crack", "auroc": 98.5, "n": 3}, {"type": "a|b", "auroc": None}]
    assert model_card.markdown_table(rows) == (
        "| type | auroc | n |\n| --- | ---: | ---: |\n| crack | 98.5 | 3 |\n| a\\|b | n/a |  |\n"
    )
    assert model_card.markdown_table(rows, columns=["n"]) == "| n |\n| ---: |\n| 3 |\n|  |\n"


def test_per_group_metrics_against_all_good_images() -> None:
    scores = [0.1, 0.2, 0.3, 0.9, 0.25, 0.15]
    labels = [0, 0, 0, 1, 1, 1]
    groups = ["good", "good", "good", "crack", "crack", "hole"]
    rows = evaluation.per_group_metrics(scores, labels, groups)
    assert [r["group"] for r in rows] == ["crack", "hole"]
    # crack {0.9, 0.25} vs good {0.1, 0.2, 0.3}: 5 of 6 pairs; hole {0.15}: 1 of 3
    assert rows[0]["image_auroc"] == pytest.approx(500 / 6) and rows[0]["n_images"] == 2
    assert rows[1]["image_auroc"] == pytest.approx(100 / 3) and rows[1]["n_good"] == 3

    maps = np.zeros((6, 8, 8), np.float32)
    masks = np.zeros((6, 8, 8), bool)
    masks[3:, 2:4, 2:4] = True
    maps[3:5][masks[3:5]] = 1.0  # crack pixels found, hole pixels missed
    rows = evaluation.per_group_metrics(scores, labels, groups, maps, masks)
    assert rows[0]["pixel_auroc"] == 100.0 and rows[1]["pixel_auroc"] == pytest.approx(50.0)
    assert rows[0]["aupro"] == pytest.approx(100.0)
    # no good images: AUROC is undefined, not an error
    assert evaluation.per_group_metrics([0.5], [1], ["crack"])[0]["image_auroc"] is None


def test_model_card_renders_hashes_tables_and_strict_json(tmp_path: Path) -> None:
    info = {
        "title": "HETMM on MVTec bottle",
        "data_manifest_sha256": "a" * 64,
        "template_sha256": "b" * 64,
        "threshold": np.float32(0.625),
        "params": {"backbone": "wrn50_2", "alpha": 0.3, "layers": [1, 2, 3]},
        "metrics": {"image_auroc": 99.5, "aupro": float("nan")},
        "per_defect_type": [{"group": "broken_large", "image_auroc": 100.0}],
        "timings_s": {"templates": {"total": 12.5}, "inference": {"total": 3.25, "per_image": 0.04}},
        "decision": {"rule": "f1_max", "confusion": {"tp": 3, "fp": 1}, "layers": {"1": {"shape": [60, 24]}}},
        "ablation": [],
    }
    md, js = tmp_path / "card.md", tmp_path / "card.json"
    model_card.model_card(md, js, info)
    text = md.read_text()
    assert text.startswith("# HETMM on MVTec bottle\n")
    assert "a" * 64 in text and "b" * 64 in text and "| threshold | 0.625 |" in text
    assert "## Per defect type" in text and "| broken_large | 100 |" in text
    assert "| inference | 3.25 | 0.04 |" in text and "| aupro | n/a |" in text
    # flat dicts and lists go inline, deeper nesting under sub-headings, empty values say so
    assert "| confusion | tp: 3; fp: 1 |" in text and "### Layers" in text and "| 1 | 60, 24 |" in text
    assert "## Ablation\n\n(none)" in text
    card = json.loads(js.read_text())  # strict JSON: NaN became null
    assert card["template_sha256"] == "b" * 64 and card["metrics"]["aupro"] is None
    assert card["code_version"] and card["title"] == "HETMM on MVTec bottle"
    first = md.read_bytes()
    model_card.model_card(md, js, info)
    assert md.read_bytes() == first  # no timestamps: reproducible for DVC


def test_code_version_is_the_commit_and_says_whether_hetmm_sources_are_modified(tmp_path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True,
                              env=env).stdout.strip()

    (tmp_path / "hetmm").mkdir()
    (tmp_path / "hetmm/core.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "code")
    commit = git("rev-parse", "HEAD")
    assert len(commit) == 40 and model_card.code_version(tmp_path) == commit
    (tmp_path / "dvc.lock").write_text("stages: {extract: {}}\n")  # what earlier stages do during a run
    assert model_card.code_version(tmp_path) == commit
    (tmp_path / "hetmm/core.py").write_text("x = 2\n")
    assert model_card.code_version(tmp_path) == f"{commit} (hetmm/ modified)"
    assert model_card.code_version(tmp_path / "hetmm").startswith("hetmm ")  # not a checkout root


# ----------------------------------------------------------------------------- vega template


def test_vega_template_is_offline_and_dvc_compatible() -> None:
    text = resources.files("hetmm.resources").joinpath("vega_offline.html").read_text(encoding="utf-8")
    assert text.count("{plot_divs}") == 1 and "{scripts}" not in text
    assert "<script src" not in text.replace(" ", "") and "jsdelivr" not in text
    assert text.count('<script type="text/javascript">') == 3 and "vegaEmbed" in text
    for name in ("vega 5.", "vega-lite 5.", "vega-embed 6."):
        assert f"/*! {name}" in text  # licence header kept with each library
    assert len(text) > 500_000
    html = pytest.importorskip("dvc_render.html")
    page = html.HTML(text).with_scripts('<script src="https://cdn.example/vega.js"></script>')
    out = page.with_element('<div id="roc"></div>').embed()
    assert '<div id="roc"></div>' in out and "cdn.example" not in out


def test_overlay_count_is_the_number_of_panels_shared_out_worst_first() -> None:
    defects, good = [4, 7, 9, 2], [1, 5, 3]  # defects by rising score, good images by falling score
    assert overlays.picks(6, defects, good) == ([4, 7], [1, 5], [2, 9])
    assert overlays.picks(4, defects, good) == ([4, 7], [1], [2])
    assert overlays.picks(1, defects, good) == ([4], [], [])
    picked = overlays.picks(20, defects, good)  # more than there are: each image once
    assert sorted(i for group in picked for i in group) == sorted(defects + good)
    assert overlays.picks(3, [8], []) == ([8], [], [])


def test_report_curves_mark_the_deployed_operating_point_on_the_roc(tmp_path: Path) -> None:
    from hetmm.core.metrics import roc_points
    from hetmm.report.plots import _PALETTE

    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1], bool)
    pro = {"fpr": [0.0, 0.1, 0.3], "pro": [0.0, 0.8, 0.9]}
    metrics = {"image_auroc": 100.0, "aupro": None}
    plots.report_curves(tmp_path, "line", roc_points(scores, labels), pro, metrics, scores, labels, 0.33)
    with open(tmp_path / "plots/roc.csv") as f:
        rows = list(csv.DictReader(f))
    assert (float(rows[0]["fpr"]), float(rows[-1]["tpr"])) == (0.0, 1.0)

    def has_colour(path: Path, rgb: tuple) -> bool:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        return bool((np.abs(pixels.astype(int) - rgb).sum(axis=1) < 30).any())

    roc_png = np.asarray(Image.open(tmp_path / "roc.png").convert("RGB"))
    assert has_colour(tmp_path / "roc.png", _PALETTE[1])  # the operating point at (0, 1), a perfect separation
    # the perfect curve stays visible: its colour along the top edge, not hidden under the frame
    assert (np.abs(roc_png[30:60].astype(int) - _PALETTE[0]).sum(axis=2) < 30).sum() > 100
    plots.report_curves(tmp_path, "line", roc_points(scores, labels), pro, metrics, scores, np.ones(6, bool), 0.33)
    assert (tmp_path / "pro.png").is_file()


def test_threshold_anchored_panels_colour_a_value_the_same_whatever_else_is_in_the_image() -> None:
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    threshold = 2.0
    vmin, vmax = overlays.anchored_scale(threshold)
    assert (vmin + vmax) / 2 == threshold
    quiet = np.full((32, 32), 0.5 * threshold)
    hot = quiet.copy()
    hot[0, 0] = 3 * threshold  # per-image scaling would darken everything else in this one
    tiles = []
    for amap in (quiet, hot):
        out = np.asarray(overlays.panel(image, amap, None, None, "t", vmin=vmin, vmax=vmax, threshold=threshold,
                                        tile=32))
        tiles.append(out[40 + 16, 32 + 16].astype(int))  # the middle of the anomaly-map tile
    assert (tiles[0] == tiles[1]).all()
    assert tiles[0][2] > tiles[0][0]  # below the threshold: the blue half of the scale
