"""The one device choice: CPU or CUDA from a setting, without falling back silently."""

from __future__ import annotations

import torch

from hetmm.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)
