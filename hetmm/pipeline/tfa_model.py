"""Saved TFA-Net models (``models/<line>/tfa_net.pt``) and the resume state of an unfinished training.

A model file holds the network's shape and weights, the template image's grid features and ``meta``: the *key*
(settings, training images, feature key and code, :func:`model_key`), the feature key and the content hash that
thresholds and reports name. :func:`load_model` refuses a file whose feature settings, feature code or TFA-Net code
differ from the installed ones, naming the command that retrains it (:mod:`hetmm.pipeline.models` makes the network
a scorer). Both files are written atomically and read with ``weights_only`` (tensors and plain values, never pickled
code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hetmm.config import TFA_CAPS, ProductLine
from hetmm.core.tfa_net import NetShape, TFANet
from hetmm.errors import ConfigError, TemplateMismatchError
from hetmm.io import atomic_path, sha256_json
from hetmm.pipeline import deploy
from hetmm.pipeline.provenance import FeatureKey, tfa_code
from hetmm.pipeline.settings import sections

FORMAT = "hetmm-tfa-net/1"


def model_key(line: ProductLine, images: list[str]) -> str:
    """What a trained model depends on: its settings, the images it was fitted on, their features and the code."""
    body = sections(line)
    return sha256_json({"settings": {n: body[n] for n in ("features", "tfa_net")}, "images": sorted(images),
                        "features": FeatureKey.of(line.features).record(), "code": tfa_code()})


def content_hash(state: dict[str, torch.Tensor], template: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    digest.update(template.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_model(path: Path, net: TFANet, template: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the model atomically; returns ``meta`` with its ``content_hash``."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    meta = {**meta, "content_hash": content_hash(state, template)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "shape": dataclasses.asdict(net.shape), "state": state,
                    "template": template.cpu(), "meta": meta}, tmp)
    return meta


def read(path: Path) -> dict[str, Any] | None:
    """The saved file's content, or None when it is missing or unreadable (a torn or foreign file)."""
    body = read_state(path)
    return body if body is not None and body.get("format") == FORMAT else None


def load_model(line: ProductLine, path: Path, expect_images: list[str] | None = None
               ) -> tuple[TFANet, torch.Tensor, dict[str, Any]]:
    """The line's trained network (CPU), its template grid features and ``meta``; refuses a missing file or one made
    by other settings or code (with ``expect_images``: or trained on other images)."""
    fix = f"retrain it with `dvc repro train@{line.name}` (or `hetmm train {line.name}`)"
    body = read(path)
    if body is None:
        raise TemplateMismatchError(f"{path}: no readable TFA-Net model; {fix}")
    meta = body["meta"]
    if why := FeatureKey.of(line.features).differences(meta.get("features") or {}):
        raise TemplateMismatchError(f"{path}: {why} since the model was trained; {fix}")
    if meta.get("code") != tfa_code():
        raise TemplateMismatchError(f"{path}: the TFA-Net code changed since the model was trained; {fix}")
    if expect_images is not None and meta.get("key") != model_key(line, expect_images):
        raise TemplateMismatchError(f"{path}: trained with other settings or images than the line has now; {fix}")
    net = TFANet(NetShape(**body["shape"]))
    net.load_state_dict(body["state"])
    return net, body["template"], meta


def resume_path(path: Path) -> Path:
    """Where an unfinished training keeps its state (beside the model, hidden, never a DVC output)."""
    return path.with_name(f".{path.stem}.resume.pt")


def read_state(path: Path) -> dict[str, Any] | None:
    """A resume state (network, optimiser, epoch, key, history), or None when missing or torn."""
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn state is discarded and training restarts
        return None
    return body if isinstance(body, dict) and ("key" in body or "format" in body) else None


def resume_state(path: Path, key: str) -> dict[str, Any] | None:
    """The unfinished run's state when it was made with ``key``; any other (or a torn one) is deleted: the run
    restarts cleanly."""
    body = read_state(path)
    if body is not None and body.get("key") == key and "step" in body:
        return body
    path.unlink(missing_ok=True)
    return None


def finish_curves(curves: Path, model: Path, key: str) -> None:
    """Swap a finished training's curves (DVCLive, written beside ``curves``) in and drop its resume state; also
    when a kill came between saving the model and this (the state of ``key`` is still there)."""
    staged, resume = curves.with_name(f".{curves.name}.staging"), resume_path(model)
    deploy.restore_folder(curves)
    if staged.is_dir() and resume_state(resume, key) is not None:
        deploy.replace_folder(staged, curves)
    resume.unlink(missing_ok=True)


def check_schedule(line: str, cfg: dict[str, Any], per_epoch: int, steps: int) -> float:
    """Refuse a schedule over the steps cap (``epochs`` count in steps only here); returns the start time."""
    if steps > TFA_CAPS["steps"]:
        raise ConfigError(f"product_lines.{line}.tfa_net.epochs: {cfg['epochs']} epochs of {per_epoch} steps are "
                          f"{steps:_} steps, over the cap of {TFA_CAPS['steps']:_}; train fewer epochs")
    return time.perf_counter()


def say_pace(line: str, since: float, done: int, left: int) -> None:
    """The estimate of a training's remaining time from the pace of its first ``done`` steps (on stderr)."""
    if left > 0:
        pace = (time.perf_counter() - since) / done
        print(f"train {line}: {left:_} steps left, about {pace * left / 60:.1f} min at {pace:.2f} s/step "
              "(tfa_net.steps or tfa_net.epochs set the length)", file=sys.stderr)
