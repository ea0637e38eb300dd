"""A trusted operating point (issue 26): cross-fitted calibration, the conformal guarantee, hash-stable folds under
hot update, and the promotion gate. Real features of the demo images; the validity check is numpy only."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import folder_line, run_stages, write_params
from hetmm.core import conformal
from hetmm.core.inspector import Inspector
from hetmm.core.scoring import LayerMatches
from hetmm.pipeline.calibration import cross_fit, fold_of, leave_one_out
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths, manifest, split
from hetmm.pipeline.line_template import build_template
from hetmm.pipeline.provenance import FeatureKey

UPTO_TEMPLATE = ("download", "validate", "tune", "extract", "template")


def _line_run(src, root, kind, **sections):
    params = write_params(root, {"line": folder_line(src, kind=kind, k=6, **sections)})
    run_stages(params, "line", root, UPTO_TEMPLATE)
    line = params.line("line")
    paths = LinePaths.for_line("line", root)
    return params, line, paths


@pytest.fixture(scope="module")
def all_run(demo_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("loo")
    return _line_run(demo_tree, root, "ALL")


def test_leave_one_out_equals_a_template_built_without_the_image(all_run):
    """Every training image's calibration score is its score by an ALL template of the other images (1e-6)."""
    _, line, paths = all_run
    train = split(manifest(paths), "train")
    fit = cross_fit(line, paths, train, "cpu")
    shas = sorted(set(train["sha256"]))
    assert fit.scheme == "leave_one_out" and fit.normals == shas and len(fit.normal_scores) == len(shas) == 24
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    for i in (0, 7, 23):  # first, middle and last sheet (the block edges)
        others = shas[:i] + shas[i + 1 :]
        layers, _ = cache.load(others, pixel_major=True)
        scorer = Inspector(line, build_template(line, layers, others, progress=False), "cpu")
        query, boxes = cache.load([shas[i]])
        expected = scorer.score_features(query, boxes).scores.item()
        assert fit.normal_scores[i] == pytest.approx(expected, abs=1e-6)
    # a training image scored by the full template matches itself: its leave-one-out score is what makes it honest
    assert fit.normal_scores.min() > 1e-3
    # without an exclusion the blocks combine to the full template's score (any block size)
    layers, _ = cache.load(shas, pixel_major=True)
    full = Inspector(line, build_template(line, layers, shas, progress=False), "cpu")
    query, boxes = cache.load(shas[:3])
    scores, maps, _ = leave_one_out(full, query, boxes, [-1, -1, 2], keep_maps=np.array([True, False, True]), block=5)
    np.testing.assert_allclose(scores[:2], full.score_features([q[:2] for q in query], boxes[:2]).scores.numpy(),
                               atol=1e-6)
    assert scores[2] == pytest.approx(fit.normal_scores[2], abs=1e-6) and maps.shape[0] == 2


