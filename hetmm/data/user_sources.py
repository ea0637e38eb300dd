"""Sources a user brings in anomalib's terms: the Folder layout and a table of images.

Both builders (``anomalib_folder``, ``table``; signature ``(out, scratch, **options) -> list[SampleRef]``, see
:mod:`hetmm.data.sources`) copy the images into the layout every source writes: ``train/good/``,
``test/<type>/``, ``ground_truth/<type>/<name>.png``. A file's name there is its path below the folder it was
listed from with ``/`` turned into ``__``, so equal names in different subfolders never collide.

* **Folder** (anomalib's ``Folder``): ``normal_dir`` holds good images, used for training; ``normal_test_dir`` the
  good test images, or else a seeded share of ``normal_dir`` chosen on image contents (``normal_test_share``).
  ``abnormal_dir`` holds defect images, flat (defect type ``defect``) or one subfolder per defect type;
  ``mask_dir`` mirrors it with masks ``<stem>.png`` or ``<stem>_mask.png``; ``unlabelled_dir`` holds test images
  without a label. Folders are relative to the working directory or absolute.
* **Table** (anomalib's ``Tabular``): a CSV or parquet file, one row per image: ``path`` (or ``image_path``),
  ``split`` (train / test), ``label`` (good / normal / 0, defect / abnormal / anomalous / 1, or empty /
  ``unlabelled`` for a test image without a label), optional ``mask_path`` (or ``mask``) and ``defect_type``.
  Relative paths are relative to the table's folder. Every bad row is an error that names its line.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from hetmm.data.images import IMAGE_EXTENSIONS, image_facts
from hetmm.data.manifest import UNLABELLED, MaskPolicy, SampleRef, check_link, image_files
from hetmm.errors import ConfigError, DataError
from hetmm.io import sha256_file

LABEL_WORDS = {"good": "good", "normal": "good", "0": "good", "defect": "defect", "abnormal": "defect",
               "anomalous": "defect", "anomaly": "defect", "1": "defect", "": UNLABELLED, UNLABELLED: UNLABELLED}
PATH_COLUMNS = ("path", "image_path")
MASK_COLUMNS = ("mask_path", "mask")
# a defect type becomes a folder name: the same rule as a line name
TYPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_TYPES = ("good", UNLABELLED)


def _flat(rel: Path) -> str:
    return "__".join(rel.parts)


def _place(out: Path, image: Path, name: str, split: str, defect_type: str, mask: Path | None,
           taken: dict[str, str], at: str | None = None) -> SampleRef:
    """Copy ``image`` (and ``mask``) into the layout; a bad image is named where the user can fix it, and so are two
    images whose copies would land on one name (``taken``: copy -> where it came from; ``at``: the table line)."""
    image_facts(image)
    target = Path(split) / defect_type / name
    mask_rel = f"ground_truth/{defect_type}/{Path(name).stem}.png" if mask is not None else ""
    for copy in filter(None, (target.as_posix(), mask_rel)):
        if copy in taken:
            raise DataError(f"{at or image}: would be stored as {copy}, the name {taken[copy]} has already; rename "
                            "one of the two files")
        taken[copy] = at or str(image)
    (out / target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, out / target)
    if mask is not None:
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mask, out / mask_rel)
    label = defect_type if defect_type in RESERVED_TYPES else "defect"
    return SampleRef(path=target.as_posix(), split=split, label=label, defect_type=defect_type,  # type: ignore
                     mask_path=mask_rel, subset="all")


def _no_mask(image: Path, masks: MaskPolicy, where: str) -> None:
    if masks == "required":
        raise DataError(f"{image}: defect image has no mask (data.masks is 'required'); looked for {where}; add "
                        "the mask (white = defect) or set data.masks to 'optional'")


# ----------------------------------------------------------------------------- Folder


def _folder(option: str, value: str | None, required: bool = False) -> Path | None:
    if value is None:
        if required:
            raise ConfigError(f"data.{option}: the anomalib_folder source needs it (the folder of good images)")
        return None
    folder = Path(value).expanduser()
    check_link(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder from data.{option} does not exist; fix the path")
    return folder


def _images_below(folder: Path) -> list[Path]:
    """Images in ``folder`` and its subfolders (sorted; hidden entries skipped, unreadable formats refused).

    Every folder is read once, by its real path: a symbolic link back to a folder above it (a loop) or to a folder
    read already is refused by name, so a loop never grows into an endless walk."""
    found: list[Path] = []
    seen: dict[Path, Path] = {}
    stack: list[tuple[Path, tuple[Path, ...]]] = [(folder, ())]
    while stack:  # depth first, in sorted order, without recursion (a deep tree is no reason to fail)
        current, above = stack.pop()
        real = current.resolve()
        if real in above:
            raise DataError(f"{current}: symbolic link loop (it leads back to {real}, a folder above it); remove the "
                            "link")
        if real in seen:
            raise DataError(f"{current}: leads to {real}, which was read already as {seen[real]}; remove one of "
                            "the two so no image is listed twice")
        seen[real] = current
        found += image_files(current)
        subs = []
        for entry in sorted(p for p in current.iterdir() if not p.name.startswith(".")):
            check_link(entry)  # a looping or broken link would otherwise drop out without a word
            if entry.is_dir():
                subs.append(entry)
        stack += [(sub, (*above, real)) for sub in reversed(subs)]
    return found


def _held_out(images: list[Path], share: float) -> set[Path]:
    """The good images that become test images: ``round(share * N)`` (at least 1, never all), chosen on their
    contents, so renaming or reordering files changes nothing."""
    if not 0.0 < share < 1.0:
        raise ConfigError(f"data.normal_test_share: {share} is not between 0 and 1 (exclusive)")
    if len(images) < 2:
        raise DataError(f"{images[0].parent if images else 'normal_dir'}: needs at least 2 good images to hold "
                        "some out for testing; add images or set data.normal_test_dir")
    key = {p: hashlib.sha256(f"hetmm-test-normals:{sha256_file(p)}".encode()).hexdigest() for p in images}
    count = min(max(1, round(share * len(images))), len(images) - 1)
    return set(sorted(images, key=lambda p: (key[p], p.as_posix()))[:count])


def _folder_mask(mask_dir: Path | None, rel: Path) -> Path | None:
    if mask_dir is None:
        return None
    for candidate in (mask_dir / rel.with_suffix(".png"), mask_dir / rel.with_name(f"{rel.stem}_mask.png")):
        check_link(candidate)
        if candidate.is_file():
            return candidate
    return None


def anomalib_folder(out: Path, scratch: Path, *, normal_dir: str | None = None, abnormal_dir: str | None = None,
                    mask_dir: str | None = None, normal_test_dir: str | None = None,
                    unlabelled_dir: str | None = None, normal_test_share: float = 0.2,
                    masks: MaskPolicy = "optional") -> list[SampleRef]:
    normal = _folder("normal_dir", normal_dir, required=True)
    abnormal, mask_root = _folder("abnormal_dir", abnormal_dir), _folder("mask_dir", mask_dir)
    normal_test, unlabelled = _folder("normal_test_dir", normal_test_dir), _folder("unlabelled_dir", unlabelled_dir)
    roles = {"normal_dir": normal, "abnormal_dir": abnormal, "mask_dir": mask_root, "normal_test_dir": normal_test,
             "unlabelled_dir": unlabelled}
    real = {name: folder.resolve() for name, folder in roles.items() if folder is not None}
    for one, two in ((a, b) for a in real for b in real if a < b):
        if real[one] == real[two] or real[one].is_relative_to(real[two]) or real[two].is_relative_to(real[one]):
            raise ConfigError(f"data.{one} and data.{two}: {roles[one]} and {roles[two]} are the same folder or one "
                              "holds the other, so images would count twice (a good image as a defect); give "
                              "separate folders")
    goods = _images_below(normal)
    if not goods:
        raise DataError(f"{normal}: no good images (png/jpg/jpeg/bmp/tif/tiff) in data.normal_dir")
    test_goods = set() if normal_test is not None else _held_out(goods, normal_test_share)
    taken: dict[str, str] = {}
    refs = [_place(out, p, _flat(p.relative_to(normal)), "test" if p in test_goods else "train", "good", None, taken)
            for p in goods]
    refs += [_place(out, p, _flat(p.relative_to(normal_test)), "test", "good", None, taken)
             for p in (_images_below(normal_test) if normal_test is not None else [])]
    matched, example = 0, None
    for image in _images_below(abnormal) if abnormal is not None else []:
        rel = image.relative_to(abnormal)
        defect_type = rel.parts[0] if len(rel.parts) > 1 else "defect"
        _check_type(defect_type, image)
        mask = None if masks == "none" else _folder_mask(mask_root, rel)
        if mask is None and masks != "none":
            _no_mask(image, masks, f"{rel.with_suffix('.png')} in data.mask_dir" if mask_root else "no data.mask_dir")
        matched, example = matched + (mask is not None), example or rel
        refs.append(_place(out, image, _flat(Path(*rel.parts[1:]) if len(rel.parts) > 1 else rel), "test",
                           defect_type, mask, taken))
    defects = sum(r["label"] == "defect" for r in refs)
    if mask_root is not None and masks != "none" and defects and not matched:
        raise DataError(f"{mask_root}: data.mask_dir holds no mask for any of the {defects} defect images (for "
                        f"{example} it looked for {example.with_suffix('.png')} or "
                        f"{example.with_name(example.stem + '_mask.png')}); fix the folder or remove data.mask_dir")
    refs += [_place(out, p, _flat(p.relative_to(unlabelled)), "test", UNLABELLED, None, taken)
             for p in (_images_below(unlabelled) if unlabelled is not None else [])]
    return refs


def _check_type(defect_type: str, where: Any) -> None:
    if defect_type in RESERVED_TYPES or not TYPE_NAME.fullmatch(defect_type):
        raise DataError(f"{where}: defect type {defect_type!r} must be 1-64 letters, digits, '-' and '_' and not "
                        f"{' or '.join(RESERVED_TYPES)}; rename it")


# ----------------------------------------------------------------------------- Table


def _read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """The table as text columns, and the offset from a row index to the line/row number users see."""
    check_link(path)
    if not path.is_file():
        raise DataError(f"{path}: table from data.path does not exist; fix the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False), 2  # line 1 is the header
        if suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401  (pandas needs it for parquet)
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'hetmm[parquet]'") from None
            return pd.read_parquet(path).astype(str).replace({"None": "", "nan": ""}), 1
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: unreadable table ({type(exc).__name__}: {exc}); fix or re-export it") from None
    raise DataError(f"{path}: a table source is a .csv or .parquet file")


def _column(df: pd.DataFrame, path: Path, names: tuple[str, ...], required: bool) -> str | None:
    found = [n for n in names if n in df.columns]
    if len(found) > 1:
        raise DataError(f"{path}: columns {found} mean the same; keep one")
    if not found and required:
        raise DataError(f"{path}: no column {' or '.join(names)}; columns are {list(df.columns)}")
    return found[0] if found else None


def table(out: Path, scratch: Path, *, path: str, masks: MaskPolicy = "optional") -> list[SampleRef]:
    table_path = Path(path).expanduser()
    df, offset = _read_table(table_path)
    where = "line" if offset == 2 else "row"
    path_col = _column(df, table_path, PATH_COLUMNS, required=True)
    mask_col = _column(df, table_path, MASK_COLUMNS, required=False)
    for needed in ("split", "label"):
        _column(df, table_path, (needed,), required=True)
    if df.empty:
        raise DataError(f"{table_path}: the table has no rows")
    base, seen, refs, taken = table_path.parent, {}, [], {}
    for i, row in enumerate(df.to_dict("records")):
        at = f"{table_path} {where} {i + offset}"
        image = _table_file(base, row[path_col].strip(), at, "path")
        split, label = row["split"].strip().lower(), LABEL_WORDS.get(row["label"].strip().lower())
        if split not in ("train", "test"):
            raise DataError(f"{at}: split {row['split']!r} is not train or test")
        if label is None:
            raise DataError(f"{at}: label {row['label']!r} is not one of {sorted(w for w in LABEL_WORDS if w)} "
                            "(or empty for a test image without a label)")
        if split == "train" and label != "good":
            raise DataError(f"{at}: training image labelled {row['label'] or 'unlabelled'!r}; the templates are made "
                            "of good images only: label it good or move it to the test split")
        defect_type = ((row.get("defect_type") or "").strip() or "defect") if label == "defect" else label
        if label == "defect":
            _check_type(defect_type, at)
        mask_value = (row.get(mask_col) or "").strip() if mask_col else ""
        mask = None
        if label == "defect" and masks != "none":
            mask = _table_file(base, mask_value, at, mask_col) if mask_value else None
            if mask is None:
                _no_mask(image, masks, f"the {mask_col or 'mask_path'} column of {at}")
        key = image.resolve()
        if key in seen:
            raise DataError(f"{at}: {image} is listed twice (first at {where} {seen[key]}); keep one row")
        seen[key] = i + offset
        rel = image.relative_to(base) if image.is_relative_to(base) else Path(*image.parts[1:])
        refs.append(_place(out, image, _flat(rel), split, defect_type, mask, taken, at))
    if not any(r["split"] == "train" for r in refs):
        raise DataError(f"{table_path}: no rows with split 'train'; add good training images")
    if not any(r["split"] == "test" for r in refs):
        raise DataError(f"{table_path}: no rows with split 'test'; add test images")
    return refs


def _table_file(base: Path, value: str, at: str, column: str | None) -> Path:
    if not value:
        raise DataError(f"{at}: empty {column}")
    file = Path(value).expanduser()
    file = file if file.is_absolute() else base / file
    check_link(file)
    if not file.is_file():
        what = "is not a regular file" if file.exists() else "does not exist"  # a folder, a pipe
        raise DataError(f"{at}: {column} {value!r} {what} ({file}); fix the path")
    if file.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{at}: {column} {value!r} is not a png/jpg/jpeg/bmp/tif/tiff image")
    return file
