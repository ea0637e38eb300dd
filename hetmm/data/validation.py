"""Validate stage, library side: one great-expectations suite over the manifest plus image checks.

:func:`validate` never raises on bad data: it returns ``success=False`` with ``failures`` naming
each offending file, and always writes a JSON result and a self-contained HTML report.
great-expectations is imported inside :func:`validate` only (its import costs seconds).
"""

from __future__ import annotations

import html
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from hetmm.data.images import MASK_THRESHOLD, MAX_SIDE, MIN_SIDE, SUPPORTED_MODES, load_image, read_mask_levels
from hetmm.data.manifest import LABELS, MANIFEST_COLUMNS, MaskPolicy, manifest_hash
from hetmm.errors import DataError
from hetmm.io import sha256_file, write_json_atomic, write_text_atomic

NONBINARY_MAX_FRACTION = 0.05  # more in-between grey than this: a soft map or a JPEG, not a label mask
MAX_LISTED = 10  # offending files named per failure message


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    failures: list[str]
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _FileChecks:
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    empty_masks: list[str] = field(default_factory=list)
    nonbinary: dict[str, float] = field(default_factory=dict)  # mask path -> fraction of pixels in 1..254
    masks_checked: int = 0


# ----------------------------------------------------------------------------- great-expectations


def _expectations(masks: MaskPolicy) -> list[Any]:
    """The manifest suite for the line's mask policy; each expectation's ``meta['description']`` is used in
    failure messages."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def described(expectation: type, description: str, **kwargs: Any) -> Any:
        return expectation(meta={"description": description}, **kwargs)

    suite = [
        described(gxe.ExpectColumnValuesToNotBeNull, f"{column} is missing", column=column)
        for column in MANIFEST_COLUMNS if column != "mask_path"
    ]
    return suite + [
        described(gxe.ExpectColumnValuesToBeUnique, "the same path is listed twice", column="path"),
        described(gxe.ExpectColumnValuesToBeUnique,
                  "duplicate images (identical sha256, e.g. one image in both train and test)", column="sha256"),
        described(gxe.ExpectColumnValuesToBeInSet, "split is not train/test",
                  column="split", value_set=["train", "test"]),
        described(gxe.ExpectColumnValuesToBeInSet, f"label is not {'/'.join(LABELS)}",
                  column="label", value_set=list(LABELS)),
        described(gxe.ExpectColumnValuesToBeInSet, "subset is not dev/holdout/all",
                  column="subset", value_set=["dev", "holdout", "all"]),
        described(gxe.ExpectColumnValuesToBeInSet, "training image that is not good (templates must be defect-free)",
                  column="label", value_set=["good"], row_condition=Column("split") == "train"),
        described(gxe.ExpectColumnValuesToBeInSet, "defect_type 'good' with a defect label",
                  column="label", value_set=["good"], row_condition=Column("defect_type") == "good"),
        described(gxe.ExpectColumnValuesToNotBeInSet, "defect image filed under defect_type 'good'",
                  column="defect_type", value_set=["good"], row_condition=Column("label") == "defect"),
        described(gxe.ExpectColumnValueLengthsToBeBetween, "mask listed for an image without a defect label",
                  column="mask_path", max_value=0, row_condition=Column("label") != "defect"),
        *{"required": [described(gxe.ExpectColumnValueLengthsToBeBetween,
                                 "defect image without a mask (data.masks is 'required')",
                                 column="mask_path", min_value=1, row_condition=Column("label") == "defect")],
          "none": [described(gxe.ExpectColumnValueLengthsToBeBetween, "mask listed although data.masks is 'none'",
                             column="mask_path", max_value=0)],
          "optional": []}[masks],
        described(gxe.ExpectColumnValuesToBeBetween, f"width outside {MIN_SIDE}..{MAX_SIDE} px",
                  column="width", min_value=MIN_SIDE, max_value=MAX_SIDE),
        described(gxe.ExpectColumnValuesToBeBetween, f"height outside {MIN_SIDE}..{MAX_SIDE} px",
                  column="height", min_value=MIN_SIDE, max_value=MAX_SIDE),
        described(gxe.ExpectColumnValuesToBeInSet, "unsupported pixel mode",
                  column="mode", value_set=sorted(SUPPORTED_MODES)),
        described(gxe.ExpectColumnValuesToMatchRegex, "sha256 is not 64 lower-case hex digits",
                  column="sha256", regex=r"^[0-9a-f]{64}$"),
    ]


def _run_suite(df: pd.DataFrame, masks: MaskPolicy) -> Any:
    with warnings.catch_warnings():  # GX 1.24 imports deprecated stdlib modules (sre_constants)
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")  # in memory; no Data Docs are built, nothing left in /tmp
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (context.data_sources.add_pandas("manifest")
                        .add_dataframe_asset("images").add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(gx.ExpectationSuite(name="manifest", expectations=_expectations(masks)))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
    # SUMMARY keeps the result small; the index column makes GX name the offending paths.
    return batch.validate(suite, result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["path"]})


def _listed(paths: list[str], total: int) -> str:
    more = total - min(len(paths), MAX_LISTED)
    return ", ".join(paths[:MAX_LISTED]) + (f" (+{more} more)" if more > 0 else "")


def _paths(result: dict[str, Any]) -> list[str]:
    """The offending rows' paths that GX lists (at most 20 with SUMMARY)."""
    rows = result.get("partial_unexpected_index_list") or []
    return [row["path"] if isinstance(row["path"], str) else "<row without path>" for row in rows]


