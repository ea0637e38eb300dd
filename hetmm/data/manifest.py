"""Dataset discovery (MVTec layout) and the image manifest: one row per image with its split, label, mask and hash.

Only image headers are read here (:func:`hetmm.data.images.image_facts`); full decoding is the validation stage's job.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict

import pandas as pd
from tqdm import tqdm

from hetmm.data.images import IMAGE_EXTENSIONS, image_facts
from hetmm.errors import DataError
from hetmm.io import atomic_path, sha256_file, sha256_json, spreadsheet_safe

MANIFEST_COLUMNS = (
    "path", "split", "label", "defect_type", "mask_path", "width", "height", "mode", "sha256", "subset",
)
TEXT_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in ("width", "height"))
HASH_COLUMNS = ("path", "sha256", "split", "label", "subset")
# Image formats a camera or converter may write that are not read: refused, so they never silently drop out.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({
    ".webp", ".gif", ".jp2", ".j2k", ".jpe", ".jfif", ".heic", ".heif", ".avif",
    ".pgm", ".ppm", ".pbm", ".pnm", ".tga", ".ico", ".exr", ".dng",
})

Split = Literal["train", "test"]
Label = Literal["good", "defect", "unlabelled"]
LABELS = ("good", "defect", "unlabelled")
# Test images without a label (``test/unlabelled/``): scored and shown in the report, never in the metrics.
UNLABELLED = "unlabelled"
MaskPolicy = Literal["required", "optional", "none"]
Subset = Literal["dev", "holdout", "all"]


class SampleRef(TypedDict):
    """A discovered sample before its file is opened; paths are POSIX, relative to the dataset root."""

    path: str
    split: Split
    label: Label
    defect_type: str
    mask_path: str
    subset: Subset


@dataclass(frozen=True)
class Sample:
    """One manifest row: a :class:`SampleRef` plus facts read from the image file."""

    path: str
    split: Split
    label: Label
    defect_type: str
    mask_path: str  # "" for good and unlabelled images, and for defect images without a mask
    width: int
    height: int
    mode: str  # Pillow mode of the file as stored (before conversion)
    sha256: str
    subset: Subset


def check_link(path: Path) -> None:
    """Refuse a symbolic link that leads nowhere: ``is_file()`` and ``is_dir()`` are False for it, so it
    would otherwise vanish from the data set without a word."""
    if not path.is_symlink():
        return
    try:
        path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: broken symbolic link to {os.readlink(path)} (the target does not exist); "
                        "restore the target or remove the link") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise DataError(f"{path}: cannot follow the symbolic link to {os.readlink(path)} ({exc.strerror}); "
                            "fix the link or replace it with the file") from None
        raise DataError(f"{path}: symbolic link loop (it points at {os.readlink(path)}, which leads back to it); "
                        "restore the target or remove the link") from None


def _entries(folder: Path) -> list[Path]:
    """Visible entries of ``folder`` (none if it is missing); ``folder`` itself may not be a broken link."""
    check_link(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    images = []
    for p in _entries(folder):
        suffix = p.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS and suffix not in UNSUPPORTED_IMAGE_EXTENSIONS:
            continue
        check_link(p)
        if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            raise DataError(f"{p}: {suffix} images are not read (supported: png/jpg/jpeg/bmp/tif/tiff); "
                            "convert it to PNG or remove it")
        if not p.is_file():
            raise DataError(f"{p}: is a folder (or other non-file) with an image name; rename or remove it")
        images.append(p)
    return images


def _subfolders(folder: Path, images_go: str) -> list[Path]:
    """Subfolders of ``train/`` or ``test/``; an image lying directly in it is refused (it would go unused)."""
    entries = _entries(folder)
    for entry in entries:  # a broken link here may have been a whole folder of images
        check_link(entry)
        if entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
            raise DataError(f"{entry}: image directly in {folder.name}/ is not used; move it into {images_go}")
    return [p for p in entries if p.is_dir()]


def mask_candidates(root: Path, defect_type: str, image: Path) -> tuple[Path, Path]:
    """Where the mask of a defect image may live: MVTec's ``<name>_mask.png``, then ``<name>.png``."""
    folder = root / "ground_truth" / defect_type
    return folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"


def _find_mask(root: Path, defect_type: str, image: Path, masks: MaskPolicy) -> Path | None:
    if masks == "none":
        return None
    candidates = mask_candidates(root, defect_type, image)
    check_link(candidates[0].parent)
    for candidate in candidates:
        check_link(candidate)
    found = [candidate for candidate in candidates if candidate.is_file()]
    if len(found) > 1:
        raise DataError(f"{image}: two masks, {found[0]} and {found[1].name}; keep the right one, remove the other")
    if found:
        return found[0]
    if masks == "optional":
        return None
    raise DataError(
        f"{image}: defect image has no mask (data.masks is 'required'); looked for {candidates[0].name} and "
        f"{candidates[1].name} in {candidates[0].parent}; add the mask (white = defect), move the image to "
        "test/good/, or set data.masks to 'optional'"
    )


