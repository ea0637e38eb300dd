"""Image and mask decoding with clear errors: any supported file in, 8-bit RGB/L PIL image or bool mask out.

Every problem with an input file is raised as :class:`~hetmm.errors.DataError` naming the file,
what is wrong and what to do, so the CLI can print one line instead of a Pillow traceback.
Decoding decides feature values, so this module is part of the feature code digest
(:mod:`hetmm.pipeline.provenance`).
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from hetmm.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MIN_SIDE = 8
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192  # larger frames should be tiled before inspection, not fed whole
MASK_THRESHOLD = 127  # mask pixels > 127 are defect; the rest (incl. anti-aliased edges) are not
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
SUPPORTED_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"}) | SIXTEEN_BIT_MODES | ALPHA_MODES

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# ----------------------------------------------------------------------------- opening files


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Refuse truncated files even if another library switched Pillow to lenient mode."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or re-run the download stage")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes), probably an interrupted copy; copy it again")


def _check_header(path: Path, img: Image.Image) -> None:
    width, height = img.size
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise DataError(
            f"{path}: absurd image size {width}x{height} (allowed: sides {MIN_SIDE}..{MAX_SIDE} px, "
            f"at most {MAX_PIXELS} pixels); crop, tile or resize the image"
        )
    if img.mode not in SUPPORTED_MODES:
        raise DataError(
            f"{path}: unsupported pixel mode {img.mode!r}; save it as 8- or 16-bit grayscale or RGB"
        )


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """Open ``path`` lazily (header only) with the file, format, size and mode checks done."""
    _check_file(path)
    try:
        with warnings.catch_warnings():  # sizes are checked below, with a message that names the file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not an image Pillow can read (wrong extension or not image data); "
            "replace it with a PNG/JPEG/BMP/TIFF file or remove it"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: absurd image size ({exc}); crop, tile or resize the image") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: corrupt image header ({exc}); copy or download the file again") from None
    with img:  # leaving closes the file only; pixels already decoded stay usable
        _check_header(path, img)
        yield img


def _decoded(path: Path) -> Image.Image:
    """Fully decoded image in its stored mode; truncated or corrupt data raise DataError."""
    with _opened(path) as img, _strict_decoding():
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            raise DataError(
                f"{path}: image data is truncated or corrupt ({exc}); copy or download the file again"
            ) from None
        return img


def image_facts(path: str | Path) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the header only (no pixel decoding)."""
    with _opened(Path(path)) as img:
        return img.size[0], img.size[1], img.mode


# ----------------------------------------------------------------------------- conversion


def _sixteen_to_8bit(img: Image.Image) -> Image.Image:
    # Fixed 0..65535 -> 0..255 mapping, not a per-image stretch: contrast must stay
    # comparable between a test image and its templates.
    levels = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
    return Image.fromarray(np.round(levels / 257.0).astype(np.uint8))


def _composite_on_black(img: Image.Image) -> Image.Image:
    """``RGBA`` -> ``RGB`` or ``LA`` -> ``L``: transparent pixels hold arbitrary hidden colours,
    on black they all become one defined value."""
    values = np.asarray(img).astype(np.uint16)
    colour = ((values[..., :-1] * values[..., -1:] + 127) // 255).astype(np.uint8)
    return Image.fromarray(colour[..., 0] if img.mode == "LA" else colour)


def _to_8bit(img: Image.Image) -> Image.Image:
    """8-bit ``L`` or ``RGB`` version of a decoded image of any supported mode."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        return _sixteen_to_8bit(img)
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "P":
        has_alpha = "transparency" in img.info
        return _composite_on_black(img.convert("RGBA")) if has_alpha else img.convert("RGB")
    if img.mode == "PA":
        return _composite_on_black(img.convert("RGBA"))
    if img.mode in ALPHA_MODES:
        return _composite_on_black(img)
    return img.convert("RGB")  # CMYK, YCbCr


def load_image(path: str | Path, *, mode: Literal["RGB", "L"] = "RGB") -> Image.Image:
    """Decode an image completely and return it as 8-bit ``RGB`` (default) or ``L``.

    Conversions: grayscale is replicated to three channels; 16-bit images (``I;16*``, ``I``) are
    mapped by ``v / 257`` (full 16-bit range to 0..255, values clipped to 0..65535); palette
    images are expanded; alpha (RGBA, LA, PA, palette transparency) is composited on black, so
    fully transparent pixels become black; CMYK and YCbCr use Pillow's conversion. EXIF
    orientation is ignored on purpose: masks are drawn on the stored pixel grid.

    Raises DataError for a missing, empty, non-image, truncated or corrupt file and for absurd sizes.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    img = _to_8bit(_decoded(Path(path)))
    return img if img.mode == mode else img.convert(mode)


def read_mask_levels(path: str | Path) -> np.ndarray:
    """Mask as ``uint8 [H, W]`` grey levels; a colour mask uses its brightest channel per pixel,
    so a red or green annotation counts as foreground."""
    levels = np.asarray(_to_8bit(_decoded(Path(path))))
    return levels.max(axis=-1) if levels.ndim == 3 else levels


def load_mask(
    path: str | Path, size: tuple[int, int] | None = None, *, image_path: str | Path | None = None
) -> np.ndarray:
    """Binary mask ``bool [H, W]`` (grey level > 127).

    ``size`` is the expected ``(width, height)``, i.e. that of the image the mask belongs to
    (``image_path``, used in the error message).
    """
    levels = read_mask_levels(path)
    if size is not None and (levels.shape[1], levels.shape[0]) != tuple(size):
        owner = f"its image {image_path}" if image_path is not None else "the expected size"
        raise DataError(
            f"{path}: mask is {levels.shape[1]}x{levels.shape[0]} but {owner} is {size[0]}x{size[1]}; "
            "masks must match their image pixel for pixel, re-export the mask at the image size"
        )
    return levels > MASK_THRESHOLD