def _exception_message(info: dict[str, Any]) -> str | None:
    """GX reports an expectation's error flat, or nested per metric; return the first message."""
    entries = [info] + [value for value in info.values() if isinstance(value, dict)]
    return next((e.get("exception_message") or "error" for e in entries if e.get("raised_exception")), None)


def _suite_failures(result: Any) -> list[str]:
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        description = config.meta.get("description", config.type)
        error = _exception_message(item.exception_info or {})
        if error is not None:
            failures.append(f"manifest: could not check '{description}' [{config.kwargs.get('column')}]: {error}")
            continue
        paths = _paths(item.result)
        count = int(item.result.get("unexpected_count") or len(paths))
        failures.append(f"manifest: {description} [{config.kwargs.get('column')}]: {_listed(paths, count)}")
    return failures


# ----------------------------------------------------------------------------- image checks


def _unsafe(path: str) -> bool:
    posix = PurePosixPath(path)
    return posix.is_absolute() or ".." in posix.parts


def _check_mask(mask_rel: str, image_file: Path, root: Path, size: tuple[int, int], checks: _FileChecks) -> None:
    mask_file = root / mask_rel
    try:
        levels = read_mask_levels(mask_file)
    except DataError as exc:
        checks.failures.append(str(exc))
        return
    checks.masks_checked += 1
    if (levels.shape[1], levels.shape[0]) != size:
        checks.failures.append(
            f"{mask_file}: mask is {levels.shape[1]}x{levels.shape[0]} but its image {image_file} "
            f"is {size[0]}x{size[1]}; re-export the mask at the image size"
        )
        return
    if levels.max() == 1:  # a 0/1 label image: thresholded at > 127 it would be silently empty
        checks.failures.append(f"{mask_file}: mask holds only the levels 0 and 1 (a label image); "
                               "save defect pixels as 255 (white), e.g. multiply the mask by 255")
        return
    fraction = float(np.mean((levels > 0) & (levels < 255)))
    if fraction > 0:
        checks.nonbinary[mask_rel] = round(fraction, 6)
    if fraction > NONBINARY_MAX_FRACTION:
        checks.failures.append(
            f"{mask_file}: mask is not binary ({fraction:.1%} of pixels are neither 0 nor 255); "
            "save it as a lossless 0/255 PNG"
        )
    elif not (levels > MASK_THRESHOLD).any():
        checks.empty_masks.append(mask_rel)
        checks.warnings.append(f"{mask_file}: defect mask is empty (no pixel > {MASK_THRESHOLD}); "
                               "the image counts for image-level metrics only")


