"""Code-keyed artifacts: code digests, and what a change of feature, template or matching code recomputes.

The stage tests inject a different code digest (monkeypatching :mod:`hetmm.pipeline.provenance`); the DVC life-cycle
test (``tests/test_dvc_pipeline.py``) edits ``hetmm/core/features.py`` itself in a copy of the repository.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from conftest import folder_line, run_stages, write_params
from hetmm.errors import TemplateMismatchError
from hetmm.pipeline import provenance
from hetmm.pipeline.line import LinePaths
from hetmm.pipeline.predict import predict_images, update_template

STAGES = ("download", "validate", "tune", "extract", "template", "calibrate", "infer")


def _module(tmp_path: Path, name: str, source: str):
    (tmp_path / f"{name}.py").write_text(source)
    provenance._module_digest.cache_clear()
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_code_digest_ignores_comments_and_docstrings_but_not_statements(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    base = _module(tmp_path, "probe_mod", 'def f(x):\n    return x + 1\n')
    digest = provenance.code_digest(base)
    same = _module(tmp_path, "probe_mod", '"""Doc."""\n\n\ndef f(x):  # why\n    """Adds one."""\n    return x + 1\n')
    assert provenance.code_digest(same) == digest
    edited = _module(tmp_path, "probe_mod", 'def f(x):\n    y = x + 1\n    return y\n')
    assert provenance.code_digest(edited) != digest
    provenance._module_digest.cache_clear()


def test_code_digests_follow_the_core_imports():
    from hetmm.core import features, inspector, matching

    assert provenance.code_digest(features) != provenance.code_digest(matching)
    _, imports = provenance._module_digest("hetmm.core.inspector")
    assert {"hetmm.core.scoring", "hetmm.core.features", "hetmm.core.templates"} <= imports
    # the inspector's digest covers matching (imported through scoring), so a matching edit re-matches; the
    # feature digest does not (a matching edit keeps the feature cache)
    assert provenance.match_code() == provenance.code_digest(inspector) == provenance.code_digest(inspector, matching)
    assert "hetmm.core.matching" in provenance.covered(inspector)
    assert "hetmm.core.matching" not in provenance.covered(features)
    assert {"hetmm.core.features", "hetmm.core.backbones"} <= provenance.covered(features)


@pytest.fixture
def all_line(folder_src, tmp_path):
    root = tmp_path / "repo"
    params = write_params(root, {"line": folder_line(folder_src, kind="ALL")})
    run_stages(params, "line", root, STAGES)
    return params, root, LinePaths.for_line("line", root)


def _other(monkeypatch, name: str) -> None:
    """Make ``provenance.<name>()`` return another digest, as an edit of that code would."""
    digest = getattr(provenance, name)()
    monkeypatch.setattr(provenance, name, lambda: "edited-" + digest)


def test_feature_code_change_recomputes_every_feature_and_rebuilds(all_line, monkeypatch):
    params, root, paths = all_line
    _other(monkeypatch, "feature_code")
    out = run_stages(params, "line", root, STAGES)
    assert (out["extract"]["computed"], out["extract"]["reused"]) == (50, 0)
    assert out["extract"]["reason"] == "feature code changed" and out["extract"]["pruned"] == 50
    assert out["template"]["action"] == "rebuild"
    assert out["template"]["reason"] == "feature code changed since the previous template was built"
    assert out["infer"]["matching"]["sheets_matched"] == 24
    assert "features (settings or code)" in out["infer"]["matching"]["reason"]


def test_template_code_change_rebuilds_the_template_only(all_line, monkeypatch):
    params, root, paths = all_line
    _other(monkeypatch, "template_code")
    out = run_stages(params, "line", root, STAGES)
    assert out["extract"]["computed"] == 0 and out["extract"]["reason"] == "feature settings and code unchanged"
    assert out["template"]["action"] == "rebuild"
    assert out["template"]["reason"] == "template code changed since the previous template was built"
    assert out["infer"]["matching"]["sheets_matched"] == 24
    assert out["infer"]["matching"]["reason"] == "changed since the stored matches: template code"


def test_matching_code_change_rematches_with_the_template_kept(all_line, monkeypatch):
    params, root, paths = all_line
    unchanged = run_stages(params, "line", root, STAGES)
    assert unchanged["infer"]["matching"]["sheets_matched"] == 0  # distances reused while the code is the same
    _other(monkeypatch, "match_code")
    out = run_stages(params, "line", root, STAGES)
    assert out["extract"]["computed"] == 0 and out["template"]["action"] == "unchanged"
    assert out["infer"]["matching"] == {"images_reused": 0, "sheets_matched": 24,
                                        "reason": "changed since the stored matches: matching code"}


def test_predict_and_update_refuse_a_template_of_other_feature_code(all_line, monkeypatch, tmp_path):
    params, root, paths = all_line
    run_stages(params, "line", root, ("report",))
    image = next((Path(params.line("line").data.path) / "test" / "good").iterdir())
    assert predict_images(params.line("line"), paths, [image], tmp_path / "ok", device="cpu", progress=False)
    _other(monkeypatch, "feature_code")
    for call in (lambda: predict_images(params.line("line"), paths, [image], tmp_path / "out", device="cpu",
                                        progress=False),
                 lambda: update_template(params.line("line"), paths, [image], device="cpu", progress=False)):
        with pytest.raises(TemplateMismatchError, match=r"other code .* rebuild it with `dvc repro template@line`"):
            call()
    assert not (tmp_path / "out").exists()


def test_a_template_from_before_code_digests_is_rebuilt(all_line):
    params, root, paths = all_line
    from hetmm.core.templates import load_template, save_template
    from hetmm.core.templates.store import _finish

    tset = load_template(paths.template)
    meta = {k: v for k, v in tset.meta.items() if k not in ("code", "content_hash")}
    save_template(paths.template, _finish(tset.layers, tset.easy, meta))
    out = run_stages(params, "line", root, ("template",))
    assert out["template"]["action"] == "rebuild"
    assert out["template"]["reason"].startswith("feature code and template code changed")
