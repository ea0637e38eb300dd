"""Pipeline stage functions (``hetmm.pipeline``) on real images in a temporary repository root.

Covers the demo line end to end, incremental feature extraction and template hot update on a ``folder`` line,
and that failures (corrupt images, a torn template file, an empty training folder, bad config) are refused
loudly without touching the previous run's artifacts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import DEMO_LINE, copy_run, folder_line, run_stages, write_params
from hetmm.config import load_params
from hetmm.core.templates import load_template
from hetmm.errors import ConfigError, DataError, HetmmError
from hetmm.pipeline.line import LinePaths, StageRun
from hetmm.pipeline.stages import stage

# Measured on the demo line (efficientnet_lite0, 128 px, PTS K=10), percent: image AUROC 99.38 / 98.75, pixel AUROC
# 99.05 / 99.26, AU-PRO 94.9 / 95.7 with 1 / 2 torch threads (float summation order shifts a few PTS choices).
# Data and weights are fixed, so these bounds only leave room for such noise.
DEMO_MIN_IMAGE_AUROC = 95.0
DEMO_MIN_PIXEL_AUROC = 97.0
DEMO_MIN_AUPRO = 90.0


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- demo line, every stage


def test_demo_line_all_stages_write_their_files_and_sane_metrics(demo_run):
    paths = LinePaths.for_line("demo", demo_run)
    manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    assert len(manifest) == 50 and (manifest["split"] == "train").sum() == 24
    assert all((paths.data / p).is_file() for p in manifest["path"])

    validation = _json(paths.reports / "validation.json")
    assert validation["success"] is True and validation["failures"] == []
    assert (paths.reports / "validation.html").is_file()

    extract = _json(paths.reports / "extract.json")
    assert (extract["computed"], extract["reused"]) == (50, 0)
    assert len(list((paths.features / extract["digest"]).glob("*.pt"))) == 50

    template = _json(paths.reports / "template.json")
    assert template["action"] == "rebuild" and template["reason"] == "no previous template"
    assert (template["kind"], template["sheets"], template["train_images"]) == ("PTS", 10, 24)
    tset = load_template(paths.template)
    assert tset.meta["content_hash"] == template["content_hash"] and len(tset.meta["sources"]) == 24

    infer = _json(paths.reports / "infer.json")
    assert infer["images"] == 26 and infer["model_hash"] == template["content_hash"]
    assert infer["matching"]["sheets_matched"] == 10
    assert not (paths.outputs / "matches.pt").exists()  # PTS distances are never reused, so not kept
    scores = pd.read_csv(paths.outputs / "scores.csv", keep_default_na=False)
    maps = np.load(paths.outputs / "maps.npy")
    assert len(scores) == 26 and maps.shape == (26, 128, 128)
    assert np.isfinite(scores["score"]).all() and np.isfinite(maps).all()
    # the image score is the maximum of the (blurred) map
    np.testing.assert_allclose(scores["score"], maps.reshape(26, -1).max(axis=1).astype(np.float64), rtol=2e-3)

    metrics = _json(paths.reports / "evaluation.json")
    assert metrics["n_images"] == 26 and metrics["n_defective"] == 16
    assert metrics["image_auroc"] >= DEMO_MIN_IMAGE_AUROC
    assert metrics["pixel_auroc"] >= DEMO_MIN_PIXEL_AUROC
    assert metrics["aupro"] >= DEMO_MIN_AUPRO
    assert 0 <= metrics["f1_max"] <= 100
    threshold = _json(paths.models / "threshold.json")
    assert threshold["threshold"] == metrics["threshold"]
    assert threshold["model_hash"] == template["content_hash"]
    flagged = scores["score"] >= threshold["threshold"]
    confusion = threshold["confusion"]
    assert sum(confusion.values()) == 26
    assert confusion["true_positive"] + confusion["false_positive"] == flagged.sum()
    # the demo line's rule (f1_max) reads the test labels: flagged as an oracle; the pixel threshold is calibrated
    calibration = _json(paths.calibration)
    assert (threshold["rule"], threshold["oracle"]) == ("f1_max", True) and metrics["threshold_rule"] == "f1_max"
    assert threshold["pixel_threshold"] == metrics["pixel_threshold"] == calibration["pixel"]["threshold"]
    assert threshold["normalisation"] == {"min": calibration["image"]["min"], "max": calibration["image"]["max"]}
    assert metrics["confusion"] == confusion
    assert metrics["oracle_f1_max"] == metrics["f1_max"] and metrics["oracle_f1_threshold"] == threshold["threshold"]

    for name in ("roc.png", "pro.png", "per_defect.csv", "ablation.csv", "model_card.md", "plots/roc.csv",
                 "plots/pro.csv"):
        assert (paths.reports / name).is_file(), name
    assert len(list((paths.reports / "overlays").glob("*.png"))) >= 2
    per_defect = pd.read_csv(paths.reports / "per_defect.csv")
    assert len(per_defect) >= 4  # scratch, stain, hole, bright_spot (plus good/all rows if any)
    card = _json(paths.reports / "model_card.json")
    assert card["product_line"] == "demo"
    assert card["template"]["content_hash"] == template["content_hash"]
    assert card["params"]["features"]["backbone"] == "efficientnet_lite0"
    roc = pd.read_csv(paths.reports / "plots" / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and roc["tpr"].iloc[-1] == 1.0


def test_rerun_of_an_unchanged_line_reuses_everything(demo_run, tmp_path):
    root = copy_run(demo_run, tmp_path / "run")
    params = load_params(root / "params.yaml")
    before = _json(root / "reports/demo/metrics.json")
    template_bytes = (root / "models/demo/template.pt").read_bytes()
    out = run_stages(params, "demo", root)
    assert (out["extract"]["computed"], out["extract"]["reused"], out["extract"]["pruned"]) == (0, 50, 0)
    assert out["template"]["action"] == "unchanged" and out["template"]["new_images"] == 0
    assert (root / "models/demo/template.pt").read_bytes() == template_bytes
    after = _json(root / "reports/demo/metrics.json")
    assert after["image_auroc"] == before["image_auroc"]
    assert after["pixel_auroc"] == pytest.approx(before["pixel_auroc"], abs=1e-6)


# --------------------------------------------------------------------------- incremental update


@pytest.mark.parametrize("kind", ["PTS", "ALL", "COVER"])
def test_new_good_images_are_extracted_alone_and_hot_update_the_template(folder_src, tmp_path, kind):
    root = tmp_path / "repo"
    held = tmp_path / "held_back"
    held.mkdir()
    train = sorted((folder_src / "train" / "good").iterdir())
    for image in train[-3:]:
        shutil.move(image, held / image.name)
    params = write_params(root, {"line": folder_line(folder_src, kind=kind, k=10)})
    paths = LinePaths.for_line("line", root)
    stages = ("download", "validate", "extract", "template")

    first = run_stages(params, "line", root, stages)
    assert (first["extract"]["computed"], first["extract"]["reused"]) == (47, 0)
    assert first["template"]["action"] == "rebuild" and first["template"]["train_images"] == 21
    sheets = 21 if kind == "ALL" else 10
    assert first["template"]["sheets"] == sheets
    old = load_template(paths.template)

    # three new good images arrive in the source folder
    for image in held.iterdir():
        shutil.move(image, folder_src / "train" / "good" / image.name)
    second = run_stages(params, "line", root, stages)
    extract = _json(paths.reports / "extract.json")
    assert (extract["computed"], extract["reused"], extract["pruned"]) == (3, 47, 0)
    record = _json(paths.reports / "template.json")
    assert record == {**second["template"]}
    assert record["action"] == "hot_update" and record["new_images"] == 3 and record["train_images"] == 24
    new = load_template(paths.template)
    assert len(new.meta["sources"]) == 24 and new.meta["sources"][:21] == old.meta["sources"]
    if kind != "ALL":
        assert record["sheets"] == 10 and new.layers[0].shape[0] == 10  # K sheets kept, sources grew
    else:
        assert record["sheets"] == 24 and new.layers[0].shape[0] == 24  # exactly 3 more sheets
        for layer_old, layer_new in zip(old.layers, new.layers):
            assert bool((layer_new[:21] == layer_old).all())
    assert new.meta["history"][-1]["event"] == "hot_update" and new.meta["history"][-1]["added"] == 3
    assert record["content_hash"] != first["template"]["content_hash"]

    # nothing changed: nothing computed, template untouched
    template_bytes = paths.template.read_bytes()
    third = run_stages(params, "line", root, stages)
    assert (third["extract"]["computed"], third["extract"]["reused"]) == (0, 50)
    assert third["template"]["action"] == "unchanged" and third["template"]["new_images"] == 0
    assert paths.template.read_bytes() == template_bytes

    # a training image disappears: its features are pruned and the template is rebuilt, saying why
    (folder_src / "train" / "good" / train[0].name).unlink()
    fourth = run_stages(params, "line", root, stages)
    assert (fourth["extract"]["computed"], fourth["extract"]["pruned"]) == (0, 1)
    assert fourth["template"]["action"] == "rebuild" and "removed" in fourth["template"]["reason"]
    assert fourth["template"]["train_images"] == 23
    assert len(load_template(paths.template).meta["sources"]) == 23

    # a feature setting changes: new digest folder, old one pruned, template rebuilt for the mismatch
    old_digest = fourth["extract"]["digest"]
    params = write_params(root, {"line": folder_line(folder_src, kind=kind, k=10, features={"image_size": [96, 96]})})
    fifth = run_stages(params, "line", root, stages)
    assert fifth["extract"]["digest"] != old_digest
    assert (fifth["extract"]["computed"], fifth["extract"]["reused"], fifth["extract"]["pruned"]) == (49, 0, 49)
    assert not (paths.features / old_digest).exists()
    assert sorted(p.name for p in paths.features.iterdir()) == [fifth["extract"]["digest"]]
    assert fifth["template"]["action"] == "rebuild"
    assert "does not match the settings" in fifth["template"]["reason"] and "image_size" in fifth["template"]["reason"]
    assert load_template(paths.template).meta["feature"]["image_size"] == [96, 96]


def _scores_and_maps(paths: LinePaths) -> tuple[np.ndarray, np.ndarray]:
    return pd.read_csv(paths.outputs / "scores.csv")["score"].to_numpy(), np.load(paths.outputs / "maps.npy")


def test_grown_all_template_rematches_only_new_sheets_and_equals_a_full_rematch(folder_src, tmp_path):
    root, held = tmp_path / "repo", tmp_path / "held_back"
    held.mkdir()
    for image in sorted((folder_src / "train" / "good").iterdir())[-3:]:
        shutil.move(image, held / image.name)
    params = write_params(root, {"line": folder_line(folder_src, kind="ALL")})
    paths = LinePaths.for_line("line", root)
    stages = ("download", "validate", "extract", "template", "infer")
    first = run_stages(params, "line", root, stages)["infer"]
    n_test = first["images"]
    assert first["matching"] == {"images_reused": 0, "sheets_matched": 21, "reason": "no stored matches"}

    for image in held.iterdir():
        shutil.move(image, folder_src / "train" / "good" / image.name)
    grown = run_stages(params, "line", root, stages)["infer"]
    assert grown["matching"] == {"images_reused": n_test, "sheets_matched": 3,
                                 "reason": "matched the 3 new sheet(s) only"}
    incremental = _scores_and_maps(paths)
    (paths.outputs / "matches.pt").unlink()
    assert (stage("infer")(StageRun(params, params.line("line"), paths, "cpu", False))["matching"]["sheets_matched"]
            == 24)
    full = _scores_and_maps(paths)
    assert np.allclose(incremental[0], full[0], atol=1e-6)
    assert np.allclose(incremental[1].astype(np.float32), full[1].astype(np.float32), atol=2e-3)  # float16 maps

    # fusion settings only: nothing is matched, and the result equals a fresh run with those settings
    params = write_params(root, {"line": folder_line(folder_src, kind="ALL", matching={"alphas": [0.2, 0.7, 0.9]})})
    reused = stage("infer")(StageRun(params, params.line("line"), paths, "cpu", False))["matching"]
    assert reused["sheets_matched"] == 0 and reused["reason"].startswith("template unchanged")
    reweighted = _scores_and_maps(paths)
    (paths.outputs / "matches.pt").unlink()
    stage("infer")(StageRun(params, params.line("line"), paths, "cpu", False))
    assert np.allclose(reweighted[0], _scores_and_maps(paths)[0], atol=1e-6)
    assert not np.allclose(reweighted[0], full[0], atol=1e-4)

    # a window change or a torn file: full re-match, saying why
    params = write_params(root, {"line": folder_line(folder_src, kind="ALL", matching={"forward_windows": [3, 3, 3]})})
    changed = stage("infer")(StageRun(params, params.line("line"), paths, "cpu", False))["matching"]
    assert changed["sheets_matched"] == 24 and changed["reason"] == "changed since the stored matches: plan"
    data = (paths.outputs / "matches.pt").read_bytes()
    (paths.outputs / "matches.pt").write_bytes(data[: len(data) // 2])
    torn = stage("infer")(StageRun(params, params.line("line"), paths, "cpu", False))["matching"]
    assert torn["sheets_matched"] == 24 and "unreadable" in torn["reason"]

    # a training image disappears: the rebuilt template is no longer the stored one plus new sheets
    next((folder_src / "train" / "good").iterdir()).unlink()
    rebuilt = run_stages(params, "line", root, stages)
    assert rebuilt["template"]["action"] == "rebuild" and rebuilt["infer"]["matching"]["sheets_matched"] == 23
    assert rebuilt["infer"]["matching"]["reason"] == "the template is not the stored matches' template plus new sheets"


# --------------------------------------------------------------------------- nothing lost on failure


@pytest.fixture(scope="module")
def good_folder_run(tmp_path_factory, demo_tree):
    """A complete run of a folder line (random features) plus its source folder, to be copied by each test."""
    base = tmp_path_factory.mktemp("good_folder_run")
    src = Path(shutil.copytree(demo_tree, base / "src"))
    params = write_params(base / "repo", {"line": folder_line(src)})
    run_stages(params, "line", base / "repo")
    return base


def _copy_good_run(good_folder_run: Path, tmp_path: Path, **overrides):
    base = Path(shutil.copytree(good_folder_run, tmp_path / "base"))
    params = write_params(base / "repo", {"line": folder_line(base / "src", **overrides)})
    return base / "src", base / "repo", params


def _truncated_jpeg(src: Path, path: Path) -> None:
    Image.open(src).convert("RGB").save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut off


@pytest.mark.parametrize("damage", ["truncated_jpeg", "zero_bytes"])
def test_corrupt_image_is_named_and_the_previous_run_survives(good_folder_run, tmp_path, damage):
    src, root, params = _copy_good_run(good_folder_run, tmp_path)
    kept = {rel: (root / rel).read_bytes() for rel in ("models/line/template.pt", "reports/line/metrics.json",
                                                       "models/line/threshold.json", "outputs/line/scores.csv")}
    name = "new_arrival.jpg"
    bad = src / "train" / "good" / name
    if damage == "truncated_jpeg":
        _truncated_jpeg(next((src / "train" / "good").glob("*.png")), bad)
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataError, match=name) as err:
        run_stages(params, "line", root, ("download", "validate"))
    assert "\n" not in str(err.value)  # printed by the CLI as one line
    for rel, content in kept.items():
        assert (root / rel).read_bytes() == content, rel
    if damage == "zero_bytes":  # refused while fetching: the previous data folder is untouched
        assert not (root / "data" / "line" / "train" / "good" / name).exists()
    else:
        assert _json(root / "reports/line/validation.json")["success"] is False


def test_torn_template_is_refused_by_infer_and_rebuilt_by_the_template_stage(good_folder_run, tmp_path):
    _, root, params = _copy_good_run(good_folder_run, tmp_path)
    paths = LinePaths.for_line("line", root)
    scores_before = (paths.outputs / "scores.csv").read_bytes()
    data = paths.template.read_bytes()
    paths.template.write_bytes(data[: len(data) // 2])
    with pytest.raises(HetmmError, match="corrupt or incomplete") as err:
        run_stages(params, "line", root, ("infer",))
    assert str(paths.template) in str(err.value)
    assert (paths.outputs / "scores.csv").read_bytes() == scores_before

    out = run_stages(params, "line", root, ("template", "infer"))
    assert out["template"]["action"] == "rebuild"
    assert "corrupt" in out["template"]["reason"] and "unusable" in out["template"]["reason"]
    assert _json(paths.reports / "template.json")["reason"] == out["template"]["reason"]
    assert out["infer"]["model_hash"] == out["template"]["content_hash"]
    assert np.isfinite(pd.read_csv(paths.outputs / "scores.csv")["score"]).all()


def test_fewer_training_images_than_k_gives_n_sheets(folder_src, tmp_path):
    for image in sorted((folder_src / "train" / "good").iterdir())[4:]:
        image.unlink()
    root = tmp_path / "repo"
    params = write_params(root, {"line": folder_line(folder_src, kind="PTS", k=10)})
    out = run_stages(params, "line", root)
    assert out["template"]["sheets"] == 4 and out["template"]["train_images"] == 4
    tset = load_template(LinePaths.for_line("line", root).template)
    assert all(layer.shape[0] == 4 for layer in tset.layers)
    assert out["infer"]["images"] == 26
    assert all(math.isfinite(out["report"][key]) for key in ("image_auroc", "pixel_auroc"))


def test_empty_training_folder_is_a_data_error_naming_it(folder_src, tmp_path):
    for image in (folder_src / "train" / "good").iterdir():
        image.unlink()
    params = write_params(tmp_path / "repo", {"line": folder_line(folder_src)})
    with pytest.raises(DataError, match=str(folder_src / "train" / "good")):
        run_stages(params, "line", tmp_path / "repo", ("download",))
    assert not (tmp_path / "repo" / "data" / "line").exists()


def test_unknown_product_line_is_a_config_error_naming_it(tmp_path):
    params = write_params(tmp_path, {"demo": DEMO_LINE})
    with pytest.raises(ConfigError, match="'bolts'.*demo"):
        params.line("bolts")


def test_unknown_param_key_is_a_config_error_naming_it(tmp_path):
    raw = {"product_lines": {"demo": {**DEMO_LINE, "features": {**DEMO_LINE["features"], "backbon": "resnet18"}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"product_lines\.demo\.features: unknown key\(s\) backbon"):
        load_params(tmp_path / "params.yaml").line("demo")


def test_report_before_infer_is_a_data_error(tmp_path):
    params = write_params(tmp_path, {"demo": DEMO_LINE})
    paths = LinePaths.for_line("demo", tmp_path)
    with pytest.raises(DataError, match="run the infer stage first"):
        stage("report")(StageRun(params, params.line("demo"), paths, "cpu", False))
    with pytest.raises(DataError, match="manifest"):
        stage("extract")(StageRun(params, params.line("demo"), paths, "cpu", False))


# --------------------------------------------------------------------------- throughput contract


def test_speed_is_measured_beside_the_accuracy_and_checked_against_the_contract(demo_run, tmp_path, capsys):
    """infer measures images/s (batch 1 and 8, from cached features, plus a timed extraction) into infer.json; the
    report puts it into the DVC metric and the model card against inspection.min_images_per_second; a line below
    its contract gets one warning line and ``contract_met: false``."""
    paths = LinePaths.for_line("demo", demo_run)
    measured = _json(paths.reports / "infer.json")["speed"]
    assert measured["images_per_second"] > 0 and measured["backbone_ms_per_image"] > 0
    assert measured["ms_per_image_batch_1"] >= measured["backbone_ms_per_image"]
    assert measured["images_per_second"] == pytest.approx(1000 / measured["ms_per_image_batch_8"], rel=0.01)
    contract = measured["contract"]
    assert (contract["min_images_per_second"], contract["device"]) == (10.0, "cpu")
    assert contract["estimated_images_per_second"] > 0  # the cost model's figure for the deployed PTS-10
    metrics = _json(paths.reports / "metrics.json")
    assert metrics["speed"]["images_per_second"] == measured["images_per_second"]
    assert metrics["speed"]["contract_met"] == measured["contract_met"] and "image_auroc" in metrics
    card = (paths.reports / "model_card.md").read_text()
    assert "## Throughput" in card and "contract >= 10.0 images/s on cpu" in card

    root = copy_run(demo_run, tmp_path / "run")
    params = write_params(root, {"demo": {**DEMO_LINE, "inspection": {"min_images_per_second": 100000}}})
    capsys.readouterr()
    run_stages(params, "demo", root, ("tune", "infer", "report"))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "below inspection.min_images_per_second 100000" in line]
    assert len(warnings) == 1 and warnings[0].startswith("hetmm infer demo: WARNING")
    assert _json(root / "reports/demo/infer.json")["speed"]["contract_met"] is False
    assert _json(root / "reports/demo/metrics.json")["speed"]["contract_met"] is False
    assert "NOT MET" in (root / "reports/demo/model_card.md").read_text()


def test_the_old_throughput_key_is_read_with_a_notice(capsys):
    from hetmm.config import parse_params

    line = parse_params({"product_lines": {"a": {"tune": {"min_images_per_second": 3}}}}).line("a")
    assert line.inspection.min_images_per_second == 3
    assert "tune.min_images_per_second is deprecated" in capsys.readouterr().err
    both = {"tune": {"min_images_per_second": 3}, "inspection": {"min_images_per_second": 4}}
    with pytest.raises(ConfigError, match="remove tune.min_images_per_second"):
        parse_params({"product_lines": {"a": both}}).line("a")
