"""The throughput contract's cost model: deterministic, exact in the plan's FLOPs, and refusing what it cannot
estimate with the key and the command that fixes it."""

from __future__ import annotations

import pytest

from hetmm.config import parse_params
from hetmm.errors import ConfigError
from hetmm.pipeline import throughput


def line(**keys):
    base = parse_params({"product_lines": {"a": {"templates": {"kind": "ALL"}}}}).line("a")
    return base.with_keys(keys)


def test_the_estimate_follows_the_plan_and_the_template_size():
    start = line()
    one, many = throughput.estimate(start, 10), throughput.estimate(start, 40)
    assert many.matching_s == pytest.approx(4 * one.matching_s)  # linear in the deployed sheets
    assert (many.backbone_s, many.post_s) == (one.backbone_s, one.post_s)
    assert throughput.estimate(start, 40) == many  # no timing: the same settings give the same figure
    # nearest-patch compares every pixel with every template pixel: far slower than windows on the same template
    assert throughput.estimate(line(**{"matching.mode": "patch"}), 40).images_per_second < many.images_per_second / 5
    # a layer weighted 0 is not matched; a larger image costs more backbone (linear in pixels)
    assert throughput.estimate(line(**{"matching.weights": (0.0, 1.0, 1.0)}), 40).matching_s < many.matching_s
    big = throughput.estimate(line(**{"features.image_size": (384, 384)}), 40)
    assert big.backbone_s == pytest.approx(many.backbone_s * 384 * 384 / 256 / 256)
    assert big.matching_s > many.matching_s
    assert line().inspection.min_images_per_second == 10.0 and line().inspection.device == "cpu"


def test_the_profile_records_how_it_was_measured_and_gaps_are_errors():
    profile = throughput.profile("cpu")
    assert "benchmarks/device_profile.py" in profile["command"] and profile["machine"]["threads"] >= 1
    with pytest.raises(ConfigError, match="inspection.device: 'tpu' has no measured profile"):
        throughput.estimate(line(), 10, device="tpu")
    with pytest.raises(ConfigError, match="features.backbone: 'resnet101' has no measured cost"):
        throughput.estimate(line(**{"features.backbone": "resnet101"}), 10)
    with pytest.raises(ConfigError, match="features.backbone: unknown backbone 'no_such_net'; choose one of"):
        throughput.estimate(line(**{"features.backbone": "no_such_net"}), 10)  # a typo, not a missing measurement
