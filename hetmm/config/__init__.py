"""Typed configuration: ``params.yaml`` is parsed once into frozen dataclasses.

Every error names the full key (``product_lines.mtd.matching.alphas[2]``) and what is allowed, so a typo in a DVC
experiment (``dvc exp run -S ...``) fails before any work is done. :mod:`~hetmm.config.schema` coerces raw values to
the annotations, :mod:`~hetmm.config.sections` holds each section with its checks, :mod:`~hetmm.config.tunable` the
keys the tuner chooses and the values it tries, :mod:`~hetmm.config.line` the line, ``params.yaml`` and
:meth:`ProductLine.with_keys`. Importers use this package's names.
"""

from hetmm.config.line import (
    LINE_NAME,
    SECTIONS,
    Params,
    ProductLine,
    check_line_name,
    load_params,
    open_keys,
    parse_params,
    validate_line,
)
from hetmm.config.schema import _check_value, build_config
from hetmm.config.sections import (
    MAX_BATCH,
    MAX_IMAGE_SIDE,
    MAX_TFA_PARAMETERS,
    ORACLE_RULES,
    TFA_CAPS,
    TFA_PRESETS,
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
from hetmm.config.tunable import AUTO, TUNABLE, TUNABLE_KEYS, TunableKey, phase_keys

__all__ = ["AUTO", "LINE_NAME", "MAX_BATCH", "MAX_IMAGE_SIDE", "MAX_TFA_PARAMETERS", "ORACLE_RULES", "SECTIONS",
           "TFA_CAPS", "TFA_PRESETS", "TUNABLE", "TUNABLE_KEYS", "CalibrationConfig", "ClusterConfig", "DataConfig",
           "FeatureConfig", "GateConfig", "InspectionConfig", "MatchingConfig", "Params", "PostConfig", "ProductLine",
           "ReportConfig", "TFANetConfig", "TemplateConfig", "ThresholdConfig", "TuneConfig", "TunableKey",
           "_check_value", "build_config", "check_line_name", "load_params", "open_keys", "parse_params",
           "phase_keys", "validate_line"]
