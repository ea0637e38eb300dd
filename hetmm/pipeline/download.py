"""Stage ``download``: put the line's images under ``data/<line>/`` (MVTec layout) with ``manifest.csv``.

Reads the line's ``data`` settings; writes ``data/<line>/`` by swapping a complete copy into place
(:func:`hetmm.data.sources.fetch`), so a failed download never leaves a half-filled folder. Always reruns under DVC
(the source lies outside DVC's view); when nothing changed the copy hashes the same and no later stage runs. When
the source itself is not there (a teammate's machine without the line's ``data.path`` or mirror) the last good
copy is kept, after checking every file against its manifest, and the record says so.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from hetmm.config import DataConfig
from hetmm.data.manifest import read_manifest
from hetmm.data.sources import MIRROR_ENV, fetch
from hetmm.errors import DataError
from hetmm.io import clean_text, sha256_file
from hetmm.pipeline.line import LinePaths, StageRun


def _missing_source(d: DataConfig) -> str | None:
    """Why the source is not reachable on this machine, or None when it may be."""
    if d.source == "folder" and d.path and not Path(d.path).expanduser().is_dir():
        return f"data.path {d.path} does not exist on this machine"
    if d.source == "table" and d.path and not Path(d.path).expanduser().is_file():
        return f"data.path {d.path} does not exist on this machine"
    if d.source == "anomalib_folder" and d.normal_dir and not Path(d.normal_dir).expanduser().is_dir():
        return f"data.normal_dir {d.normal_dir} does not exist on this machine"
    mirror = d.mirror if d.mirror is not None else os.environ.get(MIRROR_ENV)
    if d.source in ("mtd", "mvtec") and mirror and not Path(mirror).expanduser().is_dir():
        return f"the mirror {mirror} does not exist on this machine"
    return None


def _intact_copy(paths: LinePaths) -> int | None:
    """Image count of ``data/<line>`` when every manifest file is there with its recorded hash, else None."""
    try:
        df = read_manifest(paths.manifest)
        ok = all(sha256_file(paths.data / rel) == sha for rel, sha in zip(df["path"], df["sha256"]))
    except (DataError, OSError):
        return None
    return len(df) if ok else None


def run(ctx: StageRun) -> dict:
    d = ctx.line.data
    start = time.perf_counter()
    if (why := _missing_source(d)) is not None:
        if (kept := _intact_copy(ctx.paths)) is None:
            raise DataError(f"{ctx.paths.data}: cannot download line {ctx.line.name!r}: {why}, and there is no "
                            "intact earlier copy; fix the path (params.yaml) or `dvc pull` the line's data")
        print(clean_text(f"warning: {why}; keeping the earlier copy in {ctx.paths.data} ({kept} images, all hashes "
                         "checked)"), file=sys.stderr)  # the path is the user's text: no terminal controls
        return {"images": kept, "kept": True, "reason": why, "seconds": round(time.perf_counter() - start, 2)}
    options = {k: v for k, v in asdict(d).items() if k != "source" and v is not None}
    df = fetch(d.source, ctx.paths.data, **options)
    return {"images": len(df), "kept": False, "seconds": round(time.perf_counter() - start, 2)}
