"""A line's effective settings: ``params.yaml`` with the tuner's choices for the keys the entry does not pin.

The tune stage writes ``models/<line>/settings.yaml``: every section of the line, fully resolved, plus a ``hetmm``
block recording the digest of the ``params.yaml`` entry it was made from and which keys the tuner chose. The stages
after it read their settings from this file (``dvc.yaml`` declares its sections as their params, so a tuned change
reruns exactly the stages whose section changed). A file made from another entry is refused, never used.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import yaml

from hetmm.config import ProductLine, build_config, validate_line
from hetmm.errors import ConfigError
from hetmm.io import atomic_path, sha256_json

SECTIONS = ("method", "data", "features", "templates", "matching", "post", "threshold", "report", "tune", "inspection",
            "tfa_net", "calibration", "gate")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def sections(line: ProductLine) -> dict[str, dict[str, Any]]:
    """Every section of ``line`` as plain YAML values (defaults resolved); ``method`` is a plain value."""
    return {name: _plain(getattr(line, name) if name == "method" else dataclasses.asdict(getattr(line, name)))
            for name in SECTIONS}


def line_digest(line: ProductLine) -> str:
    """What the settings were made from: the entry's resolved values and which keys it pins."""
    return sha256_json({"sections": sections(line), "pinned": sorted(line.pinned)})


def section_digest(line: ProductLine, names: tuple[str, ...], images: list[str]) -> str:
    """Digest of some sections of ``line`` and of the (sha256 of the) images an artifact was made from."""
    body = sections(line)
    return sha256_json({"sections": {n: body[n] for n in names}, "images": sorted(set(images))})


# What the calibrate stage's thresholds depend on (besides the feature and matching code, which DVC tracks).
CALIBRATION_SECTIONS = ("method", "features", "templates", "matching", "post", "threshold", "tune", "tfa_net",
                        "calibration")


def calibration_key(line: ProductLine, train: list[str]) -> str:
    return section_digest(line, CALIBRATION_SECTIONS, train)


def get(line: ProductLine, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(line, section), name)


def write_settings(path: Path, line: ProductLine, source: ProductLine, tuned: dict[str, Any]) -> None:
    """Write the effective ``line`` made from the params entry ``source`` with the tuner's choices ``tuned``."""
    body = {"hetmm": {"params_digest": line_digest(source), "tuned": sorted(tuned), "pinned": sorted(source.pinned)},
            **sections(line)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("# Written by `hetmm tune`: the line's effective settings (params.yaml + tuned keys).\n"
                       + yaml.safe_dump(body, sort_keys=False))


def effective_line(source: ProductLine, path: Path) -> ProductLine:
    """The line the stages after ``tune`` run with; refuses a settings file missing or made from another entry.

    A line with nothing to tune runs with its ``params.yaml`` entry as it is (what the file would hold).
    """
    if not source.tunable():
        return source
    fix = f"run `hetmm tune {source.name}` (or `dvc repro`)"
    if not path.is_file():
        raise ConfigError(f"{path}: no effective settings for line {source.name!r}; {fix}")
    try:
        raw = yaml.safe_load(path.read_text())
        meta = raw.pop("hetmm")
    except (yaml.YAMLError, AttributeError, KeyError) as exc:
        raise ConfigError(f"{path}: unreadable settings file ({exc}); {fix}") from None
    if meta.get("params_digest") != line_digest(source):
        raise ConfigError(f"{path}: made from other params than product_lines.{source.name} now holds; {fix}")
    line = build_config(ProductLine, raw, str(path), name=source.name, pinned=source.pinned)
    validate_line(line, str(path))
    return line


def tuned_keys(path: Path) -> list[str]:
    """Which keys of ``path`` the tuner chose (for reports and the model card)."""
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return list((raw or {}).get("hetmm", {}).get("tuned", []))