def test_symmetric_leave_one_out_equals_matching_each_direction_apart(all_run):
    """Matching each pair of training images once (both directions from one product, issue 26) gives the distances,
    scores and maps of matching every query per direction (the code before), with extra queries left out of other
    sheets (the synthetic defects' owners), blocks that do not divide the sheets, and stored distances of the first
    images reused (a hot update: those are matched against the new sheets only)."""
    _, line, paths = all_run
    shas = sorted(set(split(manifest(paths), "train")["sha256"]))
    n, old = len(shas), 10
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    layers, boxes = cache.load(shas, pixel_major=True)
    full = Inspector(line, build_template(line, layers, shas, progress=False), "cpu")
    extra, extra_boxes = cache.load([shas[3], shas[17], shas[0], shas[22]])
    queries = [torch.cat([t, e.to(t.dtype)]) for t, e in zip(full.template.layers, extra, strict=True)]
    boxes, exclude = list(boxes) + list(extra_boxes), list(range(n)) + [3, 17, -1, 5]
    keep = np.arange(len(exclude)) % 3 == 0
    base = leave_one_out(full, queries, boxes, exclude, keep_maps=keep)
    for block in (5, 7, 24):
        got = leave_one_out(full, queries, boxes, exclude, keep_maps=keep, block=block, sheet_queries=n)
        _assert_same(got, base)
    # stored distances of the first 10 images to the first 10 sheets (a template of those only), +inf elsewhere
    first = Inspector(line, build_template(line, [t[:old] for t in layers], shas[:old], progress=False), "cpu")
    _, _, stored = leave_one_out(first, [t[:old] for t in full.template.layers], boxes[:old], range(old),
                                 sheet_queries=old)
    initial = LayerMatches([None if t is None else torch.cat([t, torch.full((len(exclude) - old, *t.shape[1:]),
                                                                           float("inf"))]) for t in stored.forward],
                           [None if t is None else torch.cat([t, torch.full((len(exclude) - old, *t.shape[1:]),
                                                                           float("inf"))]) for t in stored.backward],
                           stored.plan, len(exclude))
    start = np.where(np.arange(len(exclude)) < old, old, 0)
    for block in (4, 9):
        got = leave_one_out(full, queries, boxes, exclude, keep_maps=keep, block=block, start=start,
                            initial=initial, sheet_queries=n)
        _assert_same(got, base)
    with pytest.raises(ValueError, match="sheet_queries"):
        leave_one_out(full, queries, boxes, [1, 0] + exclude[2:], sheet_queries=n)


def _assert_same(got, want) -> None:
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    for a, b in zip(got[2].forward + got[2].backward, want[2].forward + want[2].backward, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_folds_come_from_the_content_hash_and_adding_images_moves_none():
    shas = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(200)]
    before = {s: fold_of(s, 5) for s in shas}
    sizes = np.bincount(list(before.values()), minlength=5)
    assert sizes.min() >= 25  # near-equal folds
    # the fold is a function of the image's own hash: no other image (added or not) enters it
    assert [fold_of(s, 5) for s in reversed(shas)] == [before[s] for s in reversed(shas)]


def test_k_fold_scores_each_image_by_a_template_without_its_fold(demo_tree, tmp_path):
    _, line, paths = _line_run(demo_tree, tmp_path / "pts", "PTS")
    train = split(manifest(paths), "train")
    fit = cross_fit(line, paths, train, "cpu")
    assert fit.scheme == "k_fold" and fit.models >= 2 and len(fit.normal_scores) == 24
    shas = sorted(set(train["sha256"]))
    f = fold_of(shas[0], line.calibration.folds)
    members = [s for s in shas if fold_of(s, line.calibration.folds) == f]
    others = [s for s in shas if s not in members]
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    layers, _ = cache.load(others, pixel_major=True)
    scorer = Inspector(line, build_template(line, layers, others, progress=False), "cpu")
    query, boxes = cache.load(members)
    expected = scorer.score_features(query, boxes).scores.numpy()
    got = fit.normal_scores[[shas.index(s) for s in members]]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_conformal_threshold_and_what_n_supports():
    scores = np.arange(1.0, 200.0)  # n = 199
    g = conformal.guarantee(scores, 0.01)
    assert g["supported"] and g["rank"] == 198 and g["threshold"] == 198.0 and g["promised_rate"] <= 0.01
    small = conformal.guarantee(np.array([0.3, 0.1, 0.2, 0.5, 0.4]), 0.01)
    assert not small["supported"] and small["threshold"] == 0.5 and small["promised_rate"] == pytest.approx(1 / 6)
    assert "cannot support a false-alarm rate of 1.00%" in small["statement"] and "16.67%" in small["statement"]
    assert conformal.needed(0.01) == 99 and conformal.guarantee(np.arange(99.0), 0.01)["supported"]
    assert not conformal.guarantee(np.arange(98.0), 0.01)["supported"]
    p = conformal.p_values(np.array([0.05, 0.25, 0.6]), np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(p, [5 / 5, 3 / 5, 1 / 5])


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1])
def test_conformal_rule_keeps_its_promise_over_200_exchangeable_draws(rate):
    """Mean false-alarm rate on fresh normals <= rate (+ 3 standard errors), for three score distributions."""
    rng = np.random.default_rng(26)
    draws = {"lognormal": lambda size: rng.lognormal(size=size), "gamma": lambda size: rng.standard_gamma(1.0, size),
             "normal": lambda size: rng.standard_normal(size)}
    for name, draw in draws.items():
        alarms, fresh = [], 2000
        for _ in range(200):
            n = int(rng.integers(100, 400))
            sample = draw(n + fresh)
            g = conformal.guarantee(sample[:n], rate)
            assert g["supported"]
            alarms.append(float((sample[n:] >= g["threshold"]).mean()))
        mean = float(np.mean(alarms))
        se = float(np.std(alarms)) / np.sqrt(len(alarms))  # the binomial noise of the fresh parts and of the draw
        assert mean <= rate + 3 * se + 1e-12, (name, mean)
        assert mean >= rate - 0.01  # not vacuous: it uses the rate it may (within 1/(n+1))


