"""A product line and the whole ``params.yaml``: parsed once, checked section by section, then frozen.

Contract: :func:`parse_params` / :func:`load_params` give :class:`Params`; a line whose entry is broken is kept with
its error and fails alone when it is asked for. :meth:`ProductLine.with_keys` changes dotted keys of a checked line
and gives a line equal to what parsing the entry with those values would give, or an error naming the full key.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from hetmm.config.schema import _check_value, build_config, replace_checked
from hetmm.config.sections import (
    CalibrationConfig,
    ClusterConfig,
    DataConfig,
    FeatureConfig,
    GateConfig,
    InspectionConfig,
    MatchingConfig,
    PostConfig,
    ReportConfig,
    TemplateConfig,
    TFANetConfig,
    ThresholdConfig,
    TuneConfig,
)
from hetmm.config.tunable import AUTO, TUNABLE
from hetmm.errors import ConfigError
from hetmm.methods import spec
from hetmm.modes import Method


@dataclass(frozen=True)
class ProductLine:
    name: str
    method: Method = Method.HETMM
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    templates: TemplateConfig = field(default_factory=TemplateConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    post: PostConfig = field(default_factory=PostConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    inspection: InspectionConfig = field(default_factory=InspectionConfig)
    tfa_net: TFANetConfig = field(default_factory=TFANetConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    # dotted keys the params.yaml entry sets (``matching.mode``): the tuner never changes these
    pinned: frozenset[str] = frozenset()

    def tunable(self) -> tuple[str, ...]:
        """The keys of :data:`~hetmm.config.tunable.TUNABLE` the tuner may choose for this line (none when tuning is
        off, and none for TFA-Net: the tuner searches HETMM's matching)."""
        if not self.tune.enabled or not spec(self.method).tuning:
            return ()
        return tuple(k for k in TUNABLE if k not in self.pinned)

    def with_keys(self, changes: Mapping[str, Any]) -> ProductLine:
        """This line with dotted keys replaced (``{"matching.mode": "patch"}``), each value coerced as the parser
        does, and the changed sections checked (with those that read a changed section: see :func:`validate_line`).
        """
        key = f"product_lines.{self.name}"
        by_section: dict[str, dict[str, Any]] = {}
        for dotted, value in changes.items():
            section, _, name = dotted.partition(".")
            if section not in SECTIONS or not name:
                raise ConfigError(f"{key}.{dotted}: not a section key; use one of {', '.join(SECTIONS)} and a key "
                                  "in it (matching.mode)")
            by_section.setdefault(section, {})[name] = value
        out = replace(self, **{section: replace_checked(getattr(self, section), values, f"{key}.{section}")
                               for section, values in by_section.items()})
        changed = set(by_section) | (set(READS_FEATURES) if "features" in by_section else set())
        validate_line(out, key, changed)
        return out


SECTIONS = ("data", "features", "templates", "matching", "post", "threshold", "report", "tune", "inspection",
            "tfa_net", "calibration", "gate")
READS_FEATURES = ("matching", "post", "tfa_net")  # sections whose checks read the features too


def validate_line(line: ProductLine, key: str, sections: Collection[str] = SECTIONS) -> None:
    """Run the checks of ``sections`` of ``line``, each next to its dataclass; those of :data:`READS_FEATURES` get
    the features too (one value per layer, sizes that fit the map, the TFA-Net grid)."""
    f = line.features
    checks = {"features": lambda: f.check(f"{key}.features"),
              "matching": lambda: line.matching.check(f"{key}.matching", f),
              "templates": lambda: line.templates.check(f"{key}.templates"),
              "post": lambda: line.post.check(f"{key}.post", f),
              "threshold": lambda: line.threshold.check(f"{key}.threshold"),
              "data": lambda: line.data.check(f"{key}.data"),
              "tune": lambda: line.tune.check(f"{key}.tune"),
              "inspection": lambda: line.inspection.check(f"{key}.inspection"),
              "calibration": lambda: line.calibration.check(f"{key}.calibration"),
              "gate": lambda: line.gate.check(f"{key}.gate"),
              "tfa_net": lambda: line.tfa_net.check(f"{key}.tfa_net", f)}  # report: nothing to check
    for name, check in checks.items():
        if name in sections:
            check()


# A product-line name becomes a folder name, a DVC stage suffix and a command argument: letters, digits, '-' and
# '_' only, never starting with '-' (an option) and never '.' or '..' (a path).
LINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_line_name(name: object) -> str:
    if not isinstance(name, str) or not LINE_NAME.fullmatch(name):
        raise ConfigError(f"product_lines.{name}: a line name is 1-64 letters, digits, '-' and '_', starting with "
                          "a letter or digit; rename the line")
    return name


@dataclass(frozen=True)
class Params:
    """Parsed ``params.yaml``. A line whose entry is broken is kept in ``broken`` with its error, so that it fails
    alone (when it is asked for) and never blocks the other lines."""

    product_lines: dict[str, ProductLine]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    broken: dict[str, ConfigError] = field(default_factory=dict)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def line(self, name: str) -> ProductLine:
        if name in self.broken:
            raise self.broken[name]
        if name not in self.product_lines:
            known = ", ".join(sorted(self.product_lines)) or "none"
            raise ConfigError(f"unknown product line {name!r}; params.yaml defines: {known}")
        return self.product_lines[name]


def open_keys(body: Any, key: str) -> tuple[Any, frozenset[str]]:
    """A line entry without its ``auto`` values, and ``section.key`` for every key it pins (sets to a value):
    ``{"post": {"blur_sigma": 2}, "matching": {"mode": "auto"}}`` pins ``post.blur_sigma`` only. ``auto`` is
    refused on a key the tuner does not choose."""
    if not isinstance(body, dict):
        return body, frozenset()
    kept, pinned = {}, set()
    for section, values in body.items():
        if not isinstance(values, dict):
            kept[section] = values
            continue
        kept[section] = {}
        for name, value in values.items():
            dotted = f"{section}.{name}"
            if isinstance(value, str) and value == AUTO:
                if dotted not in TUNABLE:
                    raise ConfigError(f"{key}.{dotted}: `auto` is only for the keys the tuner chooses "
                                      f"({', '.join(TUNABLE)})")
                continue
            kept[section][name] = value
            pinned.add(dotted)
    return kept, frozenset(pinned)


def _renamed_keys(body: Any, key: str) -> Any:
    """``tune.min_images_per_second`` (old name) read as ``inspection.min_images_per_second``, with a notice."""
    tune = body.get("tune") if isinstance(body, dict) else None
    if not isinstance(tune, dict) or "min_images_per_second" not in tune:
        return body
    inspection = body.get("inspection") or {}
    if not isinstance(inspection, dict) or "min_images_per_second" in inspection:
        raise ConfigError(f"{key}.tune.min_images_per_second: the old name of inspection.min_images_per_second, "
                          "which the entry also sets; remove tune.min_images_per_second")
    tune = dict(tune)
    floor = tune.pop("min_images_per_second")
    print(f"hetmm: {key}.tune.min_images_per_second is deprecated; read as "
          f"{key}.inspection.min_images_per_second = {floor} (move it there)", file=sys.stderr)
    return {**body, "tune": tune, "inspection": {**inspection, "min_images_per_second": floor}}


def parse_params(raw: Any) -> Params:
    """Parse the ``params.yaml`` mapping into :class:`Params`."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml: expected a mapping at the top level")
    unknown = sorted(set(raw) - {"product_lines", "device", "cluster"})
    if unknown:
        raise ConfigError(f"params.yaml: unknown top-level key(s) {', '.join(unknown)}; allowed: cluster, device, "
                          "product_lines")
    lines_raw = raw.get("product_lines")
    if not isinstance(lines_raw, dict) or not lines_raw:
        raise ConfigError("product_lines: define at least one product line")
    lines, broken = {}, {}
    for name, body in lines_raw.items():
        try:
            key = f"product_lines.{check_line_name(name)}"
            body, pinned = open_keys(_renamed_keys(body, key), key)
            line = build_config(ProductLine, body, key, name=name, pinned=pinned)
            validate_line(line, key)
            lines[name] = line
        except ConfigError as exc:
            broken[str(name)] = exc
    device = _check_value(raw.get("device", "auto"), Literal["auto", "cpu", "cuda"], "device")
    cluster = build_config(ClusterConfig, raw.get("cluster") or {}, "cluster")
    cluster.check("cluster")
    return Params(product_lines=lines, device=device, broken=broken, cluster=cluster)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_params(raw)
