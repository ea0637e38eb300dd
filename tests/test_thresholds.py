"""Honest thresholds: the deployed decision comes from calibration (validation normals, synthetic defects) unless
the rule is an oracle one, the pixel threshold always does, and predict's scores and masks follow it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import DEMO_LINE, copy_run, run_stages, write_params
from hetmm.config import ORACLE_RULES, ThresholdConfig, parse_params
from hetmm.core import thresholds
from hetmm.errors import DataError
from hetmm.pipeline import evaluation
from hetmm.pipeline.line import LinePaths
from hetmm.pipeline.predict import predict_images, saved_threshold
from hetmm.pipeline.settings import calibration_key
from hetmm.report import model_card

CALIBRATION = {
    "image": {"normal_fpr": 0.8, "false_alarm_rate": 0.01, "synthetic_f1": 0.6, "synthetic_f1_score": 90.0,
              "min": 0.2, "max": 1.4, "normal_scores": [0.3, 0.5, 0.8]},
    "pixel": {"threshold": 0.45, "f1": 55.0},
    "synthetic_metrics": {"image_auroc": 97.0, "pixel_auroc": 95.0, "aupro": 80.0},
    "validation_normals": ["a" * 64, "b" * 64, "c" * 64], "templates": 9, "synthetic": 12,
    "families": ["scratch", "stain"], "sheets": 9, "seconds": 1.5,
}
# test split: good parts score low, defects high, with one overlap
SCORES = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.9, 1.0, 1.2])
LABELS = np.array([False, False, False, False, True, True, True, True])
RULES = [ThresholdConfig("normal_fpr"), ThresholdConfig("normal_fpr", 0.01), ThresholdConfig("synthetic_f1"),
         ThresholdConfig("manual", 0.75), ThresholdConfig("f1_max"), ThresholdConfig("normal_quantile", 0.5)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.rule}-{r.value}")
def test_every_rule_takes_pixel_threshold_and_range_from_calibration(rule):
    out = evaluation.choose_threshold(rule, SCORES, LABELS, CALIBRATION)
    assert out["rule"] == rule.rule and out["oracle"] is (rule.rule in ORACLE_RULES)
    assert out["pixel_threshold"] == 0.45 and out["normalisation"] == {"min": 0.2, "max": 1.4}
    expected = {"normal_fpr": 0.8, "synthetic_f1": 0.6, "manual": 0.75,
                "f1_max": 0.4,  # the lowest defect score: every defect caught, one false alarm (F1 8/9)
                "normal_quantile": 0.25}[rule.rule]
    assert out["threshold"] == pytest.approx(expected)
    assert out["source"] == ("test labels (oracle)" if out["oracle"] else thresholds.RULES[rule.rule].source)
    json.dumps(out)  # written as threshold.json


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.rule}-{r.value}")
def test_only_oracle_rules_read_the_test_labels(rule):
    shuffled = np.random.default_rng(3).permutation(LABELS)
    assert (shuffled != LABELS).any()
    same = evaluation.choose_threshold(rule, SCORES, LABELS, CALIBRATION)
    other = evaluation.choose_threshold(rule, SCORES, shuffled, CALIBRATION)
    assert (same["threshold"] == other["threshold"]) is (rule.rule not in ORACLE_RULES)
    assert same["pixel_threshold"] == other["pixel_threshold"]


def test_calibration_missing_incomplete_or_for_other_settings_is_refused(tmp_path):
    line = parse_params({"product_lines": {"line": {"tune": {"enabled": False}}}}).line("line")
    train = ["a" * 64, "b" * 64]
    path = tmp_path / "models" / "line" / "calibration.json"
    with pytest.raises(DataError, match=r"calibration\.json: no calibration .*`hetmm calibrate line`"):
        evaluation.load_calibration(path, line, train)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"image": CALIBRATION["image"]}))  # no pixel threshold
    with pytest.raises(DataError, match=r"calibration\.json: unreadable or incomplete .*pixel.*hetmm calibrate line"):
        evaluation.load_calibration(path, line, train)
    record = {**CALIBRATION, "key": calibration_key(line, train)}
    path.write_text(json.dumps(record))
    assert evaluation.load_calibration(path, line, train) == record
    other_rate = replace(line, threshold=ThresholdConfig("normal_fpr", 0.05))
    for changed, images in ((other_rate, train), (line, train[:1])):
        with pytest.raises(DataError, match="made for other settings or training images"):
            evaluation.load_calibration(path, changed, images)


def test_model_card_names_where_the_threshold_came_from():
    def sentence(rule):
        return model_card.decision(evaluation.choose_threshold(rule, SCORES, LABELS, CALIBRATION), CALIBRATION)

    assert "1.00% of 3 validation normals" in sentence(ThresholdConfig("normal_fpr"))
    assert "3 validation normals and 12 synthetic defects" in sentence(ThresholdConfig("synthetic_f1"))
    for rule in (ThresholdConfig("normal_fpr"), ThresholdConfig("synthetic_f1")):
        assert "no test labels used" in sentence(rule) and "ORACLE" not in sentence(rule)
    for rule in (ThresholdConfig("f1_max"), ThresholdConfig("normal_quantile", 0.5)):
        assert "ORACLE" in sentence(rule)
    assert "Pixel threshold 0.45" in sentence(ThresholdConfig("manual", 0.75))
    summary = model_card.calibration_summary(CALIBRATION)
    assert summary["validation_normals"] == 3 and "normal_scores" not in summary["image"]


def test_predicted_mask_uses_the_pixel_threshold():
    yy, xx = np.mgrid[:32, :32]
    amap = np.exp(-((yy - 16.0) ** 2 + (xx - 16.0) ** 2) / 50.0)  # one blob, peak 1.0
    score, image_threshold = float(amap.max()), 0.9
    at_image = evaluation.predicted_mask(amap, score >= image_threshold, image_threshold)
    at_pixel = evaluation.predicted_mask(amap, score >= image_threshold, 0.3)
    assert at_image.any() and at_pixel.sum() > 5 * at_image.sum() and (at_pixel >= at_image).all()
    # a passed part has no region; a flagged part keeps its peak even when the pixel threshold is above the map
    assert not evaluation.predicted_mask(amap, False, 0.3).any()
    peak = evaluation.predicted_mask(amap, True, 5.0)
    assert peak.sum() == 1 and peak[16, 16]


def test_a_threshold_file_from_an_older_report_is_refused(tmp_path):
    paths = LinePaths.for_line("line", tmp_path)
    paths.models.mkdir(parents=True)
    paths.threshold.write_text(json.dumps({"rule": "f1_max", "threshold": 0.5, "template_hash": "h" * 64}))
    with pytest.raises(DataError, match=r"threshold\.json: written by an older report stage.*hetmm report line"):
        saved_threshold(paths, "line", "h" * 64)


def test_report_and_predict_deploy_the_calibrated_threshold(demo_run, tmp_path):
    """The demo run (rule f1_max, an oracle) switched to normal_fpr: report only, the calibration is reused."""
    root = copy_run(demo_run, tmp_path / "run")
    params = write_params(root, {"demo": {**DEMO_LINE, "threshold": {"rule": "normal_fpr"}}})
    paths = LinePaths.for_line("demo", root)
    oracle = json.loads(paths.threshold.read_text())
    assert oracle["rule"] == "f1_max" and oracle["oracle"] is True
    run_stages(params, "demo", root, ("tune", "calibrate", "report"))

    calibration = json.loads(paths.calibration.read_text())
    decision = json.loads(paths.threshold.read_text())
    assert (decision["rule"], decision["oracle"], decision["source"]) == ("normal_fpr", False, "calibration normals")
    assert decision["threshold"] == calibration["image"]["normal_fpr"]
    assert decision["pixel_threshold"] == calibration["pixel"]["threshold"] == oracle["pixel_threshold"]
    metrics = json.loads((paths.reports / "evaluation.json").read_text())
    assert metrics["threshold"] == decision["threshold"] and metrics["threshold_rule"] == "normal_fpr"
    assert metrics["confusion"] == decision["confusion"] and sum(metrics["confusion"].values()) == 26
    # the oracle figures are still reported, under their own names, and do not move with the rule
    assert metrics["oracle_f1_max"] == metrics["f1_max"] == oracle["f1"]
    assert metrics["oracle_f1_threshold"] == oracle["threshold"]
    card = json.loads((paths.reports / "model_card.json").read_text())
    assert card["decision"].startswith("rule normal_fpr") and "ORACLE" not in card["decision"]
    assert card["oracle"]["note"] == model_card.ORACLE_NOTE
    assert card["calibration"]["validation_normals"] == len(calibration["validation_normals"]) > 0
    assert card["tuned_keys"] == []  # tune.enabled is false on the demo line
    assert "rule normal_fpr" in (paths.reports / "model_card.md").read_text()

    images = sorted((paths.data / "test").rglob("*.png"))[::5]
    out = predict_images(params.line("demo"), paths, images, tmp_path / "pred", device="cpu", progress=False)
    assert (out["threshold"], out["pixel_threshold"]) == (decision["threshold"], decision["pixel_threshold"])
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())["predictions"]
    reference = np.array(decision["calibration"]["scores"])
    for row in rows:
        # the conformal p-value against every cross-fitted normal, +1 corrected
        assert row["p_value"] == pytest.approx((1 + (reference >= row["score"]).sum()) / (len(reference) + 1))
        assert row["defective"] == (row["score"] >= decision["threshold"])
        assert (row["defect_area_fraction"] > 0) == row["defective"]
