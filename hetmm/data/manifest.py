"""Dataset discovery (MVTec layout) and the image manifest: one row per image with its split, label, mask and hash.

Only image headers are read here (:func:`hetmm.data.images.image_facts`); full decoding is the validation stage's job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict

import pandas as pd
from tqdm import tqdm

from hetmm.data.images import IMAGE_EXTENSIONS, image_facts
from hetmm.errors import DataError
from hetmm.io import atomic_path, sha256_file, sha256_json

MANIFEST_COLUMNS = (
    "path", "split", "label", "defect_type", "mask_path", "width", "height", "mode", "sha256", "subset",
)
TEXT_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in ("width", "height"))
HASH_COLUMNS = ("path", "sha256", "split", "label", "subset")

Split = Literal["train", "test"]
Label = Literal["good", "defect"]
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
    mask_path: str  # "" for good images
    width: int
    height: int
    mode: str  # Pillow mode of the file as stored (before conversion)
    sha256: str
    subset: Subset


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def mask_candidates(root: Path, defect_type: str, image: Path) -> tuple[Path, Path]:
    """Where the mask of a defect image may live: MVTec's ``<name>_mask.png``, then ``<name>.png``."""
    folder = root / "ground_truth" / defect_type
    return folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"


def _find_mask(root: Path, defect_type: str, image: Path) -> Path:
    candidates = mask_candidates(root, defect_type, image)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{image}: defect image has no mask; looked for {candidates[0].name} and {candidates[1].name} "
        f"in {candidates[0].parent}; add the mask (white = defect) or move the image to test/good/"
    )


def _train_refs(root: Path) -> list[SampleRef]:
    train = root / "train"
    for folder in _subfolders(train):
        if folder.name != "good":
            raise DataError(
                f"{folder}: the training folder may only hold good/ (templates are defect-free); "
                f"move these images to test/{folder.name}/"
            )
    images = _image_files(train / "good")
    if not images:
        raise DataError(f"{train / 'good'}: no training images (png/jpg/jpeg/bmp/tif/tiff); add defect-free images")
    return [_ref(root, p, "train", "good", None) for p in images]


def _ref(root: Path, image: Path, split: Split, defect_type: str, mask: Path | None) -> SampleRef:
    return SampleRef(
        path=image.relative_to(root).as_posix(),
        split=split,
        label="good" if defect_type == "good" else "defect",
        defect_type=defect_type,
        mask_path=mask.relative_to(root).as_posix() if mask is not None else "",
        subset="all",
    )


def discover_mvtec(root: str | Path) -> list[SampleRef]:
    """List the samples of an MVTec-layout tree (sorted, paths relative to ``root``).

    Layout: ``train/good/*``, ``test/<type>/*``, ``ground_truth/<type>/<name>_mask.png`` or
    ``<name>.png``. Image extensions png/jpg/jpeg/bmp/tif/tiff in any case; hidden and
    other files are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected train/good/, test/<type>/, ground_truth/<type>/")
    refs = _train_refs(root)
    n_train = len(refs)
    for folder in _subfolders(root / "test"):
        for image in _image_files(folder):
            mask = None if folder.name == "good" else _find_mask(root, folder.name, image)
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
        df.loc[:, list(MANIFEST_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")


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
