"""One writer per product line: an exclusive, non-blocking lock held while a stage, ``run``, ``predict`` or
``update`` works on the line.

The lock is ``flock`` on ``.hetmm/locks/<line>.lock`` under the repository root, so the kernel releases it when
the holder dies (no stale lock after a kill), and a second writer (a second ``hetmm run``, or a ``dvc repro`` started
while a killed one's stage process still runs) fails at once naming the holder's pid instead of writing alongside it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hetmm.config import check_line_name
from hetmm.errors import HetmmError


class LineBusyError(HetmmError):
    """Another process holds the line's lock."""


@contextmanager
def line_lock(root: str | Path, line: str) -> Iterator[Path]:
    path = Path(root) / ".hetmm" / "locks" / f"{check_line_name(line)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LineBusyError(f"line {line!r} is being processed by another hetmm process (pid {holder}, lock "
                                f"{path}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock
