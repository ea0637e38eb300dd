"""hetmm.sources: demo, folder, mvtec and mtd sources, atomic replacement of dest."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from _data_helpers import make_mvtec_tree
from hetmm.data import sources
from hetmm.data.images import load_image, load_mask
from hetmm.data.manifest import discover_mvtec, read_manifest
from hetmm.data.sources import fetch
from hetmm.data.splits import MTD_CLASSES, load_mtd_split, make_mtd_split
from hetmm.errors import ConfigError, DataError
from hetmm.io import sha256_file

SHARED = Path(__file__).resolve().parents[2] / "shared"  # CI clones the repo with shared/ beside it
HAZELNUT = SHARED / "data" / "hazelnut_toy"
MTD = SHARED / "data" / "mtd"
needs_hazelnut = pytest.mark.skipif(not HAZELNUT.is_dir(), reason=f"hazelnut_toy test data not found at {HAZELNUT}")
needs_mtd = pytest.mark.skipif(not (MTD / "MT_Free").is_dir(), reason=f"MTD copy not found at {MTD}")


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)


# ----------------------------------------------------------------------------- demo


def test_demo_is_deterministic_and_in_layout(tmp_path):
    df = fetch("demo", tmp_path / "a")
    fetch("demo", tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert df.equals(read_manifest(tmp_path / "a" / "manifest.csv").astype(df.dtypes.to_dict()))
    counts = df.groupby(["split", "defect_type"]).size().to_dict()
    assert counts == {("train", "good"): 24, ("test", "good"): 10, ("test", "scratch"): 4, ("test", "stain"): 4,
                      ("test", "hole"): 4, ("test", "bright_spot"): 4}
    assert set(df["width"]) == set(df["height"]) == {160} and set(df["mode"]) == {"RGB"}
    assert df["sha256"].is_unique
    for row in df[df["label"] == "defect"].itertuples():
        assert row.mask_path == f"ground_truth/{row.defect_type}/{Path(row.path).stem}.png"
        mask = load_mask(tmp_path / "a" / row.mask_path, (160, 160))
        assert 0.001 < mask.mean() < 0.1, row.path  # visible but small


def test_demo_seed_changes_images_and_counts_are_independent(tmp_path):
    base = fetch("demo", tmp_path / "a", n_train=2, n_test_good=1, n_per_defect=1)
    fewer = fetch("demo", tmp_path / "b", n_train=1, n_test_good=1, n_per_defect=1)
    other = fetch("demo", tmp_path / "c", seed=1, n_train=1, n_test_good=1, n_per_defect=1)
    assert set(fewer["sha256"]) < set(base["sha256"])
    assert not set(other["sha256"]) & set(base["sha256"])


def test_demo_defects_change_only_masked_pixels_visibly(tmp_path):
    fetch("demo", tmp_path, n_train=0, n_test_good=0, n_per_defect=1)
    for kind in sources.DEMO_DEFECTS:
        image = np.asarray(load_image(tmp_path / "test" / kind / "000.png"), dtype=float)
        mask = load_mask(tmp_path / "ground_truth" / kind / "000.png")
        contrast = abs(image[mask].mean() - image[~mask].mean())
        assert contrast > 20, kind


# ----------------------------------------------------------------------------- folder


@needs_hazelnut
def test_folder_source_on_hazelnut_toy(tmp_path):
    df = fetch("folder", tmp_path / "hazelnut", path=str(HAZELNUT))
    assert df.groupby(["split", "defect_type"]).size().to_dict() == {
        ("train", "good"): 28, ("test", "good"): 6, ("test", "colour"): 17}
    for row in df.itertuples():
        assert row.sha256 == sha256_file(HAZELNUT / row.path)  # bytes unchanged
    assert set(df["width"]) == {512} and set(df["height"]) == {512, 522}
    assert (tmp_path / "hazelnut" / "ground_truth" / "colour" / "00.png").is_file()


def test_folder_source_renames_mvtec_masks_and_can_hard_link(tmp_path):
    src = make_mvtec_tree(tmp_path / "src", mask_suffix="_mask")
    df = fetch("folder", tmp_path / "dest", path=str(src), link=True)
    assert sorted(df.loc[df["label"] == "defect", "mask_path"]) == ["ground_truth/crack/000.png",
                                                                    "ground_truth/crack/001.png"]
    assert (tmp_path / "dest" / "train/good/000.png").samefile(src / "train/good/000.png")
    assert discover_mvtec(tmp_path / "dest")  # the normalised dest is itself a valid MVTec tree


def test_failed_fetch_keeps_previous_dest_and_leaves_no_staging(tmp_path, monkeypatch):
    dest = tmp_path / "data"
    fetch("demo", dest, n_train=2, n_test_good=1, n_per_defect=1)
    before = _tree(dest)
    broken = make_mvtec_tree(tmp_path / "broken")
    (broken / "ground_truth" / "crack" / "001.png").unlink()
    with pytest.raises(DataError, match="has no mask"):
        fetch("folder", dest, path=str(broken), masks="required")
    monkeypatch.setitem(sources.MVTEC_URLS, "bottle", "http://127.0.0.1:9/bottle.tar.xz")  # refused at once
    with pytest.raises(DataError, match="could not download"):
        fetch("mvtec", dest, category="bottle")
    assert _tree(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "data"]


def test_unknown_source_and_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown data source 'ftp'"):
        fetch("ftp", tmp_path / "x")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]"):
        fetch("demo", tmp_path / "x", colour="red")
    with pytest.raises(ConfigError, match=r"missing required option\(s\) \['path'\]"):
        fetch("folder", tmp_path / "x")
    with pytest.raises(ConfigError, match=r"option\(s\) \['limit'\] do not apply"):
        fetch("demo", tmp_path / "x", limit=3)
    assert not (tmp_path / "x").exists()


def test_options_of_other_sources_at_their_defaults_are_accepted(tmp_path):
    """A whole ``data:`` params section carries every source's options."""
    df = fetch("demo", tmp_path / "x", seed=0, subset="all", mirror=None, n_train=1, n_test_good=1, n_per_defect=1)
    assert len(df) == 6


