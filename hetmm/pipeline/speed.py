"""Measured inspection speed of a line's deployed model, against its throughput contract (``inspection``).

Contract: :func:`measure` times the deployed scorer on the line's own test images, end to end from cached features
(load, match, post-process), a few batches at batch 1 and batch 8, plus the backbone on a short timed extraction of
real test images, and returns the ``speed`` record the infer stage writes (``infer.json``, copied into the DVC
metric ``metrics.json`` by the report stage):

* ``images_per_second`` (batch 8) and ``images_per_second_batch_1``: ``1 / (backbone + matching)`` per image;
* ``ms_per_image_batch_1`` / ``ms_per_image_batch_8`` (the same, in milliseconds) and ``backbone_ms_per_image``;
* ``work_images_per_second``: the batch-8 figure on the process's own work (CPU time over torch's threads, as the
  device profile was measured; wall time on CUDA);
* ``contract``: ``inspection.min_images_per_second``, the device it is for and the cost model's estimate
  (:mod:`hetmm.pipeline.throughput`, HETMM lines); ``contract_met``: the batch-8 work figure meets the floor, or None
  when there is no floor or the stage ran on another device than the contract's.

The wall figures say what this run saw (a busy machine reads slower); the contract is judged on the work figure, so
other jobs on a shared machine do not fail it, while a slow model still does.
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


def _clock(device: torch.device) -> tuple[float, float]:
    """(wall, work) seconds: work is CPU time over torch's threads, or wall time after a sync on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        now = time.perf_counter()
        return now, now
    return time.perf_counter(), time.process_time() / max(1, torch.get_num_threads())


def _since(start: tuple[float, float], device: torch.device) -> tuple[float, float]:
    now = _clock(device)
    return now[0] - start[0], now[1] - start[1]


def _score_seconds(scorer: Scorer, cache: FeatureCache, shas: Sequence[str]) -> tuple[float, float]:
    """(wall, work) seconds to load ``shas``' cached features and score them as one batch."""
    start = _clock(scorer.device)
    layers, boxes = cache.load(list(shas))
    scorer.score_features([t.to(scorer.device) for t in layers], boxes)
    return _since(start, scorer.device)


def _batches(shas: Sequence[str], size: int, count: int) -> list[list[str]]:
    """``count`` batches of ``size`` images, cycling through ``shas`` when the test split is small."""
    return [[shas[(b * size + i) % len(shas)] for i in range(size)] for b in range(count)]


def measure(scorer: Scorer, cache: FeatureCache, shas: Sequence[str], images: Sequence[Path]) -> dict:
    """The ``speed`` record of ``scorer`` on test images ``shas`` (their files: ``images``); see the module."""
    line = scorer.line
    with torch.no_grad():
        _score_seconds(scorer, cache, shas[:1])  # warm-up: first-call allocations are not inspection cost
        singles = [_score_seconds(scorer, cache, b) for b in _batches(shas, 1, SINGLES)]
        eights = [_score_seconds(scorer, cache, b) for b in _batches(shas, BATCH, BATCHES)]
        pictures = [load_image(p) for p in images[:BATCH]]
        scorer.extractor(pictures[:1])
        start = _clock(scorer.device)
        scorer.extractor(pictures)
        backbone = [t / len(pictures) for t in _since(start, scorer.device)]
    single = statistics.median(wall for wall, _ in singles)
    eight = [statistics.mean(t[i] for t in eights) / BATCH for i in (0, 1)]  # wall, work
    record = {"images_per_second": round(1.0 / (backbone[0] + eight[0]), 2),
              "images_per_second_batch_1": round(1.0 / (backbone[0] + single), 2),
              "ms_per_image_batch_1": round(1e3 * (backbone[0] + single), 2),
              "ms_per_image_batch_8": round(1e3 * (backbone[0] + eight[0]), 2),
              "backbone_ms_per_image": round(1e3 * backbone[0], 2),
              "work_images_per_second": round(1.0 / (backbone[1] + eight[1]), 2), "device": scorer.device.type}
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
        record["contract_met"] = record["work_images_per_second"] >= floor
    return record


def warning(name: str, record: dict) -> str | None:
    """One line for stderr when the measured speed is below the contract, else None."""
    if record.get("contract_met") is not False:
        return None
    c = record["contract"]
    return (f"hetmm infer {name}: WARNING {record['work_images_per_second']} images/s of its own work "
            f"({record['images_per_second']} wall; batch {BATCH}, {record['device']}), below "
            f"inspection.min_images_per_second {c['min_images_per_second']} (cost model: "
            f"{c['estimated_images_per_second']}); choose faster settings (a smaller template, image size or window)")
