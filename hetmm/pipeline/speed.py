"""Measured inspection speed of a line's deployed model, against its throughput contract (``inspection``).

Contract: :func:`measure` times the deployed scorer on the line's own test images, end to end from cached features
(load, match, post-process), a few batches at batch 1 and batch 8, plus the backbone on a short timed extraction of
real test images, and returns the ``speed`` record the infer stage writes (``infer.json``, copied into the DVC
metric ``metrics.json`` by the report stage):

* ``images_per_second`` (batch 8) and ``images_per_second_batch_1``: ``1 / (backbone + matching)`` per image;
* ``ms_per_image_batch_1`` / ``ms_per_image_batch_8`` (the same, in milliseconds) and ``backbone_ms_per_image``;
* ``contract``: ``inspection.min_images_per_second``, the device it is for and the cost model's estimate
  (:mod:`hetmm.pipeline.throughput`, HETMM lines); ``contract_met``: the batch-8 figure meets the floor, or None
  when there is no floor or the stage ran on another device than the contract's.

Wall time, so a busy machine reads slower: the figure says what this run saw, the estimate what the device profile
promises.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hetmm.core.inspector import Scorer
from hetmm.data.images import load_image
from hetmm.errors import ConfigError
from hetmm.methods import spec
from hetmm.pipeline import throughput
from hetmm.pipeline.feature_cache import FeatureCache

SINGLES = 3  # batch-1 runs timed (the median counts)
BATCHES = 2  # batch-8 runs timed (their mean counts)
BATCH = 8


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _score_seconds(scorer: Scorer, cache: FeatureCache, shas: Sequence[str]) -> float:
    """Seconds to load ``shas``' cached features and score them as one batch."""
    start = _clock(scorer.device)
    layers, boxes = cache.load(list(shas))
    scorer.score_features([t.to(scorer.device) for t in layers], boxes)
    return _clock(scorer.device) - start


def _batches(shas: Sequence[str], size: int, count: int) -> list[list[str]]:
    """``count`` batches of ``size`` images, cycling through ``shas`` when the test split is small."""
    return [[shas[(b * size + i) % len(shas)] for i in range(size)] for b in range(count)]


def measure(scorer: Scorer, cache: FeatureCache, shas: Sequence[str], images: Sequence[Path]) -> dict:
    """The ``speed`` record of ``scorer`` on test images ``shas`` (their files: ``images``); see the module."""
    line = scorer.line
    with torch.no_grad():
        _score_seconds(scorer, cache, shas[:1])  # warm-up: first-call allocations are not inspection cost
        single = statistics.median(_score_seconds(scorer, cache, b) for b in _batches(shas, 1, SINGLES))
        eight = statistics.mean(_score_seconds(scorer, cache, b) for b in _batches(shas, BATCH, BATCHES)) / BATCH
        pictures = [load_image(p) for p in images[:BATCH]]
        scorer.extractor(pictures[:1])
        start = _clock(scorer.device)
        scorer.extractor(pictures)
        backbone = (_clock(scorer.device) - start) / len(pictures)
    record = {"images_per_second": round(1.0 / (backbone + eight), 2),
              "images_per_second_batch_1": round(1.0 / (backbone + single), 2),
              "ms_per_image_batch_1": round(1e3 * (backbone + single), 2),
              "ms_per_image_batch_8": round(1e3 * (backbone + eight), 2),
              "backbone_ms_per_image": round(1e3 * backbone, 2), "device": scorer.device.type}
    floor, device = line.inspection.min_images_per_second, line.inspection.device
    contract = {"min_images_per_second": floor, "device": device, "estimated_images_per_second": None}
    if spec(line.method).tuning:  # the cost model describes HETMM matching
        try:
            contract["estimated_images_per_second"] = round(
                throughput.estimate(line, scorer.sheets).images_per_second, 2)
        except ConfigError as exc:
            contract["estimate_missing"] = str(exc)
    record["contract"] = contract
    if floor <= 0:
        record["contract_met"] = None
    elif scorer.device.type != device:
        record["contract_met"] = None
        contract["note"] = f"measured on {scorer.device.type}; the contract is for {device}"
    else:
        record["contract_met"] = record["images_per_second"] >= floor
    return record


def warning(name: str, record: dict) -> str | None:
    """One line for stderr when the measured speed is below the contract, else None."""
    if record.get("contract_met") is not False:
        return None
    c = record["contract"]
    return (f"hetmm infer {name}: WARNING {record['images_per_second']} images/s measured (batch {BATCH}, "
            f"{record['device']}), below inspection.min_images_per_second {c['min_images_per_second']} "
            f"(cost model: {c['estimated_images_per_second']}); a busy machine reads slower, re-run on a quiet one "
            "or choose faster settings")
