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
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from hetmm.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MIN_SIDE = 8
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192  # larger frames should be tiled before inspection, not fed whole
MASK_THRESHOLD = 127  # mask pixels > 127 are defect; the rest (incl. anti-aliased edges) are not
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
SUPPORTED_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"}) | SIXTEEN_BIT_MODES | ALPHA_MODES
# EXIF orientation -> the transposition that makes the stored pixels upright: the table of
# PIL.ImageOps.exif_transpose, applied without its re-writing of the EXIF block (which can fail on odd tags).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the stored grid by 90 degrees

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


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8, 1 = as stored) still to apply after decoding, from the header only.

    The base :meth:`Image.Image.getexif` is called on purpose: PNG's override decodes the pixels to look for an
    eXIf chunk after the image data. Pillow turns a TIFF upright itself while decoding (its header size is upright
    already), so a TIFF has nothing left to apply. A corrupt EXIF block counts as no orientation.
    """
    if img.format == "TIFF":
        return 1
    try:
        with warnings.catch_warnings():  # Pillow warns about corrupt EXIF; it then holds no orientation
            warnings.simplefilter("ignore", UserWarning)
            value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    width, height = img.size
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


def _decoded(path: Path) -> Image.Image:
    """Fully decoded image in its stored mode, turned upright by its EXIF orientation; truncated or corrupt data
    raise DataError, and so does a decoded size that differs from the header's (:func:`image_facts`)."""
    with _opened(path) as img, _strict_decoding():
        orientation = _orientation(img)
        size = _upright_size(img, orientation)
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            raise DataError(
                f"{path}: image data is truncated or corrupt ({exc}); copy or download the file again"
            ) from None
        upright = img.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else img
    if upright.size != size:  # e.g. Pillow 13 on an uncompressed TIFF turned by 90 degrees: scrambled pixels
        raise DataError(
            f"{path}: decodes as {upright.size[0]}x{upright.size[1]} but its header says {size[0]}x{size[1]} "
            "(EXIF orientation not applied cleanly); save the image upright without an orientation tag, e.g. as PNG"
        )
    return upright


def image_facts(path: str | Path) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the header only (no pixel decoding); width and height are those of the
    upright image, after EXIF orientation, as :func:`load_image` returns it."""
    with _opened(Path(path)) as img:
        return (*_upright_size(img, _orientation(img)), img.mode)


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
    fully transparent pixels become black; CMYK and YCbCr use Pillow's conversion. The EXIF
    orientation tag is applied (the image comes out upright, as a viewer shows it), to images and
    masks alike, so a mask drawn on the upright image lines up with it.

    Raises DataError for a missing, empty, non-image, truncated or corrupt file and for absurd sizes.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    img = _to_8bit(_decoded(Path(path)))
    return img if img.mode == mode else img.convert(mode)


def read_mask_levels(path: str | Path) -> np.ndarray:
    """Mask as ``uint8 [H, W]`` grey levels, EXIF orientation applied; a colour mask uses its brightest
    channel per pixel, so a red or green annotation counts as foreground."""
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
