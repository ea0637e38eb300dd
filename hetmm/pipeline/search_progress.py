"""The label-free search's progress as phase lines (one per pass, with its candidate count and an ETA).

Light (no torch): the tune stage builds it before it knows whether a search runs.
"""

from __future__ import annotations

import sys
import time

from hetmm.config import TUNABLE_KEYS
from hetmm.report.progress import Phases


class SearchLines:
    """The search's per-candidate callback (``"<pass> <key>: objective <x>"``) as one progress phase per pass, with
    its candidate count (at most the options of its tunable keys) and an ETA within the time budget."""

    def __init__(self, line, verbose: bool):
        self.line, self.verbose, self.phase = line, verbose, None
        self.phases = Phases(f"tune@{line.name}")
        self.start = self.last = time.monotonic()
        n, tunable = len(line.features.layers), set(line.tunable())

        def candidates(phase: str) -> int:  # at most the options of the phase's tunable keys
            return sum(len(k.options) * (n if k.per_layer else 1) for name, k in TUNABLE_KEYS.items()
                       if k.phase == phase and name in tunable)

        matching = candidates("matching")
        self.planned = {"baseline": 1, "matching": matching, "matching (final features)": matching,
                        "features": candidates("features")}

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"tune {self.line.name}: {message}", file=sys.stderr)
        name = message.split(":")[0].rsplit(" ", 1)[0]  # keys have no spaces, pass names may
        if self.phase is None or self.phase.name != name:
            self.close()
            left = max(self.line.tune.budget_s - (time.monotonic() - self.start), 0.0)
            self.phase = self.phases.start(name, self.planned.get(name), "candidates", limit_s=left)
            self.phase.start = self.last  # its first candidate began when the previous one ended
        self.last = time.monotonic()
        self.phase.advance()

    def close(self) -> None:
        if self.phase is not None:
            self.phase.finish()
            self.phase = None
