"""hetmm.validation: great-expectations suite plus image checks (GX imported once, module fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from _data_helpers import write_image
from hetmm.data.manifest import build_manifest, discover_mvtec, read_manifest
from hetmm.data.sources import fetch
from hetmm.data.validation import validate


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    fetch("demo", root)
    return root


@pytest.fixture(scope="module")
def clean(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean_report")
    result = validate(read_manifest(demo / "manifest.csv"), demo, out / "v.json", out / "v.html")
    return result, out


@pytest.fixture(scope="module")
def broken(demo, tmp_path_factory):
    """A copy of the demo data with one problem per file, and its (rebuilt) manifest."""
    root = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(demo, root)
    cut = root / "test/scratch/000.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    write_image(root / "ground_truth/stain/000.png", np.zeros((100, 100), np.uint8))
    with Image.open(root / "ground_truth/hole/000.png") as mask:  # blurred: a soft map, not a label
        mask.filter(ImageFilter.GaussianBlur(6)).save(root / "ground_truth/hole/000.png")
    soft = np.asarray(Image.open(root / "ground_truth/hole/001.png")).copy()
    soft[np.nonzero(soft)[0][0], :] = np.where(soft[np.nonzero(soft)[0][0], :] > 0, 200, 60)  # one soft row
    write_image(root / "ground_truth/hole/001.png", soft)
    write_image(root / "ground_truth/bright_spot/000.png", np.zeros((160, 160), np.uint8))
    shutil.copyfile(root / "train/good/000.png", root / "test/good/000.png")  # same image in train and test
    df = build_manifest(discover_mvtec(root), root, progress=False)
    df.loc[df["path"] == "train/good/005.png", ["label", "defect_type", "mask_path"]] = [
        "defect", "stain", "ground_truth/stain/001.png"]  # a defect among the templates
    out = tmp_path_factory.mktemp("broken_report")
    return validate(df, root, out / "v.json", out / "v.html"), root, out


def test_demo_data_pass(clean):
    result, out = clean
    assert result.success, result.failures
    assert result.failures == [] and result.warnings == []
    assert result.stats["n_images"] == 50 and result.stats["masks"]["checked"] == 16
    assert result.stats["expectations"]["unsuccessful_expectations"] == 0
    saved = json.loads((out / "v.json").read_text())
    assert saved["success"] is True and saved["great_expectations"]["success"] is True
    page = (out / "v.html").read_text()
    assert "PASSED" in page and "<script" not in page and "http" not in page  # self-contained


def test_broken_copy_fails_naming_each_file(broken):
    result, root, out = broken
    assert not result.success
    text = "\n".join(result.failures)
    expected = {
        "truncated image": f"{root / 'test/scratch/000.png'}: image data is truncated",
        "mask size": f"{root / 'ground_truth/stain/000.png'}: mask is 100x100 but its image "
                     f"{root / 'test/stain/000.png'} is 160x160",
        "blurred mask": f"{root / 'ground_truth/hole/000.png'}: mask is not binary",
        "train defect": "training image that is not good (templates must be defect-free) [label]: train/good/005.png",
        "duplicate": "duplicate images (identical sha256, e.g. one image in both train and test) [sha256]: "
                     "train/good/000.png, test/good/000.png",
    }
    for what, fragment in expected.items():
        assert fragment in text, what
    assert len(result.failures) == len(expected)
    assert str(root / "ground_truth/bright_spot/000.png") not in text  # empty mask: a warning only
    assert any("bright_spot/000.png: defect mask is empty" in w for w in result.warnings)


def test_nonbinary_fraction_is_reported(broken):
    result, root, out = broken
    fractions = result.stats["masks"]["nonbinary_fraction"]
    assert fractions["ground_truth/hole/000.png"] > 0.05
    assert 0 < fractions["ground_truth/hole/001.png"] < 0.01
    assert any("in-between grey levels" in w for w in result.warnings)
    saved = json.loads((out / "v.json").read_text())
    assert saved["success"] is False and saved["stats"]["masks"]["nonbinary_fraction"] == fractions
    page = (out / "v.html").read_text()
    assert "FAILED" in page and "test/scratch/000.png" in page


def test_manifest_without_columns_fails_without_great_expectations(demo, tmp_path):
    df = read_manifest(demo / "manifest.csv").drop(columns=["sha256"])
    result = validate(df, demo, tmp_path / "v.json", tmp_path / "v.html")
    assert not result.success and "missing columns ['sha256']" in result.failures[0]
    assert json.loads((tmp_path / "v.json").read_text())["great_expectations"] is None


def test_validation_record_is_the_same_for_the_same_data(demo, tmp_path):
    """Later stages depend on validation.json: a rerun on unchanged data must not change it (no times, no ids)."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for out in (first, second):
        validate(read_manifest(demo / "manifest.csv"), demo, out, tmp_path / "v.html")
    assert first.read_bytes() == second.read_bytes()
    assert "seconds" in (tmp_path / "v.html").read_text()
