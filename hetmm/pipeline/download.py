"""Stage ``download``: put the line's images under ``data/<line>/`` (MVTec layout) with ``manifest.csv``.

Reads the line's ``data`` settings; writes ``data/<line>/`` by swapping a complete copy into place
(:func:`hetmm.data.sources.fetch`). Always reruns under DVC (the source lies outside DVC's view); when nothing
changed the copy hashes the same and no later stage runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from hetmm.data.sources import fetch
from hetmm.pipeline.line import StageRun


def run(ctx: StageRun) -> dict:
    d = ctx.line.data
    options = {k: v for k, v in asdict(d).items() if k != "source" and v is not None}
    start = time.perf_counter()
    df = fetch(d.source, ctx.paths.data, **options)
    return {"images": len(df), "seconds": round(time.perf_counter() - start, 2)}
