"""The label-free tuner and the effective settings: blind to test labels, pinned keys win, results reused, stale
settings refused. Real searches on the demo images (a pinned small backbone keeps them to seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import folder_line, run_stages, write_params
from hetmm.errors import ConfigError
from hetmm.pipeline.line import LinePaths, StageRun
from hetmm.pipeline.stages import stage

TUNE_STAGES = ("download", "validate", "tune")


def tuned_line(src: Path, **pins) -> dict:
    """A folder line whose features are pinned to a small random backbone; matching and blur are left open."""
    line = folder_line(src, size=64)
    line.pop("matching")
    line.pop("post")
    line["features"].update(layers=[1, 2, 3])
    line["templates"] = {"kind": "ALL"}
    line["inspection"] = {"min_images_per_second": 0}
    line["tune"] = {"enabled": True, "max_validation": 4, "min_synthetic": 10,
                    "budget_s": 600}
    for key, value in pins.items():
        section, name = key.split("__")
        line.setdefault(section, {})[name] = value
    return line


def tune(root: Path, line: dict) -> dict:
    params = write_params(root, {"line": line})
    return run_stages(params, "line", root, TUNE_STAGES)["tune"]


def settings_of(root: Path) -> dict:
    body = yaml.safe_load((root / "models/line/settings.yaml").read_text())
    body.pop("data")  # the source path differs between the runs, and so does the digest of the entry
    body["hetmm"].pop("params_digest")
    return body


@pytest.mark.slow
def test_tuner_never_reads_test_labels_or_images(demo_tree, tmp_path):
    shuffled, no_test = tmp_path / "shuffled", tmp_path / "no_test"
    shutil.copytree(demo_tree, shuffled)
    # every defect becomes "good" and two good images become defects of a new type (masks: all white)
    for image in sorted((shuffled / "test").glob("*/*.png")):
        if image.parent.name != "good":
            image.rename(shuffled / "test/good" / f"{image.parent.name}_{image.name}")
    shutil.rmtree(shuffled / "ground_truth")
    (shuffled / "test/flipped").mkdir()
    (shuffled / "ground_truth/flipped").mkdir(parents=True)
    for image in sorted((shuffled / "test/good").glob("0*.png"))[:2]:
        image.rename(shuffled / "test/flipped" / image.name)
        Image.new("L", Image.open(shuffled / "test/flipped" / image.name).size, 255).save(
            shuffled / "ground_truth/flipped" / image.name)
    # no test split to speak of: one unrelated picture
    shutil.copytree(demo_tree / "train", no_test / "train")
    (no_test / "test/good").mkdir(parents=True)
    Image.effect_noise((160, 160), 40).convert("RGB").save(no_test / "test/good/only.png")

    runs = {name: tmp_path / f"run_{name}" for name in ("original", "shuffled", "no_test")}
    results = {name: tune(root, tuned_line(src)) for (name, root), src in
               zip(runs.items(), (demo_tree, shuffled, no_test))}
    assert results["original"]["action"] == "searched"
    assert len(results["original"]["chosen"]) >= 6
    assert results["shuffled"]["chosen"] == results["original"]["chosen"] == results["no_test"]["chosen"]
    assert settings_of(runs["shuffled"]) == settings_of(runs["original"]) == settings_of(runs["no_test"])
    records = [yaml.safe_load((root / "reports/line/tuning.json").read_text())["candidates"] for root in runs.values()]
    assert [c["objective"] for c in records[0]] == [c["objective"] for c in records[1]] == \
        [c["objective"] for c in records[2]]
    # the search did improve on its starting point, and the picture of it exists
    assert results["original"]["objective"]["after"] > results["original"]["objective"]["before"]
    assert (runs["original"] / "reports/line/tuning.png").stat().st_size > 1000


def test_pinned_keys_win_and_are_never_searched(demo_tree, tmp_path):
    result = tune(tmp_path, tuned_line(demo_tree, matching__mode="forward", post__blur_sigma=1.5))
    assert "matching.mode" not in result["chosen"] and "post.blur_sigma" not in result["chosen"]
    body = yaml.safe_load((tmp_path / "models/line/settings.yaml").read_text())
    assert body["matching"]["mode"] == "forward" and body["post"]["blur_sigma"] == 1.5
    assert {"matching.mode", "post.blur_sigma"} <= set(body["hetmm"]["pinned"])
    assert "matching.mode" not in body["hetmm"]["tuned"]
    record = yaml.safe_load((tmp_path / "reports/line/tuning.json").read_text())
    assert {c["settings"].get("matching.mode") for c in record["candidates"]} == {None}
    assert all(c["key"] not in ("matching.mode", "post.blur_sigma") for c in record["candidates"])


@pytest.mark.slow
def test_search_is_reused_until_its_inputs_change_and_stale_settings_are_refused(demo_tree, tmp_path):
    line = tuned_line(demo_tree)
    first = tune(tmp_path, line)
    line["report"]["overlays"] = 4  # not a tuning input
    again = tune(tmp_path, line)
    assert first["action"] == "searched" and again["action"] == "reused" and again["chosen"] == first["chosen"]
    assert first["reason"] == "no recorded search"

    line["matching"] = {"mode": "backward"}  # pinning a tuned key changes the search
    params = write_params(tmp_path, {"line": line})
    with pytest.raises(ConfigError, match="hetmm tune line"):
        StageRun.for_line(params, "line", tmp_path, "cpu", stage="extract")
    redone = run_stages(params, "line", tmp_path, ("tune",))["tune"]
    assert redone["action"] == "searched" and "matching.mode" not in redone["chosen"]
    assert redone["reason"] == ("changed since the recorded search: the line's settings, the keys pinned in "
                                "params.yaml")  # the reason names what changed, nothing else
    ctx = StageRun.for_line(params, "line", tmp_path, "cpu", stage="extract")
    assert ctx.line.matching.mode == "backward"
    for key, value in redone["chosen"].items():
        section, name = key.split(".")
        got = getattr(getattr(ctx.line, section), name)
        assert (list(got) if isinstance(got, tuple) else got) == value


def test_nothing_to_tune_writes_the_params_entry_as_settings(demo_tree, tmp_path):
    line = folder_line(demo_tree)  # tune.enabled: false
    result = tune(tmp_path, line)
    assert result == {"action": "none", "reason": "tune.enabled is false", "chosen": {}}
    params = write_params(tmp_path, {"line": line})
    assert StageRun.for_line(params, "line", tmp_path, "cpu", stage="infer").line == params.line("line")
    assert (tmp_path / "reports/line/tuning.png").is_file()


@pytest.mark.slow
def test_a_line_with_only_a_data_block_runs_every_stage(demo_tree, tmp_path):
    """Out of the box: the tuner picks the settings (a tight budget keeps this test short) and calibration the
    thresholds; the report has honest and oracle figures."""
    line = {"data": {"source": "folder", "path": str(demo_tree)},
            "tune": {"budget_s": 20, "max_validation": 3, "min_synthetic": 10}}
    params = write_params(tmp_path, {"line": line})
    out = run_stages(params, "line", tmp_path)
    assert out["tune"]["action"] == "searched"
    report = out["report"]
    assert report["threshold_rule"] == "normal_fpr"
    assert 0 < report["pixel_threshold"]
    assert report["image_auroc"] > 90
    paths = LinePaths.for_line("line", tmp_path)
    assert paths.calibration.is_file() and paths.settings.is_file()
    assert stage("tune")  # the stage registry knows it


def test_a_new_line_entry_leaves_every_tunable_key_to_the_tuner():
    from hetmm.config import TUNABLE, parse_params
    from hetmm.pipeline.lines import line_entry

    entry = line_entry("bolts", {"source": "folder", "path": "/parts/bolts"})
    line = parse_params({"product_lines": {"bolts": entry}}).line("bolts")
    assert line.tunable() == TUNABLE
    assert entry["data"] == {"source": "folder", "path": "/parts/bolts", "masks": "optional", "subset": "all",
                             "seed": 0, "normal_test_share": 0.2}
    assert entry["features"]["batch_size"] == 8 and entry["features"]["backbone"] == "auto"
    assert all(entry[k.split(".")[0]][k.split(".")[1]] == "auto" for k in TUNABLE)


def _direct_search(demo_tree, train_images: int, floor: float):
    """One real search called directly: ``train_images`` is how many sheets ALL would deploy."""
    from hetmm.config import parse_params
    from hetmm.pipeline import tuning

    entry = tuned_line(demo_tree)
    entry["templates"] = {}  # kind and size left to the tuner
    entry["inspection"] = {"min_images_per_second": floor}
    line = parse_params({"product_lines": {"line": entry}}).line("line")
    templates, evalset = _search_images(demo_tree, line)
    return tuning.search(line, templates, evalset, train_images, native_side=160)


def _search_images(demo_tree: Path, line, crop: tuple[int, int] | None = None):
    """Six template images and the tuner's validation set on three others (cropped to ``crop`` = (width, height))."""
    from hetmm.pipeline import tuning
    from hetmm.pipeline.validation_set import make_validation

    images = [Image.open(p).convert("RGB") for p in sorted((demo_tree / "train/good").glob("*.png"))]
    if crop is not None:
        images = [im.crop((0, 0, *crop)) for im in images]
    normals, templates = images[:3], images[3:9]
    return templates, tuning.evaluation_set(make_validation(normals, line.tune, tuning.EVAL_SIZE))


