"""Hostile inputs to the data layer and to ``features.weights``: each must load correctly or fail with one line
naming the file and the fix, never a traceback and never silently (real files made in ``tmp_path``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from _data_helpers import make_mvtec_tree, noise_rgb, square_mask, write_image
from hetmm.core.backbones import build_backbone
from hetmm.data.images import image_facts, load_image, load_mask, read_mask_levels
from hetmm.data.manifest import discover_mvtec, read_manifest
from hetmm.data.sources import fetch
from hetmm.data.validation import validate
from hetmm.errors import ConfigError, DataError, WeightsNotFoundError

DEFECT, MASK = "test/crack/000.png", "ground_truth/crack/000.png"


def fetch_and_validate(src: Path, tmp_path: Path):
    """What the download and validate stages do: the folder source, then validation of its manifest."""
    dest = tmp_path / "data"
    fetch("folder", dest, path=str(src))
    return validate(read_manifest(dest / "manifest.csv"), dest, tmp_path / "v.json", tmp_path / "v.html"), dest


def save_with_orientation(path: Path, upright: np.ndarray, orientation: int, **save_args) -> None:
    """Store ``upright`` the way a camera does: pixels turned, EXIF ``Orientation`` telling how to turn them back."""
    stored = {1: upright, 3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif.tobytes(), **save_args)


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize(("orientation", "size"), [(6, (32, 24)), (8, (24, 24))])
def test_rotated_jpeg_lines_up_with_its_upright_mask(tmp_path, orientation, size):
    # The square case used to pass validation while image and mask were 90 degrees apart.
    src = make_mvtec_tree(tmp_path / "src")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[4:12, 6:16] = 255
    upright = np.where(mask[..., None] > 0, 240, 20).astype(np.uint8).repeat(3, axis=2)
    (src / DEFECT).unlink()
    save_with_orientation(src / "test/crack/000.jpg", upright, orientation, quality=95)
    write_image(src / MASK, mask)

    result, dest = fetch_and_validate(src, tmp_path)
    assert result.success, result.failures
    image_file = dest / "test/crack/000.jpg"
    assert image_facts(image_file)[:2] == size
    row = read_manifest(dest / "manifest.csv").set_index("path").loc["test/crack/000.jpg"]
    assert (row.width, row.height) == size
    bright = np.asarray(load_image(image_file, mode="L")) > 128
    assert np.array_equal(bright, load_mask(dest / MASK, size, image_path=image_file))


def test_mask_orientation_is_applied_too(tmp_path):
    save_with_orientation(tmp_path / "m.png", square_mask(), 3)
    assert np.array_equal(load_mask(tmp_path / "m.png", (32, 24)), square_mask() > 0)


def _save_tagged(path: Path, stored: np.ndarray, orientation: int, **options) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **options)


@pytest.mark.parametrize(("suffix", "options"), [("png", {}), ("jpg", {"quality": 100}),
                                                 ("tif", {"compression": "tiff_lzw"})])
def test_header_size_and_pixels_follow_every_orientation(tmp_path, suffix, options):
    stored = noise_rgb(0)[..., 0]
    # 0 and 9 are invalid tags (the image stays as stored); libtiff refuses to write them
    for orientation in range(1, 9) if suffix == "tif" else range(10):
        path = tmp_path / f"{orientation}.{suffix}"
        _save_tagged(path, stored, orientation, **options)
        with Image.open(path) as img:
            expected = np.asarray(ImageOps.exif_transpose(img))
        loaded = np.asarray(load_image(path, mode="L"))
        assert image_facts(path)[:2] == (loaded.shape[1], loaded.shape[0]) == (expected.shape[1], expected.shape[0])
        assert np.array_equal(loaded, expected) and np.array_equal(read_mask_levels(path), expected)


def test_uncompressed_tiff_turned_by_90_degrees_is_upright_or_refused(tmp_path):
    # Pillow 13 scrambles grey uncompressed TIFFs while turning them (RGB, LZW, deflate and packbits are fine).
    stored = noise_rgb(0)[..., 0]
    path = tmp_path / "turned.tif"
    _save_tagged(path, stored, 6)
    assert image_facts(path)[:2] == (24, 32)
    try:
        loaded = np.asarray(load_image(path, mode="L"))
    except DataError as exc:
        assert str(exc).startswith(f"{path}: decodes as 32x24 but its header says 24x32")
    else:
        assert np.array_equal(loaded, np.rot90(stored, -1))


def test_corrupt_exif_counts_as_no_orientation(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(noise_rgb(3)).save(path, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    with pytest.warns(UserWarning):  # Pillow's own warning, at open
        assert image_facts(path)[:2] == load_image(path).size == (32, 24)


# ----------------------------------------------------------------------------- discovery: nothing drops out silently


def _dangling_image(src: Path) -> tuple[Path, str]:
    (src / DEFECT).unlink()
    os.symlink(src / "moved_away.png", src / DEFECT)
    return src / DEFECT, str(src / "moved_away.png")


def _dangling_mask(src: Path) -> tuple[Path, str]:
    (src / MASK).unlink()
    os.symlink("../../gone/000.png", src / MASK)
    return src / MASK, "../../gone/000.png"


def _dangling_train(src: Path) -> tuple[Path, str]:
    link = src / "train/good/001.png"
    link.unlink()
    os.symlink("/nonexistent/001.png", link)
    return link, "/nonexistent/001.png"


def _link_loop(src: Path) -> tuple[Path, str]:
    (src / DEFECT).unlink()
    os.symlink("001_link.png", src / DEFECT)
    os.symlink("000.png", src / "test/crack/001_link.png")
    return src / DEFECT, "001_link.png"


def _dangling_defect_folder(src: Path) -> tuple[Path, str]:
    shutil.rmtree(src / "test/crack")
    os.symlink(src.parent / "unmounted/crack", src / "test/crack")
    return src / "test/crack", str(src.parent / "unmounted/crack")


@pytest.mark.parametrize("breakage", [_dangling_image, _dangling_mask, _dangling_train, _link_loop,
                                      _dangling_defect_folder])
def test_broken_symbolic_links_are_refused_naming_link_and_target(tmp_path, breakage):
    src = make_mvtec_tree(tmp_path / "src")
    link, target = breakage(src)
    with pytest.raises(DataError) as info:
        fetch("folder", tmp_path / "data", path=str(src))
    message = str(info.value)
    assert message.startswith(f"{link}: ") and target in message and "\n" not in message
    assert "restore the target or remove the link" in message
    assert not (tmp_path / "data").exists()


def test_a_good_symbolic_link_to_outside_the_folder_is_copied(tmp_path):
    src = make_mvtec_tree(tmp_path / "src")
    write_image(tmp_path / "elsewhere.png", noise_rgb(99))
    (src / "test/good/000.png").unlink()
    os.symlink(tmp_path / "elsewhere.png", src / "test/good/000.png")
    result, dest = fetch_and_validate(src, tmp_path)
    assert result.success, result.failures
    assert not (dest / "test/good/000.png").is_symlink()


@pytest.mark.parametrize(("setup", "named", "says"), [
    (lambda src: (src / "test/crack/zz.png").mkdir(), "test/crack/zz.png", "is a folder"),
    (lambda src: Image.fromarray(noise_rgb(30)).save(src / "test/crack/002.webp"), "test/crack/002.webp",
     ".webp images are not read"),
    (lambda src: write_image(src / "test/003.png", noise_rgb(31)), "test/003.png", "move it into test/good/"),
    (lambda src: write_image(src / "ground_truth/crack/000_mask.png", square_mask()), DEFECT, "two masks"),
])
def test_files_discovery_would_skip_or_guess_are_refused(tmp_path, setup, named, says):
    src = make_mvtec_tree(tmp_path / "src")
    setup(src)
    with pytest.raises(DataError, match=says) as info:
        discover_mvtec(src)
    assert str(info.value).startswith(f"{src / named}: ")


# ----------------------------------------------------------------------------- masks


def test_zero_one_label_mask_fails_validation(tmp_path):
    # A small 0/1 defect used to pass as an "empty mask" warning: the defect pixels were lost.
    src = make_mvtec_tree(tmp_path / "src")
    labels = np.zeros((24, 32), np.uint8)
    labels[4:7, 6:9] = 1
    write_image(src / MASK, labels)
    result, dest = fetch_and_validate(src, tmp_path)
    assert not result.success
    assert result.failures == [f"{dest / MASK}: mask holds only the levels 0 and 1 (a label image); "
                               "save defect pixels as 255 (white), e.g. multiply the mask by 255"]


# ----------------------------------------------------------------------------- features.weights


def _not_checkpoints(folder: Path) -> dict[str, Path]:
    real = folder / "real.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), real)
    files = {"text": "weights.pth", "truncated": "truncated.pth", "jpeg": "photo.jpg", "empty": "empty.pth"}
    files = {kind: folder / name for kind, name in files.items()}
    files["text"].write_text("resnet18 weights go here\n")
    files["truncated"].write_bytes(real.read_bytes()[:4096])
    Image.fromarray(noise_rgb(0)).save(files["jpeg"])
    files["empty"].touch()
    return files


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_weights_file_that_is_not_a_checkpoint(tmp_path, backbone):
    for kind, path in _not_checkpoints(tmp_path).items():
        with pytest.raises(WeightsNotFoundError) as info:
            build_backbone(backbone, weights=str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: not a readable PyTorch checkpoint"), kind
        assert "features.weights must be" in message and "\n" not in message


@pytest.mark.parametrize("content", [torch.nn.Linear(2, 2), torch.zeros(3), {"state_dict": {}, "epoch": 1}])
def test_checkpoint_that_is_not_a_state_dict(tmp_path, content):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(WeightsNotFoundError, match="state_dict") as info:
        build_backbone("resnet18", weights=str(path))
    assert str(info.value).startswith(f"{path}: ")


def test_checkpoint_with_wrong_shapes_or_keys(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "r18_3x3.pth"
    torch.save(state, path)
    with pytest.raises(WeightsNotFoundError, match=r"does not hold resnet18 weights \(wrong shapes \['conv1.weight"):
        build_backbone("resnet18", weights=str(path))
    with pytest.raises(WeightsNotFoundError, match="does not hold efficientnet_lite0 weights .*efficientnet-lite0"):
        build_backbone("efficientnet_lite0", weights=str(path))


def test_random_backbone_refuses_a_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="features.weights: random_resnet18"):
        build_backbone("random_resnet18", weights=str(tmp_path / "r18.pth"))
