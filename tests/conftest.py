"""Shared fixtures for the pipeline, CLI, end-to-end and DVC tests: real images, real stage runs.

The shared data sets sit beside the repository (``<repo>/../shared/data``), on developer machines and on CI's
clean clone alike; tests that need them skip with a reason when the folder is missing.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
HAZELNUT = SHARED / "data" / "hazelnut_toy"
MTD = SHARED / "data" / "mtd"

needs_hazelnut = pytest.mark.skipif(not (HAZELNUT / "train" / "good").is_dir(),
                                    reason=f"hazelnut_toy data set not found at {HAZELNUT}")
needs_mtd = pytest.mark.skipif(not (MTD / "MT_Free" / "Imgs").is_dir(), reason=f"MTD data set not found at {MTD}")

# The test machines are small and shared (2 cores, other jobs running). There, torch's two intra-op threads spin
# on each other and a backbone forward pass runs 30-50x slower than on one thread (measured: random_resnet18,
# 32 images at 64 px, 0.09 s on 1 thread, 2.7 s on 2). The thread count changes features in the last bits only
# (<= 4e-7), but PTS selection can amplify that: thresholds below leave room for it.
torch.set_num_threads(1)
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}


# The demo line of the repository's params.yaml (128 px, PTS K=10): real ImageNet features.
DEMO_LINE: dict[str, Any] = {
    "data": {"source": "demo", "seed": 0},
    "features": {"backbone": "efficientnet_lite0", "layers": [1, 2, 3], "image_size": [128, 128],
                 "batch_size": 8},
    "templates": {"kind": "PTS", "size": 10, "hot_update": True},
    "matching": {"mode": "mutual", "forward_windows": [5, 3, 3], "backward_windows": [3, 3, 1],
                 "alphas": [0.5, 0.5, 0.5], "weights": [1.0, 1.0, 0.5]},
    "post": {"blur_sigma": 2.0, "image_score": "max"},
    "threshold": {"rule": "f1_max"},
    "report": {"overlays": 2, "ablation": False},
    "tune": {"enabled": False},  # tests of the tuner turn it on
}


def folder_line(path: Path, *, backbone: str = "random_resnet18", size: int = 64, kind: str = "PTS", k: int = 10,
                **sections: dict) -> dict[str, Any]:
    """A ``folder`` product line; ``random_resnet18`` at 64 px unless the test needs meaningful features."""
    line = {
        "data": {"source": "folder", "path": str(path)},
        "features": {"backbone": backbone, "image_size": [size, size], "batch_size": 16},
        "templates": {"kind": kind, "size": k},
        "matching": {"forward_windows": [5, 3, 3], "backward_windows": [3, 3, 1]},
        "post": {"blur_sigma": 2.0},
        "report": {"overlays": 2},
        "tune": {"enabled": False},  # tests of the tuner turn it on
    }
    for name, values in sections.items():
        line.setdefault(name, {}).update(values)
    return line


def write_params(root: Path, lines: dict[str, dict], device: str = "cpu"):
    """Write ``root/params.yaml`` and return the parsed :class:`hetmm.config.Params`."""
    from hetmm.config import load_params

    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"device": device, "product_lines": copy.deepcopy(lines)}, sort_keys=False))
    return load_params(path)


def run_stages(params, name: str, root: Path, stages=None) -> dict[str, Any]:
    """Run pipeline stages of one line in ``root`` (default: every stage of its method; no progress bars); returns
    each stage's result."""
    from hetmm.pipeline.line import StageRun
    from hetmm.pipeline.stages import stage, stages_for

    stages = stages_for(params.line(name).method) if stages is None else stages
    return {s: stage(s)(StageRun.for_line(params, name, root, "cpu", progress=False, stage=s)) for s in stages}


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> Path:
    """The embedded demo images as a plain MVTec-layout folder (24 train/good, 10 test/good, 16 defects)."""
    from hetmm.data.sources import fetch

    tree = tmp_path_factory.mktemp("demo_tree") / "src"
    fetch("demo", tree)
    (tree / "manifest.csv").unlink()
    return tree


@pytest.fixture
def folder_src(demo_tree, tmp_path) -> Path:
    """A private, writable copy of :func:`demo_tree` for tests that add, remove or corrupt images."""
    return Path(shutil.copytree(demo_tree, tmp_path / "src"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """Root of a complete demo-line run (all six stages, efficientnet_lite0 at 128 px). Read-only for tests:
    copy it (``copy_run``) before changing anything."""
    root = tmp_path_factory.mktemp("demo_run")
    params = write_params(root, {"demo": DEMO_LINE})
    run_stages(params, "demo", root)
    return root


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