@pytest.mark.parametrize("keys", [
    {},  # mutual, the fixture's windows, blur 2
    {"matching.mode": "patch", "post.blur_sigma": 0.0},
    {"features.resize": "pad", "matching.mode": "backward", "post.blur_sigma": 4.0},
    {"matching.mode": "forward", "matching.weights": (1.0, 0.0, 0.5), "post.image_score": "block_mean",
     "post.block": 8},
], ids=["mutual", "patch", "pad-backward-blur", "forward-block-mean"])
def test_the_tuner_scores_its_validation_set_exactly_as_the_deployed_scorer(demo_tree, keys):
    """The maps and scores a search optimises are the ones ``infer`` and ``predict`` would produce: the tuner's
    cached per-window distances go through the deployed post-processing, compared with Inspector.score_features
    on the same features and an ALL template of the same images."""
    import torch

    from hetmm.config import parse_params
    from hetmm.core.inspector import Inspector
    from hetmm.core.templates import BuildOptions, build
    from hetmm.modes import TemplateKind
    from hetmm.pipeline import tuning

    entry = tuned_line(demo_tree, post__blur_sigma=2.0,
                       matching__forward_windows=[5, 3, 3], matching__backward_windows=[3, 3, 1])
    line = parse_params({"product_lines": {"line": entry}}).line("line").with_keys(keys)
    templates, evalset = _search_images(demo_tree, line, crop=(160, 112))  # not square: pad leaves borders
    run = tuning._Search(line, templates, evalset, len(templates), torch.device("cpu"), None)
    feats = run._features(line.features)
    maps, scores = run._maps(line, feats)
    tset = build(TemplateKind.ALL, feats.templates, [str(i) for i in range(len(templates))],
                 BuildOptions(size=len(templates), feature=line.features.fingerprint()))
    deployed = Inspector(line, tset).score_features(feats.queries, feats.boxes)
    assert maps.shape == deployed.maps.shape == (len(evalset.images), *line.features.image_size)
    assert torch.allclose(maps, deployed.maps, rtol=0, atol=1e-6)
    assert torch.allclose(scores, deployed.scores, rtol=0, atol=1e-6)
    if line.features.resize == "pad":
        assert any(box[2:] != tuple(line.features.image_size) for box in feats.boxes)