def _mirror_into(train_good, count):
    """``count`` mirrored copies of the first good training images: new, valid good parts (the issue's scenario)."""
    added = []
    for path in sorted(train_good.glob("*.png"))[:count]:
        target = train_good / f"mirrored_{path.name}"
        Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(target)
        added.append(target)
    return added


def test_hot_update_moves_old_calibration_scores_only_through_the_new_sheets(folder_src, tmp_path):
    """Adding good images to an ALL line: every old image keeps its place among the calibration normals, and its
    score changes only by the new sheets (a minimum over more sheets: never up); the new images add their own."""
    params, line, paths = _line_run(folder_src, tmp_path / "run", "ALL")
    run_stages(params, "line", tmp_path / "run", ("calibrate",))
    before = json.loads(paths.calibration.read_text())
    _mirror_into(folder_src / "train" / "good", 3)
    run_stages(params, "line", tmp_path / "run", UPTO_TEMPLATE + ("calibrate",))
    after = json.loads(paths.calibration.read_text())
    assert json.loads((paths.reports / "template.json").read_text())["action"] == "hot_update"
    old = dict(zip(before["normals"], before["image"]["normal_scores"], strict=True))
    new = dict(zip(after["normals"], after["image"]["normal_scores"], strict=True))
    assert set(old) < set(new) and len(new) == len(old) + 3
    assert all(new[s] <= old[s] + 1e-6 for s in old)
    assert before["scheme"] == after["scheme"] == "leave_one_out" and after["validation_normals"]
    # the old images' stored distances were reused (matched against the 3 new sheets only), exactly
    assert before["matching"]["images_reused"] == 0 and after["matching"]["images_reused"] == 24
    (paths.models / "calibration_matches.pt").unlink()
    run_stages(params, "line", tmp_path / "run", ("calibrate",))
    fresh = json.loads(paths.calibration.read_text())
    assert fresh["matching"]["images_reused"] == 0 and fresh["normals"] == after["normals"]
    np.testing.assert_allclose(fresh["image"]["normal_scores"], after["image"]["normal_scores"], atol=1e-6)


