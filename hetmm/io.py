"""Atomic writes, content hashing and JSON-safe values: a crash never leaves a half-written artifact behind."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hetmm.errors import DataError

# The temporary files of atomic_path: ``.<name>.<8 random characters>.tmp``. A killed process leaves one behind;
# remove_stale_temps clears them, and .dvcignore / .gitignore keep them out of DVC outputs and commits.
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds. A write that
    fails on the file system (full disk, file-size limit, read-only folder) is a DataError naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would make reports unreadable to the rest of the team
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError naming no file
        raise _write_error(path, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write_error(path: Path, exc: BaseException) -> DataError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1][:200]
    return DataError(f"{path}: could not write it ({why}); free disk space, check the folder's permissions and the "
                     "file-size limit (ulimit -f), then rerun; the previous file is unchanged")


def remove_stale_temps(*folders: Path, recursive: bool = True) -> int:
    """Delete the temporary files killed writes left in ``folders`` (and their subfolders when ``recursive``); call
    it holding the lock of the line that owns them. Returns how many were removed."""
    removed = 0
    for folder in folders:
        for dirpath, _, names in os.walk(folder) if recursive else [(folder, None, os.listdir(folder))]:
            for name in names:  # os.walk never follows links out of the folder
                if TEMP_NAME.fullmatch(name):
                    Path(dirpath, name).unlink(missing_ok=True)
                    removed += 1
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_png_atomic(path: str | os.PathLike, image: Any) -> None:
    """Save a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars / arrays -> python, NaN / inf -> None, paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN; DVC and browsers reject it
    if isinstance(obj, Path):
        return str(obj)
    return obj


# A spreadsheet runs a cell that starts with one of these as a formula (a file named ``=1+1.jpg``, a defect type
# ``@SUM(...)``); a leading apostrophe makes it text, as OWASP's CSV-injection advice and spreadsheet users expect.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
# Characters that would move the cursor, recolour or rewrite a terminal, or reorder the text it shows.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def spreadsheet_cell(value: Any) -> Any:
    """``value`` with a formula start neutralised; numbers and other text unchanged (idempotent)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def spreadsheet_safe(df: Any) -> Any:
    """A copy of the pandas DataFrame ``df`` whose text cells are :func:`spreadsheet_cell`-safe: every CSV hetmm
    writes goes through it."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype.kind == "O":  # object and pandas' string columns; numbers stay numbers
            out[column] = out[column].map(spreadsheet_cell)
    return out


def clean_text(text: str) -> str:
    """``text`` for a terminal: control and bidirectional-override characters (from file names, git authors,
    defect types) shown as escapes instead of acting on the terminal; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