def _train_refs(root: Path) -> list[SampleRef]:
    train = root / "train"
    for folder in _subfolders(train, "train/good/"):
        if folder.name != "good":
            raise DataError(
                f"{folder}: the training folder may only hold good/ (templates are defect-free); "
                f"move these images to test/{folder.name}/"
            )
    images = image_files(train / "good")
    if not images:
        raise DataError(f"{train / 'good'}: no training images (png/jpg/jpeg/bmp/tif/tiff); add defect-free images")
    return [_ref(root, p, "train", "good", None) for p in images]


def _ref(root: Path, image: Path, split: Split, defect_type: str, mask: Path | None) -> SampleRef:
    return SampleRef(
        path=image.relative_to(root).as_posix(),
        split=split,
        label=defect_type if defect_type in ("good", UNLABELLED) else "defect",
        defect_type=defect_type,
        mask_path=mask.relative_to(root).as_posix() if mask is not None else "",
        subset="all",
    )


def discover_mvtec(root: str | Path, masks: MaskPolicy = "required") -> list[SampleRef]:
    """List the samples of an MVTec-layout tree (sorted, paths relative to ``root``).

    Layout: ``train/good/*``, ``test/<type>/*``, ``ground_truth/<type>/<name>_mask.png`` or
    ``<name>.png``; ``test/unlabelled/*`` are test images without a label. ``masks``: a defect image without a
    mask is an error (``required``), has no mask (``optional``), or masks are not read (``none``). Image extensions
    png/jpg/jpeg/bmp/tif/tiff in any case; hidden and other files are ignored. Refused with a DataError, so that no
    image silently drops out: a broken or looping symbolic link to an image, mask or folder, a folder with an image
    name and an image in a format that is not read (:data:`UNSUPPORTED_IMAGE_EXTENSIONS`).
    """
    root = Path(root)
    check_link(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected train/good/, test/<type>/, ground_truth/<type>/")
    refs = _train_refs(root)
    n_train = len(refs)
    for folder in _subfolders(root / "test", "test/good/ or test/<defect type>/"):
        for image in image_files(folder):
            unmasked = folder.name in ("good", UNLABELLED)
            mask = None if unmasked else _find_mask(root, folder.name, image, masks)
            refs.append(_ref(root, image, "test", folder.name, mask))
    if len(refs) == n_train:
        raise DataError(f"{root / 'test'}: no test images; add test/good/ and test/<defect type>/ folders")
    return refs


def _sample(ref: SampleRef, root: Path) -> Sample:
    path = root / ref["path"]
    width, height, mode = image_facts(path)
    return Sample(**ref, width=width, height=height, mode=mode, sha256=sha256_file(path))


def build_manifest(samples: Iterable[SampleRef], root: str | Path, *, progress: bool | None = None) -> pd.DataFrame:
    """Manifest DataFrame (columns :data:`MANIFEST_COLUMNS`) with the image facts read from the files.

    Only headers are read here (fast); full decoding is the validation stage's job.
    ``progress=None`` shows the bar on a terminal only.
    """
    root = Path(root)
    refs = list(samples)
    bar = tqdm(refs, desc="manifest", unit="img", disable=None if progress is None else not progress)
    rows = [asdict(_sample(ref, root)) for ref in bar]
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        spreadsheet_safe(df.loc[:, list(MANIFEST_COLUMNS)]).to_csv(tmp, index=False, lineterminator="\n")


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run the download stage first")
    dtypes = {c: str for c in TEXT_COLUMNS} | {"width": "int64", "height": "int64"}
    try:
        # keep_default_na=False: an empty mask_path stays "" instead of NaN
        df = pd.read_csv(path, dtype=dtypes, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); run the download stage again") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks columns {missing}; run the download stage again")
    return df


def manifest_hash(df: pd.DataFrame) -> str:
    """sha256 of the sorted ``(path, sha256, split, label, subset)`` rows: row order does not count."""
    rows = sorted(df.loc[:, list(HASH_COLUMNS)].fillna("").astype(str).itertuples(index=False, name=None))
    return sha256_json([list(row) for row in rows])


SOURCE_RECORD = "source.json"  # beside manifest.csv: the data settings the copy was really made from


def write_source_record(folder: str | Path, source: str, options: dict) -> None:
    """Record, inside the copy, where its images came from (no time stamp: an unchanged source hashes the same)."""
    from hetmm.io import write_json_atomic

    write_json_atomic(Path(folder) / SOURCE_RECORD, {"source": source, **options})


def read_source_record(folder: str | Path) -> dict | None:
    """The source the copy in ``folder`` was made from; None for a copy made before the record existed."""
    import json

    path = Path(folder) / SOURCE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
