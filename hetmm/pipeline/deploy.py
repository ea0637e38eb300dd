"""A line's deployed state changes as one unit or not at all: the report stage's files and TFA-Net's curves.

**Report** (:class:`Release`). The report stage writes every file of a new version (``threshold.json``, metrics,
curves, overlays, model card) into a staging folder ``.hetmm/release/<line>/new/`` (the same tree, relative to the
repository root), then commits it: one atomic write of the journal ``.hetmm/release/<line>/commit.json`` (the list
of files, and the folders whose other files go), then the renames into place, then the journal's removal. The
journal is the commit point. :func:`settle` (the report stage before it starts, ``hetmm predict`` before it reads
``threshold.json``) rolls a committed version forward and drops an uncommitted one, so after a kill between any two
writes a reader sees the whole previous version or the whole new one. The template or model is bound to the
threshold by its content hash (``predict`` refuses a threshold chosen for another model), so a model rebuilt since
the last report is never used with that report's threshold.

**Folders** (:func:`replace_folder`, :func:`restore_folder`): a folder written beside its target (DVCLive's curves
while TFA-Net trains) is swapped in by two renames; a kill between them is undone by :func:`restore_folder`.

Staging lives under ``.hetmm/`` (git- and DVC-ignored, beside the locks), never inside a DVC output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hetmm.errors import DataError
from hetmm.io import write_json_atomic
from hetmm.pipeline.line import LinePaths

JOURNAL = "commit.json"


class Release:
    """Stage the files of a line's next version, then :meth:`commit` them together.

    ``path(target)`` gives where to write ``target`` (a path below ``root``) now; ``folder(target)`` the same for a
    folder that the commit replaces as a whole (its files not written in this version are removed)."""

    def __init__(self, paths: LinePaths) -> None:
        self.root, self.base = _where(paths)
        self.new = self.base / "new"
        self.folders: list[str] = []
        settle(paths)
        self.new.mkdir(parents=True)

    def _rel(self, target: Path) -> str:
        return Path(target).relative_to(self.root).as_posix()  # LinePaths are built on the same root

    def path(self, target: Path) -> Path:
        out = self.new / self._rel(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def folder(self, target: Path) -> Path:
        self.folders.append(self._rel(target))
        out = self.new / self.folders[-1]
        out.mkdir(parents=True, exist_ok=True)
        return out

    def commit(self) -> list[str]:
        """Put every staged file in place as one unit; returns the files (relative to the root). What could stop a
        rename (a file where a folder belongs, a read-only folder) is refused before the commit point."""
        files = sorted(p.relative_to(self.new).as_posix() for p in self.new.rglob("*") if p.is_file())
        for rel in files:
            target = self.root / rel
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise DataError(f"{target.parent}: a file is in the way of the report's folder; move it away and "
                                "rerun the report stage (nothing was replaced)") from None
            if target.is_dir() or not os.access(target.parent, os.W_OK):
                raise DataError(f"{target}: {'a folder is' if target.is_dir() else 'its folder is read-only,'} in the "
                                "way of the report's file; fix it and rerun the report stage (nothing was replaced)")
        write_json_atomic(self.base / JOURNAL, {"files": files, "folders": self.folders})
        _apply(self.root, self.base)
        return files


def _where(paths: LinePaths) -> tuple[Path, Path]:
    root = paths.models.parent.parent
    return root, root / ".hetmm" / "release" / paths.models.name


def settle(paths: LinePaths, drop: bool = True) -> bool:
    """Finish a committed version (True) and, with ``drop``, remove an uncommitted one (the report stage, holding
    the line's lock; a reader passes ``drop=False``)."""
    root, base = _where(paths)
    committed = (base / JOURNAL).is_file()
    if committed:
        _apply(root, base)
    if drop:
        shutil.rmtree(base, ignore_errors=True)
    return committed


def _apply(root: Path, base: Path) -> None:
    """The renames of a committed version; idempotent, so a kill in the middle is finished by the next call."""
    try:
        journal = json.loads((base / JOURNAL).read_text())
        files, folders = list(journal["files"]), list(journal["folders"])
        if any(Path(rel).is_absolute() or ".." in Path(rel).parts for rel in files + folders):
            raise ValueError("a path outside the repository")  # it renames and deletes: never outside the root
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{base / JOURNAL}: unreadable release journal ({exc}); delete {base} and rerun the "
                        "report stage") from None
    for rel in files:
        staged, target = base / "new" / rel, root / rel
        if staged.is_file():
            try:
                os.replace(staged, target)
            except OSError as exc:  # the journal stays: the next report or predict finishes the version
                raise DataError(f"{target}: cannot put the new report in place ({exc.strerror}); fix it and rerun "
                                "the report stage or `hetmm predict` to finish it") from None
    keep = set(files)
    for rel in folders:
        for old in sorted((root / rel).glob("*")):
            if old.is_file() and f"{rel}/{old.name}" not in keep:
                old.unlink()
    (base / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(base / "new", ignore_errors=True)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def staging_folder(target: Path) -> Path:
    """An empty folder beside ``target`` to build its next version in (a leftover of a killed run is dropped)."""
    restore_folder(target)
    staged = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def replace_folder(staged: Path, target: Path) -> None:
    """Swap ``staged`` in for ``target`` (two renames; :func:`restore_folder` undoes a kill between them)."""
    old = _old(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_folder(target: Path) -> None:
    """Put back the previous ``target`` when a swap was killed after moving it aside."""
    old = _old(target)
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)
