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
        (lambda r: r["product_lines"]["demo"]["matching"].update(alpahs=[0.5]),
         "product_lines.demo.matching: unknown key(s) alpahs"),
        (lambda r: r["product_lines"]["demo"]["matching"].update(alphas=[0.5, 0.5]),
         "product_lines.demo.matching.alphas"),
        (lambda r: r["product_lines"]["demo"]["matching"].update(alphas=[0.5, 1.5, 0.5]),
         "product_lines.demo.matching.alphas[1]"),
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
        (lambda r: r["product_lines"]["demo"]["tune"].update(confidence=1.0), "tune.confidence: must lie in [0, 1)"),
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

# --------------------------------------------------------------------------- ProductLine.with_keys


def _reparsed(line, changes):
    """The line serialised to its YAML sections, changed, and parsed and checked again (what the tuner did before
    ``with_keys``): the reference ``with_keys`` must equal."""
    import json

    from hetmm.config import ProductLine, build_config, validate_line
    from hetmm.pipeline.settings import sections

    raw = sections(line)
    for dotted, value in changes.items():
        section, name = dotted.split(".")
        raw[section][name] = json.loads(json.dumps(value))  # as YAML holds it: enums as values, tuples as lists
    key = f"product_lines.{line.name}"
    out = build_config(ProductLine, raw, key, name=line.name, pinned=line.pinned)
    validate_line(out, key)
    return out


def _line():
    entry = {"data": {"source": "demo", "limit": 5}, "matching": {"mode": "forward", "alphas": [0.25, 0.5, 0.75]},
             "post": {"blur_sigma": 2, "image_score": "block_mean", "block": 48}, "features": {"backbone": "auto"},
             "threshold": {"rule": "synthetic_f1"}}
    return parse_params({"product_lines": {"bolts": entry}}).line("bolts")


def _every_tunable_option():
    from hetmm.config import TUNABLE_KEYS

    line = _line()
    for key, spec in TUNABLE_KEYS.items():
        for value in spec.options:
            yield {key: (value,) * len(line.features.layers) if spec.per_layer else value}


CHANGES = [
    {},
    {"matching.mode": "patch"},
    {"matching.mode": "backward", "matching.forward_windows": [7, 5, 3], "matching.alphas": (1, 0, 0.5)},
    {"post.blur_sigma": 3, "post.blur_kernel": 9, "post.image_score": "max", "post.block": None},
    {"features.image_size": [320, 320], "features.backbone": "efficientnet_lite1", "features.pool": 3},
    {"features.layers": (2, 3), "matching.forward_windows": (5, 3), "matching.backward_windows": [3, 3],
     "matching.alphas": [0.5, 0.5], "matching.weights": [1, 0.5]},
    {"templates.kind": "COVER", "templates.target_radius": 0.3},
    {"threshold.rule": "manual", "threshold.value": 0.75},
    {"data.source": "folder", "data.path": "/parts/bolts"},
    {"tfa_net.preset": "paper", "tune.budget_s": 10, "report.ablation_sizes": [10, 20]},
    *_every_tunable_option(),
]


@pytest.mark.parametrize("changes", CHANGES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "none")
def test_with_keys_equals_the_reparsed_line(changes):
    line = _line()
    changed = line.with_keys(changes)
    assert changed == _reparsed(line, changes)
    assert changed.pinned == line.pinned and changed.name == line.name
    for dotted in changes:  # coerced like the parser does: tuples, floats, enums
        section, name = dotted.split(".")
        assert type(getattr(getattr(changed, section), name)) is type(getattr(getattr(_reparsed(line, changes),
                                                                                      section), name))


@pytest.mark.parametrize("changes, message", [
    ({"matching.alphas": [0.5, 1.5, 0.5]}, "product_lines.bolts.matching.alphas[1]: alpha weights the forward map"),
    ({"matching.forward_windows": [5, "3", 3]}, "product_lines.bolts.matching.forward_windows[1]: expected an integer"),
    ({"matching.mode": "sideways"}, "product_lines.bolts.matching.mode: 'sideways' is not one of"),
    ({"matching.alpahs": [0.5]}, "product_lines.bolts.matching: unknown key(s) alpahs"),
    # a changed section is checked against the others: fewer layers need fewer per-layer values
    ({"features.layers": [1, 2]}, "product_lines.bolts.matching.forward_windows: needs one value per layer"),
    ({"features.image_size": [32, 32]}, "product_lines.bolts.post.block: the block must fit the map (32 px)"),
    ({"post.blur_sigma": 1e9}, "product_lines.bolts.post.blur_sigma: must be in 0..256"),
    ({"threshold.rule": "normal_quantile"}, "product_lines.bolts.threshold.value: normal_quantile needs a quantile"),
    ({"data.source": "mvtec"}, "product_lines.bolts.data.category: the mvtec source needs a category name"),
])
def test_with_keys_errors_name_the_full_key_like_the_parser(changes, message):
    line = _line()
    with pytest.raises(ConfigError) as parsed:
        _reparsed(line, changes)
    with pytest.raises(ConfigError) as replaced:
        line.with_keys(changes)
    assert str(replaced.value) == str(parsed.value) and str(replaced.value).startswith(message)


def test_with_keys_refuses_what_is_not_a_section_key():
    for dotted in ("method", "matching", "colour.red"):
        with pytest.raises(ConfigError, match=rf"product_lines\.bolts\.{dotted}: not a section key"):
            _line().with_keys({dotted: 1})


def test_tunable_table_drives_the_key_order_and_auto():
    from hetmm.config import TUNABLE, TUNABLE_KEYS, phase_keys

    assert TUNABLE == tuple(TUNABLE_KEYS)
    assert sum((phase_keys(p) for p in ("matching", "features", "layers", "templates")), ()) == TUNABLE
    line = _line()  # pins matching.mode, matching.alphas and post.blur_sigma; features.backbone is `auto`
    assert line.tunable() == tuple(k for k in TUNABLE if k not in ("matching.mode", "matching.alphas",
                                                                 "post.blur_sigma"))
    assert line.with_keys({"tune.enabled": False}).tunable() == ()


# --------------------------------------------------------------------------- rules and sources as enums


def test_threshold_rules_and_sources_parse_to_their_enums():
    from hetmm.config import ORACLE_RULES
    from hetmm.modes import DataSource, ThresholdRule

    line = _line()
    assert line.threshold.rule is ThresholdRule.SYNTHETIC_F1 and line.data.source is DataSource.DEMO
    assert set(ORACLE_RULES) == {r for r in ThresholdRule if r.oracle} == {"f1_max", "normal_quantile"}
    raw = _raw()
    raw["product_lines"]["demo"]["threshold"] = {"rule": "normal_fpf"}
    with pytest.raises(ConfigError, match=r"threshold\.rule: 'normal_fpf' is not one of 'normal_fpr', "):
        parse_params(raw).line("demo")