def test_the_template_is_sized_first_and_every_candidate_meets_the_floor_at_that_size(demo_tree):
    small = _direct_search(demo_tree, train_images=8, floor=0.5)
    assert small.chosen["templates.kind"] == "ALL"
    huge = _direct_search(demo_tree, train_images=10**7, floor=0.5)  # ALL could never be fast enough
    assert huge.chosen["templates.kind"] == "PTS" and huge.chosen["templates.size"] in (200, 100, 60, 40, 20, 10)
    assert any("PTS-" in note for note in huge.notes)
    kept = [c for c in huge.candidates if c["objective"] is not None]
    assert kept and all(c["images_per_second"] >= 0.5 for c in kept)
    assert all(c["settings"]["templates.size"] == huge.chosen["templates.size"] for c in huge.candidates)


def test_the_work_clock_ignores_time_spent_waiting():
    import time

    import torch

    from hetmm.pipeline.tuning import WorkClock

    clock = WorkClock(torch.device("cpu"))
    start = clock()
    time.sleep(0.3)  # what another job on the machine looks like from here: time passes, no work is done
    waited = clock() - start
    start = clock()
    for _ in range(30):
        torch.randn(400, 400).matmul(torch.randn(400, 400))
    worked = clock() - start
    assert waited < 0.05 and worked > 0.01


