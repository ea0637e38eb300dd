"""Label-free settings search: good training images only, scored on synthetic defects with known masks.

Contract: :func:`search` takes a line (its pinned keys are never changed), template images and validation normals
(PIL images, all good) and returns a :class:`Result`: every candidate with its scores and the chosen values of the
line's tunable keys. No test image, label or mask is an input.

Objective (:func:`objective`): the mean of image AUROC, pixel AUROC and AU-PRO (percent) over the validation normals
(label 0, empty masks) and the synthetic defects made on them (:mod:`hetmm.data.synthetic`), all at one evaluation
resolution so that image sizes compare fairly. Search: coordinate descent from the line's current values in the
fixed order of :data:`hetmm.config.TUNABLE` (matching first, then features, then matching again on the final
features); a value replaces the current one only when it beats it by more than :data:`MARGIN` and, unless
``tune.confidence`` is 0, wins in that share of paired cluster-bootstrap resamples of the validation set
(:mod:`hetmm.core.bootstrap`: a normal and the defects made on it are one cluster), so that the search does not
drift on the few defects' worth of noise a small validation set has. Features are
extracted once per feature setting and every window's distances once per layer, so a matching candidate costs one
fusion and the metrics. A candidate that the deterministic cost model (:mod:`hetmm.pipeline.throughput`: the
settings, the template the line will deploy, fixed first by :meth:`_Search.template_size`, and the measured profile
of ``inspection.device``) puts below ``inspection.min_images_per_second`` is recorded as too slow, never computed and
never chosen; no timing enters the choice, so a busy machine cannot change it. The budget is read off
:class:`WorkClock` (the process's own work).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hetmm.config import TUNABLE_KEYS, FeatureConfig, ProductLine, phase_keys
from hetmm.core import bootstrap
from hetmm.core.backbones import build_backbone
from hetmm.core.features import FeatureExtractor, content_box
from hetmm.core.inspector import post_plan
from hetmm.core.matching import match_layer, nearest_patch
from hetmm.core.metrics import aupro, image_auroc, pixel_auroc
from hetmm.core.scoring import LayerMatches, match_plan, post_process
from hetmm.errors import ConfigError
from hetmm.modes import MatchMode
from hetmm.pipeline import settings, throughput
from hetmm.pipeline.validation_set import ValidationImages

EVAL_SIZE = (256, 256)  # every candidate's maps and masks are compared at this resolution
MARGIN = 0.1  # objective points a new value must gain over the current one (below the synthetic set's noise)
QUERY_CHUNK = 16
DRAWS = 200  # bootstrap resamples behind each acceptance


def objective(scores: dict[str, float]) -> float:
    """What the search maximises: mean of image AUROC, pixel AUROC and AU-PRO (percent)."""
    return (scores["image_auroc"] + scores["pixel_auroc"] + scores["aupro"]) / 3.0


@dataclass
class EvalSet:
    """Validation queries: normals (label 0) then synthetic defects (label 1) with masks ``[Q, *EVAL_SIZE]``;
    ``groups [Q]``: the normal each query is or was made on (the bootstrap's clusters)."""

    images: list[Image.Image]
    labels: np.ndarray
    masks: np.ndarray
    groups: np.ndarray


@dataclass
class Result:
    chosen: dict[str, Any]  # tuned key -> value (only keys that were tunable)
    candidates: list[dict]  # every evaluated candidate, in order
    baseline: dict  # the first candidate: the line's values before tuning
    best: dict  # the chosen candidate's record
    stopped: str | None = None  # why the search ended early ("budget"), or None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class TooSlow(Exception):
    """A candidate that cannot be deployed: every layer weighted 0."""


class WorkClock:
    """Seconds of this process's own work, so that another job on the machine does not cut the search short: CPU
    time over torch's threads on the CPU, wall time after a sync on CUDA (the GPU's work is not CPU time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.threads = max(1, torch.get_num_threads())

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time() / self.threads


class _Features:
    """Features of the templates and queries for one feature setting and the distances computed from them."""

    def __init__(self, config: FeatureConfig, templates: Sequence[Image.Image], queries: Sequence[Image.Image],
                 device: torch.device, backbones: dict):
        name = (config.backbone, config.weights, config.preact, config.blocks)
        if name not in backbones:
            backbones[name] = build_backbone(config.backbone, weights=config.weights, preact=config.preact,
                                             blocks=config.blocks)
        extractor = FeatureExtractor(config, device, backbone=backbones[name])
        self.templates = _extract(extractor, templates, config.batch_size)
        self.queries = _extract(extractor, queries, config.batch_size)
        self.boxes = [content_box(im.size, config.image_size, config.resize) for im in queries]
        self.config = config
        self.distances: dict[tuple[int, str, int], tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def geometry(self, layer: int, patch: bool, window: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(forward, backward) ``[Q, h, w]`` of one layer and window (or the nearest patch), computed once."""
        key = (layer, "patch" if patch else "window", 0 if patch else window)
        if key not in self.distances:
            query, sheets = self.queries[layer], self.templates[layer]
            parts = [(nearest_patch(batch, sheets), None) if patch else match_layer(batch, sheets, window, window)
                     for batch in query.split(QUERY_CHUNK)]
            self.distances[key] = tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))
        return self.distances[key]


