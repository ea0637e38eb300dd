"""hetmm.data: loading with clear errors, discovery of MVTec-layout trees, manifests."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image, ImageFile

from _data_helpers import make_mvtec_tree, noise_rgb, square_mask, write_image
from hetmm.data.images import load_image, load_mask, read_mask_levels
from hetmm.data.manifest import (
    MANIFEST_COLUMNS,
    build_manifest,
    discover_mvtec,
    manifest_hash,
    read_manifest,
    write_manifest,
)
from hetmm.errors import DataError

# ----------------------------------------------------------------------------- load_image


def test_rgb_and_grey_load_as_rgb(tmp_path):
    rgb = noise_rgb(0)
    assert np.array_equal(np.asarray(load_image(write_image(tmp_path / "a.png", rgb))), rgb)
    grey = write_image(tmp_path / "g.jpg", rgb[..., 0], quality=95)
    img = load_image(grey)
    assert img.mode == "RGB" and img.size == (32, 24)
    assert load_image(grey, mode="L").mode == "L"


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:12, :, 3] = 255  # top half opaque, bottom half fully transparent
    rgba[12:, :16, 3] = 128
    img = np.asarray(load_image(write_image(tmp_path / "a.png", rgba)))
    assert tuple(img[0, 0]) == (200, 100, 50)
    assert tuple(img[20, 20]) == (0, 0, 0)
    assert tuple(img[20, 0]) == (100, 50, 25)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    levels = np.zeros((24, 32), np.uint16)
    levels[0, 0], levels[0, 1], levels[0, 2] = 65535, 257 * 100, 300
    path = write_image(tmp_path / "deep.png", levels)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I;16")
    img = np.asarray(load_image(path))
    assert img.dtype == np.uint8 and img.shape == (24, 32, 3)
    assert list(img[0, :3, 0]) == [255, 100, 1]


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1", "I"])
def test_other_modes_load_as_rgb(tmp_path, mode):
    ext = {"CMYK": ".jpg", "I": ".tif"}.get(mode, ".png")
    source = Image.fromarray(noise_rgb(1)).convert(mode)
    source.save(tmp_path / f"x{ext}")
    img = load_image(tmp_path / f"x{ext}")
    assert img.mode == "RGB" and img.size == (32, 24)


def test_palette_transparency_is_composited(tmp_path):
    img = Image.new("P", (32, 24), 1)
    img.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    img.info["transparency"] = 1
    img.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_image(tmp_path / "p.png")).max() == 0


def test_truncated_jpeg_is_refused_even_if_pillow_was_made_lenient(tmp_path, monkeypatch):
    path = write_image(tmp_path / "cut.jpg", noise_rgb(2, (200, 150)), quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do globally
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").touch()
    with pytest.raises(DataError, match=r"empty \(0 bytes\)") as err:
        load_image(tmp_path / "empty.png")
    assert str(tmp_path / "empty.png") in str(err.value)


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(DataError, match="not an image") as err:
        load_image(tmp_path / "notes.png")
    assert str(tmp_path / "notes.png") in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(err.value)


@pytest.mark.parametrize("size", [(20000, 8), (4, 4)])
def test_absurd_size(tmp_path, size):
    Image.new("1", size).save(tmp_path / "odd.png")  # 1-bit: tiny file even when huge
    with pytest.raises(DataError, match=f"absurd image size {size[0]}x{size[1]}") as err:
        load_image(tmp_path / "odd.png")
    assert "odd.png" in str(err.value)


# ----------------------------------------------------------------------------- masks


def test_mask_threshold_and_colour_annotation(tmp_path):
    levels = np.zeros((24, 32), np.uint8)
    levels[0, :4] = (127, 128, 200, 255)
    assert load_mask(write_image(tmp_path / "m.png", levels))[0, :4].tolist() == [False, True, True, True]
    red = np.zeros((24, 32, 3), np.uint8)
    red[2:5, 2:5, 0] = 255  # a red annotation is foreground although its luminance is < 128
    assert load_mask(write_image(tmp_path / "red.png", red)).sum() == 9


def test_mask_of_wrong_size_names_both_files(tmp_path):
    mask = write_image(tmp_path / "gt" / "000.png", square_mask((30, 20)))
    image = tmp_path / "test" / "000.png"
    with pytest.raises(DataError) as err:
        load_mask(mask, (32, 24), image_path=image)
    message = str(err.value)
    assert str(mask) in message and str(image) in message and "30x20" in message and "32x24" in message


def test_mask_levels_keep_grey(tmp_path):
    levels = square_mask()
    levels[4, 6] = 90
    assert read_mask_levels(write_image(tmp_path / "m.png", levels))[4, 6] == 90


# ----------------------------------------------------------------------------- discovery


@pytest.mark.parametrize(("mask_suffix", "image_ext"), [("_mask", ".png"), ("", ".JPG")])
def test_discover_accepts_both_mask_names_and_any_case(tmp_path, mask_suffix, image_ext):
    refs = discover_mvtec(make_mvtec_tree(tmp_path, mask_suffix=mask_suffix, image_ext=image_ext))
    (tmp_path / "train" / "good" / "notes.txt").write_text("ignored")
    assert [r["split"] for r in refs] == ["train"] * 3 + ["test"] * 4
    crack = [r for r in refs if r["defect_type"] == "crack"]
    assert [r["mask_path"] for r in crack] == [f"ground_truth/crack/00{i}{mask_suffix}.png" for i in range(2)]
    assert all(r["label"] == "defect" for r in crack)
    assert all(r["mask_path"] == "" and r["label"] == "good" for r in refs if r["defect_type"] == "good")
    assert refs[0]["path"] == f"train/good/000{image_ext}"


def test_missing_mask_names_image_and_both_candidates(tmp_path):
    make_mvtec_tree(tmp_path)
    (tmp_path / "ground_truth" / "crack" / "001.png").unlink()
    with pytest.raises(DataError) as err:
        discover_mvtec(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "test" / "crack" / "001.png") in message
    assert "001_mask.png and 001.png" in message


def test_empty_training_folder(tmp_path):
    make_mvtec_tree(tmp_path)
    shutil.rmtree(tmp_path / "train" / "good")
    (tmp_path / "train" / "good").mkdir()
    with pytest.raises(DataError, match="no training images") as err:
        discover_mvtec(tmp_path)
    assert str(tmp_path / "train" / "good") in str(err.value)


def test_defect_class_under_train(tmp_path):
    make_mvtec_tree(tmp_path)
    write_image(tmp_path / "train" / "crack" / "x.png", noise_rgb(99))
    with pytest.raises(DataError, match="may only hold good") as err:
        discover_mvtec(tmp_path)
    assert str(tmp_path / "train" / "crack") in str(err.value)


# ----------------------------------------------------------------------------- manifest


def test_manifest_facts_roundtrip_and_hash(tmp_path):
    root = make_mvtec_tree(tmp_path / "ds")
    write_image(root / "train" / "good" / "grey.png", noise_rgb(7)[..., 0])
    df = build_manifest(discover_mvtec(root), root, progress=False)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    grey = df.set_index("path").loc["train/good/grey.png"]
    assert (grey["width"], grey["height"], grey["mode"]) == (32, 24, "L")
    write_manifest(df, tmp_path / "manifest.csv")
    back = read_manifest(tmp_path / "manifest.csv")
    pd_equal = back.equals(df.astype(back.dtypes.to_dict()))
    assert pd_equal and back.loc[0, "mask_path"] == ""
    assert manifest_hash(back.sample(frac=1, random_state=0)) == manifest_hash(df)
    changed = df.copy()
    changed.loc[0, "split"] = "test"
    assert manifest_hash(changed) != manifest_hash(df)


def test_build_manifest_names_a_non_image(tmp_path):
    root = make_mvtec_tree(tmp_path)
    (root / "test" / "good" / "readme.png").write_text("hello")
    with pytest.raises(DataError, match="not an image") as err:
        build_manifest(discover_mvtec(root), root, progress=False)
    assert str(root / "test" / "good" / "readme.png") in str(err.value)


def test_read_manifest_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,split\na.png,train\n")
    with pytest.raises(DataError, match="lacks columns"):
        read_manifest(tmp_path / "m.csv")
