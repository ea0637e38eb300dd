"""Names of the swappable parts, defined once: methods, matching modes and template kinds.

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
