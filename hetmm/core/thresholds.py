"""The threshold rules, defined once: per :class:`~hetmm.modes.ThresholdRule`, where its image threshold comes from,
how it is chosen, and how the model card says so.

Contract: ``RULES[rule].choose(value, scores, labels, image)`` gives ``{"threshold": ..., <the rule's own figures>}``
from ``threshold.value``, the test split's image ``scores`` / ``labels`` (read by the oracle rules only, see
:attr:`ThresholdRule.oracle <hetmm.modes.ThresholdRule.oracle>`) and the calibration record's ``image`` section;
``RULES[rule].describe(decision, calibration)`` is the card's phrase for the image threshold of a ``threshold.json``
record. :func:`false_alarm_rate` is the rate the calibrate stage computes the ``normal_fpr`` threshold at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetmm.core.metrics import f1_max
from hetmm.modes import ThresholdRule

DEFAULT_FPR = 0.01  # normal_fpr without a value: at most 1 % of the validation normals raise an alarm


@dataclass(frozen=True)
class Rule:
    source: str  # where the image threshold comes from, in words (``threshold.json``'s ``source``)
    choose: Callable[[float | None, np.ndarray, np.ndarray, Mapping[str, Any]], dict[str, Any]]
    describe: Callable[[Mapping[str, Any], Mapping[str, Any]], str]


def _normals(calibration: Mapping[str, Any]) -> int:
    return len(calibration.get("validation_normals", []))


# How the calibration normals were scored (hetmm.pipeline.calibration), in words.
SCHEMES = {"leave_one_out": "every good training image, each scored by the template without its own sheet "
                            "(leave-one-out)",
           "k_fold": "every good training image, each scored by a template built without its fold (content-hash "
                     "folds)",
           "held_out": "the held-out share of the good training images the model was not trained on"}


def _normal_fpr(value: float | None, scores: np.ndarray, labels: np.ndarray, image: Mapping[str, Any]) -> dict:
    out = {"threshold": float(image["normal_fpr"]), "false_alarm_rate": image["false_alarm_rate"]}
    if "guarantee" in image:  # calibrations from before the conformal threshold have none
        out["guarantee"] = image["guarantee"]
    return out


def _describe_normal_fpr(t: Mapping[str, Any], c: Mapping[str, Any]) -> str:
    if "guarantee" in t:
        return (f"the conformal threshold of {t['guarantee']['n']} calibration normals "
                f"({SCHEMES.get(c.get('scheme'), c.get('scheme'))}); {t['guarantee']['statement']}, for good parts "
                "exchangeable with the training images; no test labels used")
    return (f"the score that at most {t['false_alarm_rate']:.2%} of {_normals(c)} validation normals (held-out good "
            "training images) exceed; no test labels used")


def _f1_max(value: float | None, scores: np.ndarray, labels: np.ndarray, image: Mapping[str, Any]) -> dict:
    if labels.all() or not labels.any():
        good = scores[~labels] if (~labels).any() else scores
        # Without both classes F1 is undefined; fall back to the highest normal score (documented in README).
        return {"threshold": float(good.max()), "note": "one class only: max normal score"}
    f1, threshold = f1_max(scores, labels)
    return {"threshold": float(threshold), "f1": f1}


def _normal_quantile(value: float | None, scores: np.ndarray, labels: np.ndarray, image: Mapping[str, Any]) -> dict:
    good = scores[~labels]
    if good.size == 0:
        raise ValueError("threshold rule normal_quantile needs good test images")
    return {"threshold": float(np.quantile(good, value)), "quantile": value}


RULES: dict[ThresholdRule, Rule] = {
    ThresholdRule.NORMAL_FPR: Rule("calibration normals", _normal_fpr, _describe_normal_fpr),
    ThresholdRule.SYNTHETIC_F1: Rule(
        "synthetic defects",
        lambda value, scores, labels, image: {"threshold": float(image["synthetic_f1"]),
                                              "synthetic_f1": image["synthetic_f1_score"]},
        lambda t, c: (f"F1-max ({t['synthetic_f1']:.1f} %) on {_normals(c)} validation normals and "
                      f"{c.get('synthetic', 0)} synthetic defects; no test labels used")),
    ThresholdRule.F1_MAX: Rule(
        "test labels (oracle)", _f1_max,
        lambda t, c: "F1-max on the test labels: ORACLE, so figures at it are optimistic and it is not deployable"),
    ThresholdRule.NORMAL_QUANTILE: Rule(
        "test labels (oracle)", _normal_quantile,
        lambda t, c: (f"the {t['quantile']} quantile of the good test images' scores: ORACLE (read off the test "
                      "labels), so figures at it are optimistic")),
    ThresholdRule.MANUAL: Rule(
        "manual",
        lambda value, scores, labels, image: {"threshold": float(value)},
        lambda t, c: "given in params.yaml (threshold.value)"),
}


def false_alarm_rate(rule: ThresholdRule, value: float | None) -> float:
    """The false-alarm rate of the ``normal_fpr`` threshold that calibration records for every rule: the line's
    ``threshold.value`` when its rule is ``normal_fpr`` and it sets one, else :data:`DEFAULT_FPR`."""
    return value if rule == ThresholdRule.NORMAL_FPR and value is not None else DEFAULT_FPR
