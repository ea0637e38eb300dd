"""Stage ``download``: put the line's images under ``data/<line>/`` (MVTec layout) with ``manifest.csv``.

Reads the line's ``data`` settings; writes ``data/<line>/`` by swapping a complete copy into place
(:func:`hetmm.data.sources.fetch`), so a failed download never leaves a half-filled folder. Always reruns under DVC
(the source lies outside DVC's view); when nothing changed the copy hashes the same and no later stage runs. When
the source itself is not there (a mistyped ``data.path``, or a teammate's machine without it) the stage fails naming
both, unless ``HETMM_KEEP_COPY=1`` asks to go on with the last good copy (every file checked against its manifest).
``data/<line>/source.json`` records the source the copy was really made from; the model card reports it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from hetmm.data.manifest import read_manifest, read_source_record, write_source_record
from hetmm.data.sources import fetch, missing_input
from hetmm.errors import DataError
from hetmm.io import clean_text, sha256_file
from hetmm.pipeline.line import LinePaths, StageRun

KEEP_COPY_ENV = "HETMM_KEEP_COPY"  # =1: a missing source keeps the last good copy (a teammate's machine)


def _intact_copy(paths: LinePaths) -> int | None:
    """Image count of ``data/<line>`` when every manifest file is there with its recorded hash, else None."""
    try:
        df = read_manifest(paths.manifest)
        ok = all(sha256_file(paths.data / rel) == sha for rel, sha in zip(df["path"], df["sha256"]))
    except (DataError, OSError):
        return None
    return len(df) if ok else None


def _origin(record: dict | None) -> str:
    if record is None:
        return "an earlier download (its source was not recorded)"
    where = record.get("path") or record.get("normal_dir") or record.get("mirror") or record.get("category")
    return f"source {record['source']}" + (f" {where}" if where else "")


def run(ctx: StageRun) -> dict:
    d = ctx.line.data
    start = time.perf_counter()
    if (why := missing_input(d.source, asdict(d))) is not None:
        if (kept := _intact_copy(ctx.paths)) is None:
            raise DataError(f"{ctx.paths.data}: cannot download line {ctx.line.name!r}: {why}, and there is no "
                            "intact earlier copy; fix the path (params.yaml) or `dvc pull` the line's data")
        origin = _origin(read_source_record(ctx.paths.data))
        if os.environ.get(KEEP_COPY_ENV) != "1":  # a typo must not pass silently as "the source moved"
            raise DataError(f"product_lines.{ctx.line.name}.data: {why}; {ctx.paths.data} still holds {kept} images "
                            f"from {origin}. Fix the path in params.yaml, or go on with that copy: "
                            f"{KEEP_COPY_ENV}=1 dvc repro (or {KEEP_COPY_ENV}=1 hetmm download {ctx.line.name})")
        print(clean_text(f"warning: {why}; keeping the earlier copy in {ctx.paths.data} ({kept} images from "
                         f"{origin}, all hashes checked; {KEEP_COPY_ENV}=1)"),
              file=sys.stderr)  # user text: no controls
        return {"images": kept, "kept": True, "reason": why, "from": origin,
                "seconds": round(time.perf_counter() - start, 2)}
    options = {k: v for k, v in asdict(d).items() if k != "source" and v is not None}
    df = fetch(d.source, ctx.paths.data, **options)
    for key in ("path", "normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "unlabelled_dir", "mirror"):
        if options.get(key):  # where the images really were, whatever the working directory
            options[key] = str(Path(options[key]).expanduser().resolve())
    write_source_record(ctx.paths.data, d.source, options)
    return {"images": len(df), "kept": False, "seconds": round(time.perf_counter() - start, 2)}
