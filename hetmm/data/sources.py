"""Download sources: put a product line's data under ``dest/`` in one MVTec-like layout.

Layout written by every source::

    dest/train/good/<name>.<ext>
    dest/test/<type>/<name>.<ext>              (type "good" or a defect type)
    dest/ground_truth/<type>/<name>.png        (defect images only)
    dest/manifest.csv

Images are copied byte for byte (so their sha256 is the source's); masks are copied too and
only renamed to ``<name>.png``. A fetch assembles everything in a hidden staging folder next to
``dest`` and renames it into place at the end: a failed fetch never leaves a half-filled ``dest``,
and an earlier good ``dest`` survives it.

Sources (``fetch(source, dest, **options)``; the registry :data:`SOURCES` is keyed by
:class:`~hetmm.modes.DataSource`):

* ``demo``   synthetic textures built from ``skimage.data.gravel()`` (CC0); no network.
* ``folder`` a local MVTec-layout tree, ``path=...``.
* ``anomalib_folder`` anomalib's Folder layout (``normal_dir``, ``abnormal_dir``, optional ``mask_dir``, ...) and
  ``table`` a CSV or parquet file of images (``path=...``): :mod:`hetmm.data.user_sources`.
* ``mvtec``  one MVTec AD category, ``category=...``, from a mirror (``mirror=`` or ``$HETMM_MIRROR``)
             or the official download.
* ``mtd``    Magnetic Tile Defects with the committed split (:mod:`hetmm.splits`), from a mirror
             or the GitHub archive; ``subset=dev|holdout|all``, ``limit=n``.
"""

from __future__ import annotations

import glob
import inspect
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from hetmm.data import user_sources
from hetmm.data.images import image_facts
from hetmm.data.manifest import MaskPolicy, SampleRef, Subset, build_manifest, discover_mvtec, write_manifest
from hetmm.data.splits import MTD_CLASSES, load_mtd_split
from hetmm.errors import ConfigError, DataError
from hetmm.modes import DataSource

MANIFEST_NAME = "manifest.csv"
MIRROR_ENV = "HETMM_MIRROR"
DOWNLOAD_TIMEOUT_S = 60
USER_AGENT = "hetmm (https://github.com/hetmm)"

_MVTEC_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
MVTEC_URLS = {  # official per-category archives (MVTec AD, CC BY-NC-SA 4.0); no published checksums
    "bottle": f"{_MVTEC_SHARE}/420937370-1629951468/bottle.tar.xz",
    "cable": f"{_MVTEC_SHARE}/420937413-1629951498/cable.tar.xz",
    "capsule": f"{_MVTEC_SHARE}/420937454-1629951595/capsule.tar.xz",
    "carpet": f"{_MVTEC_SHARE}/420937484-1629951672/carpet.tar.xz",
    "grid": f"{_MVTEC_SHARE}/420937487-1629951814/grid.tar.xz",
    "hazelnut": f"{_MVTEC_SHARE}/420937545-1629951845/hazelnut.tar.xz",
    "leather": f"{_MVTEC_SHARE}/420937607-1629951964/leather.tar.xz",
    "metal_nut": f"{_MVTEC_SHARE}/420937637-1629952063/metal_nut.tar.xz",
    "pill": ("https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download"
             "/420938129-1629953099/pill.tar.xz"),
    "screw": f"{_MVTEC_SHARE}/420938130-1629953152/screw.tar.xz",
    "tile": f"{_MVTEC_SHARE}/420938133-1629953189/tile.tar.xz",
    "toothbrush": f"{_MVTEC_SHARE}/420938134-1629953256/toothbrush.tar.xz",
    "transistor": f"{_MVTEC_SHARE}/420938166-1629953277/transistor.tar.xz",
    "wood": f"{_MVTEC_SHARE}/420938383-1629953354/wood.tar.xz",
    "zipper": f"{_MVTEC_SHARE}/420938385-1629953449/zipper.tar.xz",
}

# Pinned commit (see data/mtd/SOURCE.md): the archive of a branch could change under the split.
MTD_COMMIT = "cc4eb530b57b9cb7225bf76023873043ffd50655"
MTD_URL = f"https://github.com/abin24/Magnetic-tile-defect-datasets./archive/{MTD_COMMIT}.zip"

Builder = Callable[..., list[SampleRef]]


# ----------------------------------------------------------------------------- fetch


