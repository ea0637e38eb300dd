"""Nothing silently wrong, nothing lost: stale thresholds, feature-cache bit rot, unvalidated data, non-finite maps,
a failing report, concurrent writers, a missing source. Real stage runs on small real images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SUBPROCESS_ENV, folder_line, run_stages, write_params
from hetmm.errors import DataError
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import LinePaths
from hetmm.pipeline.lock import LineBusyError, line_lock
from hetmm.pipeline.predict import predict_images
from hetmm.pipeline.provenance import FeatureKey


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_tree):
    """A complete folder-line run (random features, PTS K=10) and its source, copied by each test."""
    base = tmp_path_factory.mktemp("finished_run")
    src = Path(shutil.copytree(demo_tree, base / "src"))
    run_stages(write_params(base / "repo", {"line": folder_line(src)}), "line", base / "repo")
    return base


@pytest.fixture
def run_copy(finished_run, tmp_path):
    base = Path(shutil.copytree(finished_run, tmp_path / "base"))
    params = write_params(base / "repo", {"line": folder_line(base / "src")})
    return params, base / "repo", LinePaths.for_line("line", base / "repo"), base / "src"


def _cache(params, paths) -> FeatureCache:
    return FeatureCache(paths.features, FeatureKey.of(params.line("line").features))


def _image(src: Path) -> Path:
    return next((src / "test" / "good").iterdir())


def test_a_threshold_chosen_for_another_template_is_refused(run_copy, tmp_path):
    params, root, paths, src = run_copy
    predict_images(params.line("line"), paths, [_image(src)], tmp_path / "ok", device="cpu", progress=False)
    rebuilt = write_params(root, {"line": folder_line(src, k=6)})  # a rebuild; infer and report not rerun
    assert run_stages(rebuilt, "line", root, ("template",))["template"]["action"] == "rebuild"
    with pytest.raises(DataError, match=r"threshold\.json: the threshold was chosen for model .* report@line"):
        predict_images(rebuilt.line("line"), paths, [_image(src)], tmp_path / "stale", device="cpu", progress=False)
    run_stages(rebuilt, "line", root, ("calibrate", "infer", "report"))
    out = predict_images(rebuilt.line("line"), paths, [_image(src)], tmp_path / "fresh", device="cpu", progress=False)
    assert out["threshold"] == json.loads(paths.threshold.read_text())["threshold"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "non_finite_but_signed"])
def test_damaged_feature_cache_entries_are_named_and_recomputed(run_copy, damage):
    params, root, paths, _ = run_copy
    cache = _cache(params, paths)
    sha = sorted(p.stem for p in cache.dir.glob("*.pt"))[3]
    entry = cache.path(sha)
    original = cache.load_one(sha)[0]
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # sign bits of values in the tensor payload: still a loadable file
        for i in range(len(data) // 2, len(data) // 2 + 64, 4):
            data[i + 3] ^= 0x80
        entry.write_bytes(bytes(data))
    else:  # a saved entry, checksum and all, whose values are NaN
        layers, box = cache.load_one(sha)
        cache.save(sha, [torch.full_like(t, float("nan")) for t in layers], box)
    if damage != "non_finite_but_signed":
        with pytest.raises(DataError, match=str(entry)):
            cache.load_one(sha)
        out = run_stages(params, "line", root, ("extract",))["extract"]
        assert (out["computed"], out["repaired"]) == (1, 1)
        # recomputed alone, not in its first batch: equal up to float summation order
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cache.load_one(sha)[0], original))
    else:
        before = (paths.outputs / "scores.csv").read_bytes()
        with pytest.raises(DataError, match="non-finite anomaly map"):
            run_stages(params, "line", root, ("infer",))
        assert (paths.outputs / "scores.csv").read_bytes() == before  # nothing written


def test_stages_refuse_data_that_did_not_pass_validation(run_copy, tmp_path):
    params, root, paths, _ = run_copy
    outside = tmp_path / "outside.png"
    shutil.copy(_image(paths.data), outside)
    manifest = paths.manifest.read_text().splitlines()
    row = manifest[1].split(",")
    row[0] = "../../../outside.png"
    paths.manifest.write_text("\n".join([*manifest, ",".join(row)]) + "\n")
    before = paths.template.read_bytes()
    for stage in ("extract", "template", "infer"):
        with pytest.raises(DataError, match="the data changed since the last validation; run `hetmm validate line`"):
            run_stages(params, "line", root, (stage,))
    with pytest.raises(DataError, match="validation failed"):
        run_stages(params, "line", root, ("validate",))
    with pytest.raises(DataError, match="the last validation failed"):
        run_stages(params, "line", root, ("template",))
    assert paths.template.read_bytes() == before


def test_a_failing_report_leaves_the_previous_report_whole(run_copy):
    params, root, paths, _ = run_copy
    kept = {p: p.read_bytes() for p in paths.reports.rglob("*") if p.is_file()} | {paths.threshold:
                                                                                 paths.threshold.read_bytes()}
    maps = np.load(paths.outputs / "maps.npy")
    maps[0, 0, 0] = np.nan
    np.save(paths.outputs / "maps.npy", maps)
    with pytest.raises(DataError, match=r"maps\.npy: non-finite"):
        run_stages(params, "line", root, ("report",))
    assert {p: p.read_bytes() for p in kept} == kept


def test_one_writer_per_line(run_copy):
    params, root, paths, _ = run_copy
    with line_lock(root, "line"):
        with pytest.raises(LineBusyError, match=r"line 'line' is being processed by another hetmm process \(pid"):
            with line_lock(root, "line"):
                pass
        done = subprocess.run([sys.executable, "-m", "hetmm.cli", "extract", "line", "--root", str(root),
                               "--params", str(root / "params.yaml"), "-q"], capture_output=True, text=True,
                              env={**__import__("os").environ, **SUBPROCESS_ENV}, timeout=300)
        assert done.returncode == 1 and "is being processed by another hetmm process" in done.stderr
        with line_lock(root, "other"):  # other lines are not blocked
            pass
    with line_lock(root, "line"):  # released with its holder
        pass


def test_a_missing_source_keeps_the_intact_copy_and_a_damaged_copy_is_refused(run_copy, capfd, monkeypatch):
    params, root, paths, src = run_copy
    shutil.rmtree(src)
    with pytest.raises(DataError, match="HETMM_KEEP_COPY=1"):  # not asked to: a typo must not pass
        run_stages(params, "line", root, ("download",))
    monkeypatch.setenv("HETMM_KEEP_COPY", "1")
    out = run_stages(params, "line", root, ("download",))["download"]
    assert out["kept"] is True and "does not exist on this machine" in out["reason"] and out["images"] == 50
    assert "keeping the earlier copy" in capfd.readouterr().err
    next((paths.data / "train" / "good").iterdir()).write_bytes(b"changed")
    with pytest.raises(DataError, match="no intact earlier copy"):
        run_stages(params, "line", root, ("download",))


def test_windows_wider_than_the_map_run_end_to_end(folder_src, tmp_path):
    root = tmp_path / "repo"
    params = write_params(root, {"line": folder_line(folder_src, size=64, matching={
        "forward_windows": [13, 13, 13], "backward_windows": [13, 7, 13]})})
    out = run_stages(params, "line", root)
    assert out["infer"]["images"] == 26 and np.isfinite(out["report"]["image_auroc"])


def test_fewer_training_images_than_k_is_said(folder_src, tmp_path, capfd):
    for image in sorted((folder_src / "train" / "good").iterdir())[4:]:
        image.unlink()
    root = tmp_path / "repo"
    params = write_params(root, {"line": folder_line(folder_src, kind="PTS", k=10)})
    out = run_stages(params, "line", root, ("download", "validate", "extract", "template"))
    assert out["template"]["note"] == ("PTS asked for K=10 sheets but the line has 4 training images: kept them all")
    assert "PTS asked for K=10 sheets" in capfd.readouterr().err


def test_predict_names_a_broken_link(run_copy, tmp_path):
    params, root, paths, src = run_copy
    link = tmp_path / "part.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"part\.png: broken symbolic link to .*gone\.png"):
        predict_images(params.line("line"), paths, [link], tmp_path / "out", device="cpu", progress=False)