# ----------------------------------------------------------------------------- mvtec


@pytest.mark.parametrize("form", ["extracted", "category", "tar.xz"])
def test_mvtec_from_mirror(tmp_path, form, monkeypatch):
    mirror = tmp_path / "mirror"
    if form == "extracted":
        make_mvtec_tree(mirror / "mvtec_anomaly_detection" / "bottle", mask_suffix="_mask")
    elif form == "category":
        make_mvtec_tree(mirror / "bottle", mask_suffix="_mask")
    else:
        make_mvtec_tree(tmp_path / "bottle", mask_suffix="_mask")
        mirror.mkdir()
        with tarfile.open(mirror / "bottle.tar.xz", "w:xz") as tf:
            tf.add(tmp_path / "bottle", arcname="bottle")
    monkeypatch.setenv(sources.MIRROR_ENV, str(mirror))
    df = fetch("mvtec", tmp_path / "out", category="bottle")
    assert len(df) == 7 and (tmp_path / "out" / "ground_truth" / "crack" / "001.png").is_file()


def test_mvtec_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown MVTec AD category 'bottel'"):
        fetch("mvtec", tmp_path / "out", category="bottel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="mirror holds no MVTec AD 'bottle'") as err:
        fetch("mvtec", tmp_path / "out", category="bottle", mirror=str(tmp_path / "empty"))
    assert "bottle.tar.xz" in str(err.value)
    monkeypatch.setitem(sources.MVTEC_URLS, "bottle", "http://127.0.0.1:9/bottle.tar.xz")  # refused at once
    with pytest.raises(DataError, match=f"could not download .*set {sources.MIRROR_ENV}"):
        fetch("mvtec", tmp_path / "out", category="bottle")


# ----------------------------------------------------------------------------- mtd


@needs_mtd
def test_committed_mtd_split_regenerates_from_real_file_names():
    stems = {cls: [p.stem for p in (MTD / cls / "Imgs").glob("*.jpg")] for cls in MTD_CLASSES}
    assert make_mtd_split(stems) == load_mtd_split()


@needs_mtd
def test_mtd_with_limit(tmp_path):
    df = fetch("mtd", tmp_path / "mtd", mirror=str(MTD), limit=2)
    split = load_mtd_split()
    train = df[df["split"] == "train"]
    assert list(train["path"]) == [f"train/good/{s}.jpg" for s in split["train"][:2]]
    test = df[df["split"] == "test"]
    assert test.groupby(["subset", "defect_type"]).size().to_dict() == {
        (part, kind): 2 for part in ("dev", "holdout")
        for kind in ("blowhole", "break", "crack", "fray", "good", "uneven")}
    assert set(train["subset"]) == {"all"} and set(df["mode"]) == {"L"}
    for row in df.itertuples():
        cls = "MT_Free" if row.defect_type == "good" else "MT_" + row.defect_type.capitalize()
        assert row.sha256 == sha256_file(MTD / cls / "Imgs" / Path(row.path).name)
        assert bool(row.mask_path) == (row.label == "defect")


@needs_mtd
def test_mtd_holdout_only_via_env_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, str(MTD))
    df = fetch("mtd", tmp_path / "mtd", subset="holdout", limit=1)
    assert set(df.loc[df["split"] == "test", "subset"]) == {"holdout"} and len(df) == 7