def _extract(extractor: FeatureExtractor, images: Sequence[Image.Image], batch: int) -> list[torch.Tensor]:
    parts = [extractor(images[i : i + batch]) for i in range(0, len(images), batch)]
    return [torch.cat([p[j] for p in parts]).float() for j in range(len(parts[0]))]


class _Search:
    def __init__(self, line: ProductLine, templates: Sequence[Image.Image], evalset: EvalSet, train_images: int,
                 device: torch.device, progress: Callable[[str], None] | None):
        self.line, self.templates, self.evalset = line, list(templates), evalset
        self.train_images = train_images
        self.device = device
        self.floor = line.inspection.min_images_per_second
        self.tunable = set(line.tunable())
        self.backbones: dict = {}
        self.features: dict[str, _Features] = {}
        self.candidates: list[dict] = []
        self.clock = WorkClock(device)
        self.start = self.clock()
        self.stopped: str | None = None
        self.progress = progress or (lambda message: None)
        self.confidence = line.tune.confidence
        self.regions = bootstrap.Regions.of(evalset.masks)
        self.weights = bootstrap.cluster_weights(evalset.groups, DRAWS, line.tune.seed)
        # id(record) -> its maps and scores, summarised (bootstrap.summarise, ~1 s on 120 maps) only when a comparison
        # needs them: most candidates never beat the current one by the margin
        self.kept: dict[int, tuple[np.ndarray, np.ndarray] | bootstrap.Summary] = {}

    # ----------------------------------------------------------------- one candidate

    def sheets(self, line: ProductLine) -> int:
        """Template sheets the line would match against when deployed."""
        return throughput.deployed_sheets(line, self.train_images)

    def _features(self, config: FeatureConfig) -> _Features:
        key = repr(config.fingerprint())
        if key not in self.features:
            self.features[key] = _Features(config, self.templates, self.evalset.images, self.device, self.backbones)
        return self.features[key]

    def evaluate(self, line: ProductLine, phase: str, key: str) -> dict:
        """Score ``line`` on the validation set and record it."""
        record = {"phase": phase, "key": key, "settings": {k: settings._plain(settings.get(line, k))
                                                           for k in sorted(self.tunable)}}
        rate = self._rate(line)
        record["images_per_second"] = None if rate is None else round(rate, 2)
        if rate is not None and rate < self.floor:  # never computed: the cost model alone decides
            record.update(excluded="too slow for inspection.min_images_per_second", objective=None)
            self.candidates.append(record)
            return record
        try:
            feats = self._features(line.features)
            maps, scores = self._maps(line, feats)
        except TooSlow:
            record.update(excluded="every layer weight is 0", objective=None)
            self.candidates.append(record)
            return record
        small = F.interpolate(maps[:, None], size=EVAL_SIZE, mode="bilinear", align_corners=False)[:, 0].numpy()
        metrics = {"image_auroc": image_auroc(scores.numpy(), self.evalset.labels),
                   "pixel_auroc": pixel_auroc(small, self.evalset.masks),
                   "aupro": aupro(small, self.evalset.masks)}
        record.update({k: round(v, 4) for k, v in metrics.items()})
        record.update(objective=round(objective(metrics), 4))
        if self.confidence:
            self.kept[id(record)] = (small, scores.numpy())
        self.candidates.append(record)
        self.progress(f"{phase} {key}: objective {record['objective']}")
        return record

    def _rate(self, line: ProductLine) -> float | None:
        """Estimated images/s of ``line`` deployed; without a contract, None when the profile cannot say."""
        try:
            return throughput.estimate(line, self.sheets(line)).images_per_second
        except ConfigError:
            if self.floor > 0:  # a contract that cannot be checked is an error, never a silent pass
                raise
            return None

    def _maps(self, line: ProductLine, feats: _Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[Q, H, W]`` and image scores ``[Q]`` of ``line``: the deployed recipe,
        :func:`~hetmm.core.scoring.post_process`, on distances computed once per window."""
        m = line.matching
        found = LayerMatches([], [], [], len(self.evalset.images))
        for step in match_plan(m.forward_windows, m.backward_windows, m.alphas, m.weights, m.mode):
            fwd = bwd = None
            if step.patch:
                fwd = feats.geometry(step.layer, True, 0)[0]
            else:
                for window, take in ((step.forward_window, 0), (step.backward_window, 1)):
                    if window:
                        pair = feats.geometry(step.layer, False, window)
                        fwd, bwd = (pair[0], bwd) if take == 0 else (fwd, pair[1])
            found.forward.append(fwd)
            found.backward.append(bwd)
            found.plan.append(step)
        if not found.plan:
            raise TooSlow("no layer")  # every weight 0: not a usable candidate
        return post_process(found, post_plan(line), feats.boxes)

    # ----------------------------------------------------------------- coordinate descent

    def out_of_time(self) -> bool:
        if self.clock() - self.start > self.line.tune.budget_s:
            self.stopped = "budget"
        return self.stopped is not None

    def settle(self, line: ProductLine, best: dict, key: str, options: Sequence[Any], phase: str
               ) -> tuple[ProductLine, dict]:
        """Try every option for ``key`` and keep the best (the current value unless one beats it by MARGIN)."""
        current = settings.get(line, key)
        for value in options:
            if self.out_of_time():
                break
            if _same(value, current):
                continue
            try:
                trial = line.with_keys({key: value})
            except Exception:  # noqa: BLE001 - an option invalid for this line (e.g. a window on a tiny map)
                continue
            record = self.evaluate(trial, phase, key)
            if self.better(record, best):
                self.kept.pop(id(best), None)
                line, best = trial, record
            else:
                self.kept.pop(id(record), None)
        return line, best

    def better(self, record: dict, best: dict) -> bool:
        """Whether ``record`` replaces ``best``: an exact gain above MARGIN, confirmed by the paired bootstrap
        (its share of wins is recorded as ``bootstrap_wins``)."""
        if _score(record) <= _score(best) + MARGIN:
            return False
        if not self.confidence or best["objective"] is None:
            return True
        wins = bootstrap.beats(self._summary(record), self._summary(best), self.evalset.labels,
                               self.regions, self.weights)
        record["bootstrap_wins"] = round(wins, 3)
        return wins >= self.confidence

    def _summary(self, record: dict) -> bootstrap.Summary:
        kept = self.kept[id(record)]
        if not isinstance(kept, bootstrap.Summary):
            kept = self.kept[id(record)] = bootstrap.summarise(*kept, self.regions)
        return kept

    def matching_pass(self, line: ProductLine, best: dict, phase: str) -> tuple[ProductLine, dict]:
        n = len(line.features.layers)
        for key in phase_keys("matching"):
            if key not in self.tunable:
                continue
            values = TUNABLE_KEYS[key].options
            if not TUNABLE_KEYS[key].per_layer:
                line, best = self.settle(line, best, key, values, phase)
            elif _uses(line.matching.mode, key):
                for j in range(n):
                    current = list(settings.get(line, key))
                    options = [tuple(current[:j] + [v] + current[j + 1:]) for v in values]
                    line, best = self.settle(line, best, key, options, phase)
        return line, best

    def feature_pass(self, line: ProductLine, best: dict, native_side: int) -> tuple[ProductLine, dict]:
        for key in phase_keys("features"):
            if key not in self.tunable:
                continue
            options = TUNABLE_KEYS[key].options
            if key == "features.image_size":  # no side above the images' own (but always the first)
                options = [size for size in options if max(size) <= max(native_side, max(options[0]))]
            line, best = self.settle(line, best, key, options, "features")
        return line, best

    def template_size(self, line: ProductLine) -> tuple[ProductLine, list[str]]:
        """Fix the deployed template before the search, from the starting values' estimated speed: ALL (the most
        accurate) when it meets the throughput floor with every training image, else the largest PTS K that does.
        Every candidate is then held to the floor at that size, so a slow mode cannot win on a small template
        and push the line onto a smaller one afterwards."""
        if "templates.kind" not in self.tunable:
            return line, []
        every, fewer = TUNABLE_KEYS["templates.kind"].options  # ALL, else PTS
        everything = line.with_keys({"templates.kind": every})
        if self.floor <= 0:
            return everything, ["templates: ALL (no throughput floor)"]

        def rate(sheets: int) -> float:
            return throughput.estimate(line, sheets).images_per_second

        if rate(self.train_images) >= self.floor:
            return everything, [f"templates: ALL ({self.train_images} sheets, about "
                                f"{rate(self.train_images):.1f} images/s with the starting values)"]
        pts_sizes = TUNABLE_KEYS["templates.size"].options
        sizes = [k for k in pts_sizes if k < self.train_images and rate(k) >= self.floor] or [pts_sizes[-1]]
        chosen = {"templates.kind": fewer}
        if "templates.size" in self.tunable:
            chosen["templates.size"] = sizes[0]
        line = line.with_keys(chosen)
        return line, [f"templates: PTS-{line.templates.size} (ALL with {self.train_images} sheets would inspect "
                      f"about {rate(self.train_images):.2f} images/s with the starting values, below the floor "
                      f"{self.floor})"]


def _score(record: dict) -> float:
    return -math.inf if record["objective"] is None else record["objective"]


def _same(a: Any, b: Any) -> bool:
    return settings._plain(a) == settings._plain(b)


def _uses(mode: MatchMode, key: str) -> bool:
    """Whether the per-layer ``key`` changes the maps in ``mode`` (patch and pixel ignore the windows)."""
    if key == "matching.forward_windows":
        return mode in (MatchMode.MUTUAL, MatchMode.FORWARD)
    if key == "matching.backward_windows":
        return mode in (MatchMode.MUTUAL, MatchMode.BACKWARD)
    if key == "matching.alphas":
        return mode in (MatchMode.MUTUAL, MatchMode.PIXEL)
    return True


def _drop_unused_layers(line: ProductLine, tunable: set[str]) -> ProductLine:
    """Layers the search weighted 0 are not extracted at all, when the line lets the tuner choose its layers."""
    per_layer = tuple(key for key, spec in TUNABLE_KEYS.items() if spec.per_layer)
    keep = [j for j, w in enumerate(line.matching.weights) if w > 0]
    if len(keep) == len(line.features.layers) or not {"features.layers", *per_layer} <= tunable:
        return line
    chosen = {"features.layers": tuple(line.features.layers[j] for j in keep)}
    chosen |= {key: tuple(settings.get(line, key)[j] for j in keep) for key in per_layer}
    return line.with_keys(chosen)


def search(line: ProductLine, templates: Sequence[Image.Image], evalset: EvalSet, train_images: int,
           native_side: int, device: torch.device | str = "cpu",
           progress: Callable[[str], None] | None = None) -> Result:
    """Choose ``line.tunable()`` keys on ``evalset`` (see the module docstring); ``train_images``: how many
    training images the deployed template will have (for the throughput floor)."""
    run = _Search(line, templates, evalset, train_images, torch.device(device), progress)
    with torch.no_grad():
        line, notes = run.template_size(line)
        baseline = best = run.evaluate(line, "baseline", "-")
        current = line
        if run.tunable:
            current, best = run.matching_pass(current, best, "matching")
            current, best = run.feature_pass(current, best, native_side)
            current, best = run.matching_pass(current, best, "matching (final features)")
        if best["objective"] is None:
            notes.append("no candidate met the throughput floor; kept the line's values")
            current = line
        current = _drop_unused_layers(current, run.tunable)
    chosen = {k: settings._plain(settings.get(current, k)) for k in sorted(run.tunable)}
    return Result(chosen=chosen, candidates=run.candidates, baseline=baseline, best=best, stopped=run.stopped,
                  seconds=round(run.clock() - run.start, 1), notes=notes)


def evaluation_set(images: ValidationImages) -> EvalSet:
    """Validation normals (label 0) and the synthetic defects made on them (label 1) as an :class:`EvalSet`
    (``images`` made at :data:`EVAL_SIZE`)."""
    n = len(images.normals)
    normals = np.zeros((n, *EVAL_SIZE), dtype=bool)
    labels = np.array([0] * n + [1] * len(images.defects), dtype=bool)
    per_base = len(images.defects) // n  # synthesize's order: base, family, repeat
    groups = np.concatenate([np.arange(n), np.arange(len(images.defects)) // per_base])
    return EvalSet([*images.normals, *images.defects], labels, np.concatenate([normals, images.masks]), groups)