def _check_row(row: Any, root: Path, checks: _FileChecks) -> None:
    # Missing (null) paths are reported by the suite; here only strings are opened.
    path = row.path if isinstance(row.path, str) else ""
    mask_rel = row.mask_path if isinstance(row.mask_path, str) else ""
    if not path:
        return
    for rel in (path, mask_rel):
        if rel and _unsafe(rel):
            checks.failures.append(f"manifest: {rel!r} is not a path inside the dataset folder")
            return
    image_file = root / path
    try:
        size = load_image(image_file).size  # full decode: catches truncated and corrupt data
    except DataError as exc:
        checks.failures.append(str(exc))
        return
    if size != (row.width, row.height):
        checks.failures.append(f"{image_file}: manifest says {row.width}x{row.height} but the file is "
                               f"{size[0]}x{size[1]}; run the download stage again")
    if sha256_file(image_file) != row.sha256:
        checks.failures.append(f"{image_file}: content differs from the manifest (sha256); "
                               "run the download stage again")
    if row.label == "defect" and mask_rel:
        _check_mask(mask_rel, image_file, root, size, checks)


def _check_files(df: pd.DataFrame, root: Path) -> _FileChecks:
    checks = _FileChecks()
    for row in df.itertuples(index=False):
        _check_row(row, root, checks)
    if checks.nonbinary:
        worst = max(checks.nonbinary, key=checks.nonbinary.__getitem__)
        checks.warnings.append(
            f"{len(checks.nonbinary)} mask(s) have in-between grey levels (anti-aliased edges), "
            f"thresholded at > {MASK_THRESHOLD}; most: {root / worst} ({checks.nonbinary[worst]:.2%} of pixels)"
        )
    return checks


# ----------------------------------------------------------------------------- report


def _range(values: pd.Series) -> list[int]:
    """``[min, max]`` of the numeric values (a broken manifest may hold text); ``[]`` if none."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return [int(numbers.min()), int(numbers.max())] if len(numbers) else []


def _stats(df: pd.DataFrame, checks: _FileChecks, suite_result: Any) -> dict[str, Any]:
    counts = Counter(f"{split}/{kind}" for split, kind in zip(df["split"], df["defect_type"]))
    return {
        "n_images": len(df),
        "counts": dict(sorted(counts.items())),
        "width": _range(df["width"]),
        "height": _range(df["height"]),
        "modes": dict(Counter(map(str, df["mode"]))),
        "manifest_hash": manifest_hash(df),
        "labels": dict(sorted(Counter(f"{split}/{label}" for split, label in zip(df["split"], df["label"])).items())),
        "masks": {
            "defect_images_with_mask": int(((df["label"] == "defect") & (df["mask_path"] != "")).sum()),
            "defect_images_without_mask": int(((df["label"] == "defect") & (df["mask_path"] == "")).sum()),
            "checked": checks.masks_checked,
            "empty": checks.empty_masks,
            "nonbinary_fraction": checks.nonbinary,
            "max_nonbinary_fraction": max(checks.nonbinary.values(), default=0.0),
        },
        "expectations": dict(suite_result.statistics) if suite_result is not None else {},
    }


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
h1 .ok{color:#1a7f37}h1 .bad{color:#c62828}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
li{margin:.2em 0;font-family:ui-monospace,monospace;font-size:13px}.fail{color:#c62828}.pass{color:#1a7f37}"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _items(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>" if lines else "<p>None.</p>"


def _expectation_rows(suite_result: Any) -> list[list[str]]:
    rows = []
    for item in suite_result.results if suite_result is not None else []:
        config = item.expectation_config
        paths = _paths(item.result)
        verdict = '<span class="pass">pass</span>' if item.success else '<span class="fail">FAIL</span>'
        rows.append([html.escape(config.meta.get("description", config.type)), html.escape(config.type),
                     html.escape(str(config.kwargs.get("column", ""))), verdict,
                     str(item.result.get("unexpected_count", "")), html.escape(_listed(paths, len(paths)))])
    return rows


def render_html(result: ValidationResult, root: Path, suite_result: Any) -> str:
    """Self-contained report (inline CSS, no scripts, nothing fetched)."""
    status = '<span class="ok">PASSED</span>' if result.success else '<span class="bad">FAILED</span>'
    stats = result.stats
    masks = stats.get("masks", {})
    summary = [
        ["dataset folder", html.escape(str(root))],
        ["images", str(stats.get("n_images", ""))],
        ["width / height range (px)", html.escape(f"{stats.get('width')} / {stats.get('height')}")],
        ["pixel modes", html.escape(str(stats.get("modes", {})))],
        ["masks checked / empty", f"{masks.get('checked', 0)} / {len(masks.get('empty', []))}"],
        ["largest non-binary mask fraction", f"{masks.get('max_nonbinary_fraction', 0.0):.4%}"],
        ["manifest hash", html.escape(str(stats.get("manifest_hash", "")))],
        ["seconds", f"{stats.get('seconds', 0.0):.2f}"],
    ]
    counts = [[html.escape(k), str(v)] for k, v in stats.get("counts", {}).items()]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hetmm data validation</title><style>{_CSS}</style></head>
<body><h1>Data validation: {status}</h1>
{_table(["item", "value"], summary)}
<h2>Failures ({len(result.failures)})</h2>{_items(result.failures)}
<h2>Warnings ({len(result.warnings)})</h2>{_items(result.warnings)}
<h2>Images per split / type</h2>{_table(["split/type", "images"], counts)}
<h2>Manifest expectations (great-expectations)</h2>
{_table(["check", "expectation", "column", "result", "rows", "paths"], _expectation_rows(suite_result))}
</body></html>
"""


