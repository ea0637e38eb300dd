"""Progress of a long stage as plain lines on stderr, readable in `dvc repro`'s output and in CI logs.

``Phases(label)`` reports named phases: a line when a phase starts (with its item count when known), one after its
first item (with the ETA that item's time gives), then at most one per ``interval`` seconds (5 on a terminal, 30
otherwise, so a log is never flooded), and one when it ends. ``Phases(None)`` is silent.

    phases = Phases("tune@demo")
    with phases.phase("matching", total=40, unit="candidates") as phase:
        for ... :
            phase.advance()
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Phase:
    def __init__(self, owner: Phases, name: str, total: int | None, unit: str, limit_s: float | None):
        self.owner, self.name, self.total, self.unit, self.limit_s = owner, name, total, unit, limit_s
        self.done = 0
        self.start = self.last = owner.clock()

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"

    def eta(self) -> float | None:
        """Seconds left at the rate so far (capped by ``limit_s``, a time budget); None before the first item."""
        if not self.done or not self.total:
            return None
        elapsed = self.owner.clock() - self.start
        left = elapsed / self.done * max(self.total - self.done, 0)
        if self.limit_s is not None:
            left = min(left, max(self.limit_s - elapsed, 0.0))
        return left

    def finish(self) -> None:
        self.owner.say(f"{self.name}: done, {self._count()} in {_duration(self.owner.clock() - self.start)}")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.owner.clock()
        if self.total is not None and self.done >= self.total:
            return  # the finish line follows
        if self.done == n or now - self.last >= self.owner.interval:
            self.last = now
            eta = self.eta()
            self.owner.say(f"{self.name}: {self._count()}, {_duration(now - self.start)}"
                           + (f", ETA {_duration(eta)}" if eta is not None else ""))


class Phases:
    def __init__(self, label: str | None, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.stream, self.clock = label, stream or sys.stderr, clock
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval if interval is not None else (5.0 if tty else 30.0)

    def say(self, message: str) -> None:
        if self.label is not None:
            print(f"{self.label}: {message}", file=self.stream, flush=True)

    def start(self, name: str, total: int | None = None, unit: str = "images",
              limit_s: float | None = None) -> Phase:
        """Begin one phase; ``total``: items expected (an upper bound is fine), ``limit_s``: a time budget. End it
        with :meth:`Phase.finish`."""
        self.say(f"{name}: started" + (f", {total} {unit}" if total else ""))
        return Phase(self, name, total, unit, limit_s)

    @contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "images",
              limit_s: float | None = None) -> Iterator[Phase]:
        """:meth:`start` ... :meth:`Phase.finish` around a block."""
        phase = self.start(name, total, unit, limit_s)
        yield phase
        phase.finish()
