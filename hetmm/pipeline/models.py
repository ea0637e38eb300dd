"""A line's deployed model, loaded as a :class:`~hetmm.core.inspector.Scorer` whatever its method.

The one way infer, predict, calibrate and the report's ablation load a model: :func:`load_scorer` asks the method
registry (:mod:`hetmm.methods`) for the model's file and loader. Each loader refuses a model made from other
feature settings or code than the installed ones, naming the command that rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hetmm.config import ProductLine
from hetmm.core.device import resolve_device
from hetmm.core.inspector import Inspector, Scorer
from hetmm.core.tfa_inspector import TFAInspector
from hetmm.methods import spec
from hetmm.pipeline import tfa_model
from hetmm.pipeline.line import LinePaths
from hetmm.pipeline.line_template import load_current


def model_path(line: ProductLine, paths: LinePaths) -> Path:
    """``models/<line>/<stem>.pt`` of the line's method."""
    return paths.models / f"{spec(line.method).model_file}.pt"


def load_scorer(line: ProductLine, paths: LinePaths, device: str | torch.device = "auto",
                model: Path | None = None) -> Scorer:
    """The line's model (``model`` overrides the file) on ``device``, by its method's loader."""
    return spec(line.method).load()(line, Path(model or model_path(line, paths)), resolve_device(device))


def load_template_scorer(line: ProductLine, path: Path, device: torch.device) -> Inspector:
    """A HETMM template, checked against the installed feature code, with the line's settings."""
    return Inspector(line, load_current(line, path), device)


def load_tfa_scorer(line: ProductLine, path: Path, device: torch.device,
                    expect_images: list[str] | None = None) -> TFAInspector:
    """A trained TFA-Net; with ``expect_images``, refused unless it was trained on exactly those images."""
    net, template, meta = tfa_model.load_model(line, path, expect_images)
    return TFAInspector(line, net, template, meta["content_hash"], device)
