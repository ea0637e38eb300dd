"""Stage ``validate``: check the manifest and every image and mask (great-expectations suite plus file checks).

Reads ``data/<line>/``; writes ``reports/<line>/validation.{json,html}``. Fails (one line naming the bad files) when
validation does not pass; reruns whenever the data change.
"""

from __future__ import annotations

from hetmm.data.validation import validate
from hetmm.errors import DataError
from hetmm.pipeline.line import StageRun, manifest


def run(ctx: StageRun) -> dict:
    paths = ctx.paths
    html = paths.reports / "validation.html"
    result = validate(manifest(paths), paths.data, paths.reports / "validation.json", html, ctx.line.data.masks)
    if not result.success:
        # one line (the CLI prints errors as one line); the report lists every failure
        listed = "; ".join(" ".join(str(f).split()) for f in result.failures[:5])
        more = f"; ... and {len(result.failures) - 5} more" if len(result.failures) > 5 else ""
        raise DataError(f"data validation failed for line {ctx.line.name!r}: {listed}{more} (details: {html})")
    return {"success": True, "warnings": len(result.warnings), "report": str(html)}
