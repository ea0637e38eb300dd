"""A product line's folders and the context every stage runs in; manifest access shared by the stages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hetmm.config import Params, ProductLine
from hetmm.data.manifest import manifest_hash, read_manifest
from hetmm.errors import DataError


@dataclass(frozen=True)
class LinePaths:
    """Where a product line's artifacts live (relative to the repository root)."""

    data: Path
    features: Path
    models: Path
    outputs: Path
    reports: Path

    @classmethod
    def for_line(cls, name: str, root: str | Path = ".") -> "LinePaths":
        root = Path(root)
        return cls(root / "data" / name, root / "features" / name, root / "models" / name,
                   root / "outputs" / name, root / "reports" / name)

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.csv"

    @property
    def template(self) -> Path:
        return self.models / "template.pt"

    @property
    def tfa_net(self) -> Path:
        return self.models / "tfa_net.pt"

    @property
    def threshold(self) -> Path:
        return self.models / "threshold.json"

    @property
    def settings(self) -> Path:
        return self.models / "settings.yaml"

    @property
    def calibration(self) -> Path:
        return self.models / "calibration.json"


@dataclass(frozen=True)
class StageRun:
    """Everything a stage needs: the parsed params, the line, its folders, the device and whether to show progress."""

    params: Params
    line: ProductLine
    paths: LinePaths
    device: str = "auto"
    progress: bool = True

    @classmethod
    def for_line(cls, params: Params, name: str, root: str | Path = ".", device: str | None = None,
                 progress: bool = True, stage: str | None = None) -> "StageRun":
        """The context of ``stage``: stages after ``tune`` get the line's effective settings
        (``models/<line>/settings.yaml``), the others (and ``stage=None``) the ``params.yaml`` entry."""
        from hetmm.pipeline.settings import effective_line
        from hetmm.pipeline.stages import PARAMS_STAGES

        paths = LinePaths.for_line(name, root)
        line = params.line(name)
        if stage is not None and stage not in PARAMS_STAGES:
            line = effective_line(line, paths.settings)
        return cls(params, line, paths, device or params.device, progress)


def manifest(paths: LinePaths) -> pd.DataFrame:
    if not paths.manifest.is_file():
        raise DataError(f"{paths.manifest}: no manifest; run the download stage first (`hetmm download <line>`)")
    return read_manifest(paths.manifest)


def validated_manifest(paths: LinePaths, line: str) -> pd.DataFrame:
    """The manifest, refused unless the validate stage passed on exactly this manifest (same hash): no stage
    after it trusts files that were never checked (a path outside the data folder, a corrupt image)."""
    df = manifest(paths)
    record = read_json(paths.reports / "validation.json")
    if not record:
        why = "it was never validated"
    elif record.get("stats", {}).get("manifest_hash") != manifest_hash(df):
        why = "the data changed since the last validation"
    elif not record.get("success"):
        why = "the last validation failed"
    else:
        return df
    raise DataError(f"{paths.manifest}: {why}; run `hetmm validate {line}` (or `dvc repro validate@{line}`) and fix "
                    f"what {paths.reports / 'validation.html'} lists")


def split(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Rows of one split (``train`` / ``test``), renumbered from 0."""
    return df[df["split"] == name].reset_index(drop=True)


def items(df: pd.DataFrame, paths: LinePaths) -> list[tuple[Path, str]]:
    """``(image file, sha256)`` per manifest row."""
    return [(paths.data / p, sha) for p, sha in zip(df["path"], df["sha256"])]


def read_json(path: Path) -> dict:
    """A stage record or decision file ({} when missing); a damaged one is named, never a traceback."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        record = exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: damaged (not a JSON object); rerun the stage that writes it (`dvc repro`)")
    return record
