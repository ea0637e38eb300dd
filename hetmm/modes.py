"""Names of the swappable parts, defined once: methods, matching modes, template kinds, threshold rules, data
sources.

Torch-free, so that parsing ``params.yaml`` stays fast. The configuration, the scoring plan, the template builders
and the ablation table all read these enums.
"""

from __future__ import annotations

from enum import StrEnum


class MatchMode(StrEnum):
    """How query features are compared with the templates (the paper's Table 8), in the ablation table's order."""

    PIXEL = "pixel"  # both windows 1: position-aligned matching
    PATCH = "patch"  # nearest template vector at any position (PatchCore-like), as the forward map
    FORWARD = "forward"  # query -> template only (alpha 1)
    BACKWARD = "backward"  # template -> query only (alpha 0)
    MUTUAL = "mutual"  # HETMM: forward and backward windows mixed by alpha


class TemplateKind(StrEnum):
    """Which template set is built from the training features."""

    ALL = "ALL"  # every training image is a sheet
    PTS = "PTS"  # Pixel-level Template Selection: K sheets per pixel (OPTICS medoids + hard normals)
    COVER = "COVER"  # K sheets per pixel that cover the training vectors: greedy k-center (farthest-first)


class Method(StrEnum):
    """How a product line scores images: training-free template matching, or a network trained on its good images."""

    HETMM = "hetmm"  # template mutual matching (the templates stage builds the template set)
    TFA_NET = "tfa_net"  # Template-based Feature Aggregation Network (the train stage fits it)


class ThresholdRule(StrEnum):
    """How the deployed image threshold is chosen (``hetmm.core.thresholds.RULES`` computes each)."""

    NORMAL_FPR = "normal_fpr"  # calibration: the false-alarm rate ``value`` on validation normals
    SYNTHETIC_F1 = "synthetic_f1"  # calibration: F1-max on validation normals and synthetic defects
    F1_MAX = "f1_max"  # oracle: F1-max on the test labels
    NORMAL_QUANTILE = "normal_quantile"  # oracle: the ``value`` quantile of the good test images' scores
    MANUAL = "manual"  # the ``value`` given

    @property
    def oracle(self) -> bool:
        """Whether the rule reads the test labels: its threshold (and any figure at it) is not a deployable choice."""
        return self in (ThresholdRule.F1_MAX, ThresholdRule.NORMAL_QUANTILE)


class DataSource(StrEnum):
    """Where a product line's images come from (``hetmm.data.sources.SOURCES`` builds each)."""

    DEMO = "demo"  # synthetic textures, no network
    FOLDER = "folder"  # a local MVTec-layout tree
    ANOMALIB_FOLDER = "anomalib_folder"  # anomalib's Folder layout
    TABLE = "table"  # a CSV or parquet file of images
    MVTEC = "mvtec"  # one MVTec AD category
    MTD = "mtd"  # Magnetic Tile Defects with the committed split