# ----------------------------------------------------------------------------- entry point

_VOLATILE = {"ge_load_time", "id"}  # great-expectations' per-run time stamp and random expectation ids


def _stable(obj: Any) -> Any:
    """The suite result without what changes from run to run on the same data."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj



def validate(
    manifest_df: pd.DataFrame, root: str | Path, out_json: str | Path, out_html: str | Path,
    masks: MaskPolicy = "optional",
) -> ValidationResult:
    """Check the manifest (great-expectations) and every image and mask under ``root``.

    Failures (named files): manifest rule violations, duplicates, undecodable or changed images,
    unreadable masks, masks of the wrong size, not binary or 0/1 label images. Warnings: empty defect masks and
    anti-aliased masks. Writes ``out_json`` (GX result dict plus ours) and ``out_html``.
    """
    started = time.perf_counter()
    root = Path(root)
    df = manifest_df.reset_index(drop=True)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    suite_result = None
    checks = _FileChecks()
    if missing:
        failures = [f"manifest: missing columns {missing}; run the download stage again"]
    elif not root.is_dir():
        failures = [f"{root}: dataset folder not found; run the download stage first"]
    else:
        suite_result = _run_suite(df, masks)
        checks = _check_files(df, root)
        failures = _suite_failures(suite_result) + checks.failures
    stats = _stats(df, checks, suite_result) if not missing else {}
    stats["seconds"] = round(time.perf_counter() - started, 3)
    result = ValidationResult(success=not failures, failures=failures, warnings=checks.warnings, stats=stats)
    # the JSON is a dependency of later stages: only what the data determine goes in (the time is in the HTML)
    write_json_atomic(out_json, {
        "success": result.success, "failures": result.failures, "warnings": result.warnings,
        "stats": {k: v for k, v in stats.items() if k != "seconds"},
        "great_expectations": _stable(suite_result.to_json_dict()) if suite_result is not None else None,
    })
    write_text_atomic(out_html, render_html(result, root, suite_result))
    return result