def test_mtd_incomplete_mirror_names_the_missing_file(tmp_path):
    for cls in MTD_CLASSES:
        (tmp_path / "mirror" / cls / "Imgs").mkdir(parents=True)
    with pytest.raises(DataError, match="listed in the committed split") as err:
        fetch("mtd", tmp_path / "mtd", mirror=str(tmp_path / "mirror"), limit=1)
    assert str(tmp_path / "mirror" / "MT_Free" / "Imgs") in str(err.value)
    with pytest.raises(ConfigError, match="'subset' must be one of"):
        fetch("mtd", tmp_path / "mtd", mirror=str(tmp_path / "mirror"), subset="test")


# ----------------------------------------------------------------------------- registry


def test_the_registry_builds_every_source_and_the_config_knows_what_each_needs(tmp_path):
    import inspect

    from hetmm.config import parse_params
    from hetmm.config.sections import SOURCE_NEEDS
    from hetmm.modes import DataSource

    assert list(sources.SOURCES) == list(DataSource)
    for source, spec in sources.SOURCES.items():
        required = {n for n, d in sources.source_options(source).items() if d is inspect.Parameter.empty}
        needed = {SOURCE_NEEDS[source][0]} if source in SOURCE_NEEDS else set()
        assert required <= needed, source  # what the builder cannot run without, the params check refuses first
        assert spec.local is None or spec.local in sources.source_options(source), source
        if needed:
            with pytest.raises(ConfigError, match=rf"product_lines\.x\.data\.{min(needed)}: the {source} source needs"):
                parse_params({"product_lines": {"x": {"data": {"source": str(source)}}}}).line("x")
    with pytest.raises(ConfigError, match="anomalib_folder source needs it"):  # the builder's own check agrees
        fetch("anomalib_folder", tmp_path / "x")


def test_missing_local_inputs_are_named_per_source(tmp_path, monkeypatch):
    folder, table = tmp_path / "tree", tmp_path / "parts.csv"
    folder.mkdir()
    table.write_text("path,label\n")
    assert sources.missing_input("demo", {"path": str(tmp_path / "gone")}) is None
    assert sources.missing_input("folder", {"path": str(folder)}) is None
    assert sources.missing_input("folder", {"path": str(table)}) == f"data.path {table} does not exist on this machine"
    assert sources.missing_input("table", {"path": str(table)}) is None
    assert sources.missing_input("table", {"path": str(folder)}) == f"data.path {folder} does not exist on this machine"
    assert sources.missing_input("anomalib_folder", {"normal_dir": str(tmp_path / "x")}).startswith("data.normal_dir")
    assert sources.missing_input("mtd", {"mirror": None}) is None  # the network
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path / "mirror"))
    assert sources.missing_input("mvtec", {"mirror": None}) == f"the mirror {tmp_path / 'mirror'} does not exist on " \
                                                               "this machine"
    assert sources.missing_input("mvtec", {"mirror": str(folder)}) is None


def test_download_help_lists_every_source_of_the_registry():
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("hetmm")
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hetmm.cli"]
    proc = subprocess.run([*command, "download", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    shown = " ".join(proc.stdout.replace("│", " ").split())  # rich wraps the help in a box at any width
    assert f"(source {', '.join(sources.SOURCES)})" in shown