def fetch(source: str, dest: str | Path, masks: MaskPolicy = "optional", **options: Any) -> pd.DataFrame:
    """Materialise ``source`` under ``dest`` (replacing it only on success); return the manifest.

    ``options`` may hold every source's options (a whole ``data:`` params section): one that this
    source does not use is accepted while it has its default value, and refused otherwise. ``masks`` (every
    source): a defect image without a mask is an error (``required``) or has none (``optional``); ``none``
    drops every mask (image-level labels only).
    """
    builder, used = _builder(source, options)
    if "masks" in inspect.signature(builder).parameters:
        used["masks"] = masks
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DataError(f"{dest}: exists and is not a folder; remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        # Downloads and archives go to a scratch folder beside staging, so they never reach dest.
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", suffix=".scratch", dir=dest.parent) as scratch:
            refs = builder(staging, Path(scratch), **used)
        if masks == "none":
            refs = [SampleRef(**(ref | {"mask_path": ""})) for ref in refs]
            shutil.rmtree(staging / "ground_truth", ignore_errors=True)
        manifest = build_manifest(refs, staging)
        write_manifest(manifest, staging / MANIFEST_NAME)
        _swap_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def source_options(source: str) -> dict[str, Any]:
    """Options of one source with their defaults (``inspect.Parameter.empty`` when required)."""
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    params = list(inspect.signature(SOURCES[source].build).parameters.values())[2:]  # after (out, scratch)
    return {p.name: p.default for p in params if p.name != "masks"}  # masks: fetch's own option


def _builder(source: str, options: dict[str, Any]) -> tuple[Builder, dict[str, Any]]:
    own = source_options(source)
    every = {name: default for other in SOURCES for name, default in source_options(other).items()}
    unknown = sorted(set(options) - set(every))
    if unknown:
        raise ConfigError(f"data source {source!r}: unknown option(s) {unknown}; known: {sorted(own)}")
    foreign = sorted(k for k, v in options.items() if k not in own and v != every[k])
    if foreign:
        raise ConfigError(f"data source {source!r}: option(s) {foreign} do not apply to it; "
                          f"its options are {sorted(own)}")
    missing = [k for k, default in own.items() if default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ConfigError(f"data source {source!r}: missing required option(s) {missing}")
    return SOURCES[source].build, {k: v for k, v in options.items() if k in own}


def _remove_stale_staging(dest: Path) -> None:
    # Leftovers of a killed fetch (can be gigabytes); DVC never runs one stage twice at once.
    prefix = glob.escape(f".{dest.name}.")
    for suffix in (".partial", ".scratch", ".old"):
        for stale in dest.parent.glob(f"{prefix}*{suffix}"):
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(staging: Path, dest: Path) -> None:
    # Two renames: a directory cannot atomically replace a non-empty one on POSIX. A crash
    # between them leaves no dest (never a half one); the next fetch rebuilds it.
    staging.chmod(0o755)  # mkdtemp made it private; dest is an ordinary data folder
    if not dest.exists():
        os.rename(staging, dest)
        return
    old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
    os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next fetch


def _copy(src: Path, dst: Path, *, link: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # other file system, or links not allowed: fall back to a copy
            pass
    shutil.copyfile(src, dst)


def _mirror(option: str | None) -> Path | None:
    value = option if option is not None else os.environ.get(MIRROR_ENV)
    if not value:
        return None
    mirror = Path(value).expanduser()
    if not mirror.is_dir():
        origin = "option 'mirror'" if option is not None else f"${MIRROR_ENV}"
        raise DataError(f"{mirror}: mirror folder (from {origin}) does not exist; fix the path or unset it")
    return mirror


def _download(url: str, target: Path, *, offline_hint: str) -> Path:
    """Stream ``url`` to ``target`` with a progress bar and check the length. Neither MVTec nor
    GitHub publishes checksums of these archives; the manifest records every file's sha256."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not download {url} ({reason}); if this machine is offline, set {MIRROR_ENV} "
            f"(or the source option 'mirror') to a local folder holding {offline_hint}"
        ) from None
    if expected is not None and received != expected:
        raise DataError(f"{url}: download incomplete ({received} of {expected} bytes); run the stage again")
    return target


def _extract(archive: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(into)  # zipfile strips absolute paths and '..'
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(into, filter="data")  # refuses links and paths outside ``into``
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"{archive}: corrupt or incomplete archive ({exc}); delete it and fetch again") from None
    return into


def _copy_tree(src_root: Path, refs: list[SampleRef], out: Path, *, link: bool = False) -> list[SampleRef]:
    """Copy discovered samples into ``out``; masks are renamed to ``ground_truth/<type>/<name>.png``."""
    copied = []
    for ref in refs:
        image_facts(src_root / ref["path"])  # a bad file is named where the user can fix it, not in staging
        _copy(src_root / ref["path"], out / ref["path"], link=link)
        mask_path = ""
        if ref["mask_path"]:
            mask_path = f"ground_truth/{ref['defect_type']}/{Path(ref['path']).stem}.png"
            _copy(src_root / ref["mask_path"], out / mask_path, link=link)
        copied.append(SampleRef(**(ref | {"mask_path": mask_path})))
    return copied


# ----------------------------------------------------------------------------- folder


def _folder(out: Path, scratch: Path, *, path: str, link: bool = False, masks: MaskPolicy = "optional"
            ) -> list[SampleRef]:
    """A local MVTec-layout tree. ``link=True`` hard-links instead of copying; off by default
    because DVC may make cached files read-only, which would then change the user's originals."""
    src = Path(path).expanduser()
    return _copy_tree(src, discover_mvtec(src, masks), out, link=link)


# ----------------------------------------------------------------------------- mvtec


def _mvtec(out: Path, scratch: Path, *, category: str, mirror: str | None = None, masks: MaskPolicy = "optional"
           ) -> list[SampleRef]:
    if category not in MVTEC_URLS:
        raise ConfigError(f"unknown MVTec AD category {category!r}; choose one of {sorted(MVTEC_URLS)}")
    tree = _mvtec_tree(category, _mirror(mirror), scratch)
    return _copy_tree(tree, discover_mvtec(tree, masks), out)


def _mvtec_tree(category: str, mirror: Path | None, scratch: Path) -> Path:
    if mirror is None:
        hint = f"mvtec_anomaly_detection/{category}/, {category}/ or {category}.tar.xz"
        archive = _download(MVTEC_URLS[category], scratch / f"{category}.tar.xz", offline_hint=hint)
    else:
        folders = (mirror / "mvtec_anomaly_detection" / category, mirror / category)
        archive = mirror / f"{category}.tar.xz"
        for folder in folders:
            if folder.is_dir():
                return folder
        if not archive.is_file():
            raise DataError(
                f"{mirror}: mirror holds no MVTec AD {category!r}; looked for {folders[0]}, {folders[1]} "
                f"and {archive}"
            )
    tree = _extract(archive, scratch / "extracted") / category
    if not tree.is_dir():
        raise DataError(f"{archive}: archive has no top folder {category}/; is it the right category?")
    return tree


# ----------------------------------------------------------------------------- mtd


def _mtd_type(cls: str) -> str:
    """``MT_Free`` -> ``good``, ``MT_Blowhole`` -> ``blowhole``."""
    return "good" if cls == "MT_Free" else cls.removeprefix("MT_").lower()


def _has_mtd(folder: Path) -> bool:
    return all((folder / cls / "Imgs").is_dir() for cls in MTD_CLASSES)


def _mtd_root(mirror: Path | None, scratch: Path) -> Path:
    if mirror is None:
        archive = _download(MTD_URL, scratch / "mtd.zip", offline_hint="the MT_* folders (e.g. /path/to/mtd/MT_Free)")
        mirror = _extract(archive, scratch / "extracted")
    candidates = [mirror, mirror / "mtd", *sorted(mirror.glob("Magnetic-tile-defect-datasets*"))]
    for candidate in candidates:
        if _has_mtd(candidate):
            return candidate
    raise DataError(
        f"{mirror}: no MTD copy found (need {', '.join(c + '/Imgs' for c in MTD_CLASSES)}) in it, "
        "in mtd/ or in Magnetic-tile-defect-datasets*/"
    )


def _mtd_sample(root: Path, out: Path, cls: str, stem: str, split: str, subset: Subset) -> SampleRef:
    folder = "train" if split == "train" else "test"
    defect_type = _mtd_type(cls)
    image = root / cls / "Imgs" / f"{stem}.jpg"
    if not image.is_file():
        raise DataError(
            f"{image}: listed in the committed split hetmm/resources/mtd_split.json but missing; "
            f"the mirror must be a complete copy of the MTD repository at commit {MTD_COMMIT[:12]}"
        )
    rel = f"{folder}/{defect_type}/{stem}.jpg"
    _copy(image, out / rel)
    mask_rel = ""
    if defect_type != "good":
        mask_rel = f"ground_truth/{defect_type}/{stem}.png"
        _copy(image.with_suffix(".png"), out / mask_rel)
    label = "good" if defect_type == "good" else "defect"
    return SampleRef(path=rel, split=split, label=label, defect_type=defect_type, mask_path=mask_rel, subset=subset)


def _mtd(
    out: Path, scratch: Path, *, mirror: str | None = None, subset: str = "all", limit: int | None = None
) -> list[SampleRef]:
    """Train: the split's ``MT_Free`` templates (subset ``all``); test: ``dev`` and/or ``holdout``
    images of every class. The 4 MT_Uneven images with an all-zero mask stay defects (image-level
    labels are right; they add no defect pixels) and validation lists them as warnings."""
    parts = {"all": ("dev", "holdout"), "dev": ("dev",), "holdout": ("holdout",)}
    if subset not in parts:
        raise ConfigError(f"mtd option 'subset' must be one of {sorted(parts)}, not {subset!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"mtd option 'limit' must be a positive integer or null, not {limit!r}")
    root = _mtd_root(_mirror(mirror), scratch)
    split = load_mtd_split()
    refs = [_mtd_sample(root, out, "MT_Free", stem, "train", "all") for stem in split["train"][:limit]]
    for part in parts[subset]:
        for cls in sorted(split[part]):
            refs += [_mtd_sample(root, out, cls, stem, "test", part) for stem in split[part][cls][:limit]]
    return refs


# ----------------------------------------------------------------------------- demo

DEMO_DEFECTS = ("scratch", "stain", "hole", "bright_spot")
_DEMO_DARK = np.array([0.17, 0.14, 0.11])  # sandy tint for the grey gravel photo
_DEMO_LIGHT = np.array([0.95, 0.88, 0.74])
_STAIN_COLOURS = np.array([[0.20, 0.30, 0.55], [0.45, 0.22, 0.10], [0.18, 0.38, 0.18], [0.10, 0.10, 0.10]])


def _demo_texture() -> np.ndarray:
    from skimage.data import gravel  # ships inside scikit-image; CC0 (cc0textures.com, Gravel04)

    grey = gravel().astype(np.float64) / 255.0
    return _DEMO_DARK + grey[..., None] * (_DEMO_LIGHT - _DEMO_DARK)


def _demo_good(texture: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A crop at a random place and orientation with small lighting jitter and sensor noise."""
    y, x = rng.integers(0, texture.shape[0] - size + 1), rng.integers(0, texture.shape[1] - size + 1)
    crop = np.rot90(texture[y:y + size, x:x + size], k=int(rng.integers(4)))
    crop = crop * rng.uniform(0.95, 1.05) + rng.uniform(-0.02, 0.02)
    return crop + rng.normal(0.0, 0.01, crop.shape)


def _blob(rng: np.random.Generator, centre: np.ndarray, radius: float) -> list[tuple[float, float]]:
    """Irregular closed outline: a circle whose radius wobbles with a few random harmonics."""
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = sum(rng.uniform(0.05, 0.18) * np.sin(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r = radius * (1 + wobble)
    return list(zip(centre[0] + r * np.cos(angles), centre[1] + r * np.sin(angles)))


def _defect_mask(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    centre = rng.uniform(0.25 * size, 0.75 * size, 2)
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.4, 0.7) * size
        bend = rng.normal(0, 0.15, 3).cumsum()
        t = np.linspace(-0.5, 0.5, 4)
        points = [(centre[0] + length * s * np.cos(angle + b), centre[1] + length * s * np.sin(angle + b))
                  for s, b in zip(t, bend)]
        draw.line(points, fill=255, width=int(rng.integers(3, 5)), joint="curve")
    elif kind == "bright_spot":
        r = rng.uniform(0.035, 0.06) * size
        draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=255)
    else:  # stain or hole
        scale = (0.09, 0.15) if kind == "stain" else (0.06, 0.1)
        draw.polygon(_blob(rng, centre, rng.uniform(*scale) * size), fill=255)
    return mask


def _paint(kind: str, image: np.ndarray, inside: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Change the pixels of ``inside`` only, so the mask is the exact ground truth."""
    out = image.copy()
    region = out[inside]
    if kind == "scratch":  # exposed bright material
        out[inside] = region + rng.uniform(0.7, 0.9) * (np.array([0.97, 0.96, 0.93]) - region)
    elif kind == "stain":  # translucent, varying colour and strength
        colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
        out[inside] = region + rng.uniform(0.3, 0.55) * (colour - region)
    elif kind == "hole":  # missing material: dark, with some texture left visible
        out[inside] = 0.06 + 0.15 * region
    else:  # bright_spot: specular reflection
        out[inside] = region + rng.uniform(0.55, 0.8) * (1.0 - region)
    return out


def _save_rgb(values: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(values * 255), 0, 255).astype(np.uint8)).save(path, format="PNG")


def _demo(
    out: Path,
    scratch: Path,
    *,
    seed: int = 0,
    n_train: int = 24,
    n_test_good: int = 10,
    n_per_defect: int = 4,
    size: int = 160,
) -> list[SampleRef]:
    """Synthetic surface inspection set: good crops of a gravel texture and four defect types
    (scratch, stain, hole, bright_spot) with exact masks. Every image has its own seed
    ``(seed, group, index)``, so changing one count does not change the other images."""
    if not 64 <= size <= 512:
        raise ConfigError(f"demo option 'size' must be in 64..512 px, not {size!r}")
    texture = _demo_texture()
    refs: list[SampleRef] = []

    def good(group: int, index: int) -> np.ndarray:
        return _demo_good(texture, np.random.default_rng([seed, group, index]), size)

    for i in range(n_train):
        _save_rgb(good(0, i), out / f"train/good/{i:03d}.png")
        refs.append(SampleRef(path=f"train/good/{i:03d}.png", split="train", label="good",
                              defect_type="good", mask_path="", subset="all"))
    for i in range(n_test_good):
        _save_rgb(good(1, i), out / f"test/good/{i:03d}.png")
        refs.append(SampleRef(path=f"test/good/{i:03d}.png", split="test", label="good",
                              defect_type="good", mask_path="", subset="all"))
    for group, kind in enumerate(DEMO_DEFECTS, start=2):
        for i in range(n_per_defect):
            rng = np.random.default_rng([seed, group, i, 1])
            mask = _defect_mask(kind, rng, size)
            inside = np.asarray(mask) > 0
            _save_rgb(_paint(kind, good(group, i), inside, rng), out / f"test/{kind}/{i:03d}.png")
            (out / f"ground_truth/{kind}").mkdir(parents=True, exist_ok=True)
            mask.save(out / f"ground_truth/{kind}/{i:03d}.png", format="PNG")
            refs.append(SampleRef(path=f"test/{kind}/{i:03d}.png", split="test", label="defect",
                                  defect_type=kind, mask_path=f"ground_truth/{kind}/{i:03d}.png", subset="all"))
    return refs


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Source:
    """A data source: its builder ``(out, scratch, **options) -> refs``, and the option naming the local input it
    reads, if any (a folder, or a file when ``file``); ``mirror`` may also come from ``$HETMM_MIRROR``."""

    build: Builder
    local: str | None = None
    file: bool = False


SOURCES: dict[DataSource, Source] = {
    DataSource.DEMO: Source(_demo),
    DataSource.FOLDER: Source(_folder, "path"),
    DataSource.ANOMALIB_FOLDER: Source(user_sources.anomalib_folder, "normal_dir"),
    DataSource.TABLE: Source(user_sources.table, "path", file=True),
    DataSource.MVTEC: Source(_mvtec, "mirror"),
    DataSource.MTD: Source(_mtd, "mirror"),
}


def missing_input(source: str, options: dict[str, Any]) -> str | None:
    """Why the local input that ``source`` reads under ``options`` is not on this machine, or None when it may be
    (a source without one, or an unset mirror: the network)."""
    local = SOURCES[source].local
    value = options.get(local) if local else None
    if local == "mirror" and value is None:
        value = os.environ.get(MIRROR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file() if SOURCES[source].file else path.is_dir():
        return None
    return f"the mirror {value} does not exist on this machine" if local == "mirror" else \
        f"data.{local} {value} does not exist on this machine"
