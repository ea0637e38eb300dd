import copy
import re
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_LINE
from hetmm.config import load_params, parse_params
from hetmm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _raw():
    """The repository's params with the demo line spelled out (the committed one holds only its data block)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["product_lines"]["demo"] = copy.deepcopy(DEMO_LINE)
    return raw


def test_repository_params_parse():
    params = load_params(ROOT / "params.yaml")
    assert {"demo", "demo_tfa"} <= set(params.product_lines)
    assert set(load_params(ROOT / "examples/mtd/params.yaml").product_lines) == {"mtd", "mtd_tfa"}
    demo = params.line("demo")
    assert demo.features.layers == (1, 2, 3)
    assert len(demo.matching.alphas) == 3


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r["product_lines"]["demo"]["matching"].update(alpahs=[0.5]), "product_lines.demo.matching: unknown key(s) alpahs"),
        (lambda r: r["product_lines"]["demo"]["matching"].update(alphas=[0.5, 0.5]), "product_lines.demo.matching.alphas"),
        (lambda r: r["product_lines"]["demo"]["matching"].update(alphas=[0.5, 1.5, 0.5]), "product_lines.demo.matching.alphas[1]"),
        (lambda r: r["product_lines"]["demo"]["matching"].update(forward_windows=[5, 4, 3]), "forward_windows[1]"),
        (lambda r: r["product_lines"]["demo"]["features"].update(image_size=[100, 128]), "features.image_size"),
        (lambda r: r["product_lines"]["demo"]["features"].update(layers=[1, 4]), "features.layers"),
        (lambda r: r["product_lines"]["demo"]["templates"].update(kind="SOME"), "product_lines.demo.templates.kind"),
        (lambda r: r["product_lines"]["demo"]["templates"].update(size="60"), "product_lines.demo.templates.size"),
        (lambda r: r["product_lines"]["demo"]["threshold"].update(rule="manual"), "threshold.value"),
        (lambda r: r.update(devise="cpu"), "unknown top-level key(s) devise"),
        (lambda r: r["product_lines"]["demo"]["data"].update(source="folder"), "data.path"),
        # settings that would exhaust memory or make every verdict false are refused before any work
        (lambda r: r["product_lines"]["demo"]["features"].update(image_size=[8192, 8192]), "features.image_size"),
        (lambda r: r["product_lines"]["demo"]["features"].update(batch_size=100000), "features.batch_size"),
        (lambda r: r["product_lines"]["demo"]["post"].update(blur_sigma=1e9), "post.blur_sigma"),
        (lambda r: r["product_lines"]["demo"]["post"].update(blur_kernel=100001), "post.blur_kernel"),
        (lambda r: r["product_lines"]["demo"]["post"].update(image_score="block_mean", block=10**6), "post.block"),
        (lambda r: r["product_lines"]["demo"]["threshold"].update(rule="manual", value=float("nan")),
         "threshold.value: must be a finite number"),
        (lambda r: r["product_lines"]["demo"]["data"].update(limit=0), "data.limit"),
        (lambda r: r["product_lines"]["demo"]["tune"].update(validation_share=1.5), "tune.validation_share"),
        (lambda r: r["product_lines"]["demo"]["tune"].update(max_templates=0), "tune.max_templates"),
        (lambda r: r["product_lines"]["demo"]["tune"].update(budget_s=-1), "tune: budget_s"),
        (lambda r: r["product_lines"]["demo"]["threshold"].update(rule="normal_fpr", value=1.0),
         "threshold.value: normal_fpr takes the false-alarm rate"),
    ],
)
def test_bad_params_name_the_key(mutate, key):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_params(raw).line("demo")  # a broken line fails when it is used (top-level keys at once)


def test_a_broken_line_fails_alone():
    raw = _raw()
    raw["product_lines"]["other"] = copy.deepcopy(raw["product_lines"]["demo"])
    raw["product_lines"]["demo"]["matching"]["alpahs"] = [0.5]
    params = parse_params(raw)
    assert params.line("other").matching.alphas == params.product_lines["other"].matching.alphas
    with pytest.raises(ConfigError, match=r"product_lines\.demo\.matching: unknown key\(s\) alpahs"):
        params.line("demo")


@pytest.mark.parametrize("name", ["inj;touch M", "inj$(touch M)", "inj`touch M`", "..", "a/../../b", "../../etc",
                                  "--help", "-x", "", "a b", "x" * 65, "line.v2", "ünï"])
def test_unsafe_line_names_are_refused_by_rule(name):
    raw = _raw()
    raw["product_lines"][name] = copy.deepcopy(raw["product_lines"]["demo"])
    params = parse_params(raw)
    assert params.line("demo")
    with pytest.raises(ConfigError, match="a line name is 1-64 letters, digits"):
        params.line(name)


def test_unknown_line_lists_known_ones():
    params = parse_params(_raw())
    with pytest.raises(ConfigError, match="unknown product line 'bottle'.*demo"):
        params.line("bottle")


def test_fingerprint_ignores_batch_size_only():
    raw = _raw()
    a = parse_params(raw).line("demo").features
    raw["product_lines"]["demo"]["features"]["batch_size"] = 1
    b = parse_params(raw).line("demo").features
    raw["product_lines"]["demo"]["features"]["normalisation"] = "official"
    c = parse_params(raw).line("demo").features
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_pinned_keys_are_the_keys_the_entry_sets_to_a_value():
    raw = _raw()
    raw["product_lines"]["bare"] = {"data": {"source": "demo"}, "post": {"blur_sigma": 1.0},
                                    "matching": {"mode": "auto", "forward_windows": "auto"}}
    params = parse_params(raw)
    bare = params.line("bare")
    assert bare.pinned == {"data.source", "post.blur_sigma"}
    assert "post.blur_sigma" not in bare.tunable() and {"matching.mode", "matching.forward_windows"} <= set(
        bare.tunable())
    assert bare.matching == parse_params({"product_lines": {"x": {"data": {"source": "demo"}}}}).line("x").matching
    assert params.line("demo").tunable() == ()  # tune.enabled: false
    raw["product_lines"]["bare"]["features"] = {"batch_size": "auto"}
    with pytest.raises(ConfigError, match=r"product_lines\.bare\.features\.batch_size: `auto` is only for"):
        parse_params(raw).line("bare")