def test_the_gate_refuses_a_version_that_newly_misses_defects_and_predict_keeps_the_blessed_one(folder_src, tmp_path):
    """Defect images dropped into train/good (a contaminated hot update) make their test twins pass: with
    ``gate.mode: fail`` the report stage exits with an error naming them, threshold.json and the model predict
    uses stay the last blessed version; the metrics and the card carry the verdict."""
    from hetmm.errors import DataError
    from hetmm.pipeline.predict import predict_images

    root = tmp_path / "run"
    params = write_params(root, {"line": folder_line(folder_src, kind="ALL", k=6, threshold={"rule": "normal_fpr"},
                                                     gate={"mode": "fail"})})
    run_stages(params, "line", root)
    paths = LinePaths.for_line("line", root)
    first = json.loads(paths.threshold.read_text())
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert metrics["gate"] == {"verdict": "pass", "blessed": True, "newly_missed": 0}
    assert metrics["false_alarm_guarantee"]["calibration_normals"] == 24
    assert not metrics["false_alarm_guarantee"]["supported"]  # 24 normals cannot promise 1 %
    card = (paths.reports / "model_card.md").read_text()
    assert "cannot support a false-alarm rate of 1.00%" in card and "4.00%" in card
    scores = pd.read_csv(paths.outputs / "scores.csv", keep_default_na=False)
    caught = scores[(scores["label"] == "defect") & (scores["score"] >= first["threshold"])]
    assert len(caught) >= 2
    image = paths.data / caught["path"].iloc[0]
    out = predict_images(params.line("line"), paths, [image], tmp_path / "p", device="cpu", progress=False)
    row = json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"][0]
    assert row["p_value"] == pytest.approx((1 + sum(s >= row["score"] for s in first["calibration"]["scores"])) / 25)
    assert "cannot support" in out["guarantee"] and out["calibration_normals"] == 24
    # a threshold file from before the calibration scores were saved still works, without p-values, and says so
    old = {k: v for k, v in first.items() if k not in ("calibration", "guarantee")}
    paths.threshold.write_text(json.dumps(old))
    out = predict_images(params.line("line"), paths, [image], tmp_path / "old", device="cpu", progress=False)
    assert json.loads((tmp_path / "old" / "predictions.json").read_text())["predictions"][0]["p_value"] is None
    assert "no p-values" in out["guarantee"] and out["defective"] == 1
    paths.threshold.write_text(json.dumps(first))
    for rel in caught["path"][:2]:  # one pixel changed: not a duplicate file (validation refuses those)
        pixels = np.array(Image.open(paths.data / rel).convert("RGB"))
        pixels[0, 0] ^= 1
        Image.fromarray(pixels).save(folder_src / "train" / "good" / f"contaminated_{rel.replace('/', '_')}")
    with pytest.raises(DataError, match=r"blessed\.json: line version .* not deployed, gate REFUSED.*newly missed: "
                                        + ".*".join(sorted(caught["path"][:2]))):
        run_stages(params, "line", root)
    assert json.loads(paths.threshold.read_text()) == first  # untouched
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert metrics["gate"]["verdict"] == "fail" and metrics["gate"]["newly_missed"] >= 2
    card = json.loads((paths.reports / "model_card.json").read_text())
    assert card["gate"]["verdict"] == "fail" and not card["gate"]["blessed"]
    out = predict_images(params.line("line"), paths, [paths.data / caught["path"].iloc[0]], tmp_path / "pred",
                         device="cpu", progress=False)
    assert out["model_hash"] == first["model_hash"] != out["refused_model_hash"]
    assert out["defective"] == 1  # the blessed version still flags it


def test_gate_verdicts_by_mode():
    from hetmm.config import GateConfig
    from hetmm.pipeline.gate import judge

    labels = {"a": True, "b": True, "c": False, "d": False}
    names = {s: f"test/{s}.png" for s in labels}
    baseline = {"model_hash": "old", "threshold": 0.5, "scores": {"a": 0.9, "b": 0.7, "c": 0.1, "d": 0.2}}
    worse = {"a": 0.9, "b": 0.4, "c": 0.1, "d": 0.6}  # b missed, d a new false alarm
    for mode, verdict in (("warn", "warn"), ("fail", "fail"), ("off", "off")):
        out = judge(GateConfig(mode=mode, max_false_alarm_rate=0.25), baseline, worse, labels, 0.5, names)
        assert out["verdict"] == verdict and out["blessed"] == (mode != "fail")
        assert out["newly_missed"] == ["test/b.png"] and out["failed"] == ["max_recall_drop", "max_false_alarm_rate"]
    same = judge(GateConfig(mode="fail"), baseline, baseline["scores"], labels, 0.5, names)
    assert same["verdict"] == "pass" and same["previous"] == same["candidate"]
    first = judge(GateConfig(mode="fail"), None, worse, labels, 0.5, names)
    assert first["verdict"] == "pass" and first["first"] and "becomes the baseline" in first["summary"]
    tolerant = judge(GateConfig(mode="fail", max_recall_drop=0.5), baseline, worse, labels, 0.5, names)
    assert tolerant["verdict"] == "pass" and tolerant["newly_missed"] == ["test/b.png"]
