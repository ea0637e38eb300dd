"""Split-conformal image thresholds and p-values from the scores of n normals that no model saw (numpy only).

If a new good part's score and the n calibration scores are exchangeable (the calibration images were scored by
models that did not see them, like a new part), flagging ``score >= s_(k)``, the k-th smallest calibration score
with ``k = ceil((n + 1)(1 - a))``, raises a false alarm with probability at most ``(n + 1 - k) / (n + 1) <= a``
(continuous scores). With ``k > n`` no calibration score can promise ``a``: the smallest rate n normals support is
``1 / (n + 1)`` (flag only above the maximum), and :func:`guarantee` says so instead of pretending.

The p-value of a score ``s`` is ``(1 + #{calibration scores >= s}) / (n + 1)``: under exchangeability
``P(p <= a) <= a``, so ``p <= a`` is the same kind of rule as the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def rank(n: int, rate: float) -> int:
    """The 1-based rank ``ceil((n + 1)(1 - rate))`` of the conformal threshold (may exceed n: not supported)."""
    # the tiny slack keeps (n + 1)(1 - rate) that is an integer in exact arithmetic from rounding up
    return max(1, math.ceil((n + 1) * (1.0 - rate) - 1e-9))


def smallest_rate(n: int) -> float:
    """The lowest false-alarm rate n calibration normals can promise."""
    return 1.0 / (n + 1)


def guarantee(scores: np.ndarray, rate: float) -> dict[str, Any]:
    """The threshold for false-alarm rate ``rate`` from the calibration ``scores`` and what it promises.

    ``threshold``: the ``rank``-th smallest score, or the largest when n is too small (then ``supported`` is False
    and ``promised_rate`` is ``1 / (n + 1)``, above the rate asked for); ``promised_rate``: the bound
    ``(n + 1 - k) / (n + 1)`` that holds for the threshold deployed; ``statement``: one sentence that says both.
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = int(values.size)
    if n == 0:
        raise ValueError("a conformal threshold needs at least one calibration score")
    k = rank(n, rate)
    supported = k <= n
    used = min(k, n)
    promised = (n + 1 - used) / (n + 1)
    if supported:
        statement = (f"a good part is flagged with probability at most {promised:.2%} (asked: {rate:.2%}): the "
                     f"{used}-th smallest of {n} cross-fitted normal scores")
    else:
        statement = (f"{n} calibration normals cannot support a false-alarm rate of {rate:.2%}: the smallest they "
                     f"support is {smallest_rate(n):.2%} (1/(n+1)); the threshold is their maximum and promises "
                     f"{promised:.2%}; add good images (>= {needed(rate)} for {rate:.2%})")
    return {"rate": float(rate), "n": n, "rank": used, "supported": supported, "threshold": float(values[used - 1]),
            "promised_rate": promised, "smallest_rate": smallest_rate(n), "statement": statement}


def needed(rate: float) -> int:
    """Calibration normals needed before ``rate`` is supported: the smallest n with ``rank(n, rate) <= n``."""
    return max(1, math.ceil(1.0 / rate - 1.0 - 1e-9)) if rate > 0 else 0


def p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration >= s}) / (n + 1)`` for every score ``s``."""
    ref = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = ref.size - np.searchsorted(ref, s, side="left")
    return (1.0 + at_least) / (ref.size + 1.0)