@pytest.mark.slow
def test_new_good_images_rerun_the_search_only_beyond_tune_rerun_share(demo_tree, tmp_path):
    """A hot update reuses the recorded choice until more than ``tune.rerun_share`` (default 0.2) of the images it
    was searched on are added or removed; the share itself decides when, not what, so changing it reruns nothing."""
    from hetmm.pipeline.stages.tune import changed_share

    src = tmp_path / "src"
    shutil.copytree(demo_tree, src)
    train = sorted((src / "train/good").glob("*.png"))
    line = tuned_line(src)

    def add(count: int, start: int) -> None:  # new good images: mirrored training images (other contents)
        for path in train[start:start + count]:
            Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path.with_name(f"new_{path.name}"))

    assert tune(tmp_path, line)["action"] == "searched"
    add(2, 0)  # 2 of 24: 8 %
    small = tune(tmp_path, line)
    assert small["action"] == "reused" and "8% of its training images" in small["reason"]
    add(4, 2)  # 6 of 24 since the search: 25 %
    line["tune"]["rerun_share"] = 0.3
    assert tune(tmp_path, line)["action"] == "reused"
    line["tune"]["rerun_share"] = 0.2
    redone = tune(tmp_path, line)
    assert redone["action"] == "searched"
    assert redone["reason"] == "25% of the searched training images added or removed (tune.rerun_share: 20%)"
    record = yaml.safe_load((tmp_path / "reports/line/tuning.json").read_text())
    assert len(record["train"]) == 30  # later changes are measured against the new search's images
    assert changed_share(["a", "b", "c", "d"], ["a", "b", "c", "e", "f"]) == 0.75


@pytest.mark.slow
def test_the_choice_does_not_depend_on_the_machines_load(demo_tree):
    """The throughput contract is checked by the cost model, never by timings: a search beside processes that keep
    every core busy chooses exactly what a search on a quiet machine chooses, and excludes the same candidates."""
    import subprocess
    import sys

    from hetmm.config import parse_params
    from hetmm.pipeline import throughput

    entry = tuned_line(demo_tree)
    entry["templates"] = {}
    line = parse_params({"product_lines": {"line": entry}}).line("line")
    start = line.with_keys({"templates.kind": "ALL"})
    fast = throughput.estimate(start, 8).images_per_second
    slow = throughput.estimate(start.with_keys({"matching.mode": "patch"}), 8).images_per_second
    assert slow < fast
    floor = (slow + fast) / 2  # nearest-patch matching cannot meet it, the starting values can
    quiet = _direct_search(demo_tree, train_images=8, floor=floor)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = _direct_search(demo_tree, train_images=8, floor=floor)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert busy.chosen == quiet.chosen
    assert [(c["key"], c.get("excluded"), c["objective"], c["images_per_second"]) for c in busy.candidates] == \
        [(c["key"], c.get("excluded"), c["objective"], c["images_per_second"]) for c in quiet.candidates]
    assert any(c.get("excluded") == "too slow for inspection.min_images_per_second" for c in quiet.candidates)
    assert quiet.chosen["matching.mode"] != "patch" and quiet.stopped is None
