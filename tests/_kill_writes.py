"""Kill a real ``hetmm`` command between two of its writes, once for every write it makes.

``python tests/_kill_writes.py BASE WORK -- ARGS...``: the command ``hetmm ARGS`` first runs to the end in a copy
``WORK/full`` of the folder ``BASE`` while the file-system calls that commit a write (``os.replace``,
``os.rename``, ``os.unlink``) are counted; then, for each k in 1..count, in a fresh copy ``WORK/k<k>`` it is killed
with ``os._exit`` (no cleanup, no ``finally``) just before its k-th such call. Each run is a forked child of this
process, which imported the CLI once, so a kill costs a stage run and not an interpreter start. Prints
``{"count": n, "killed": [k, ...]}`` (the k whose child died as planned).

``... BASE WORK --match TEXT -- ARGS...`` runs once, in ``BASE`` itself, killed just before the first such call
whose target path contains TEXT; prints ``{"killed": true|false}``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

KILLED = 77
CALLS = ("replace", "rename", "unlink")


def _child(root: Path, args: list[str], kill_at: int, count_file: Path | None, match: str | None = None) -> None:
    from hetmm.cli import app

    real = {name: getattr(os, name) for name in CALLS}
    calls = [0]

    def hook(name):
        def call(*a, **kw):
            calls[0] += 1
            if calls[0] == kill_at or (match is not None and match in str(a[-1])):
                os._exit(KILLED)
            return real[name](*a, **kw)
        return call

    for name in CALLS:
        setattr(os, name, hook(name))
    os.chdir(root)
    try:
        app(args, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    except BaseException:  # noqa: BLE001 - the parent sees the exit status
        code = 2
    if count_file is not None:
        count_file.write_text(str(calls[0]))
    os._exit(code)


def _run(root: Path, args: list[str], kill_at: int, count_file: Path | None = None, match: str | None = None) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _child(root, args, kill_at, count_file, match)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> None:
    base, work = Path(sys.argv[1]), Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    import hetmm.cli  # imported once with the stage it runs; every child inherits them

    for module in (f"hetmm.pipeline.{args[0]}", f"hetmm.pipeline.stages.{args[0]}", "hetmm.report.console"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    with contextlib.redirect_stdout(io.StringIO()):  # and the CLI's own lazy imports
        try:
            hetmm.cli.app([args[0], "--help"], standalone_mode=False)
        except SystemExit:
            pass

    if sys.argv[3] == "--match":
        print(json.dumps({"killed": _run(base, args, 0, match=sys.argv[4]) == KILLED}))
        return

    full = Path(shutil.copytree(base, work / "full", symlinks=True))
    status = _run(full, args, 0, work / "count")
    if status != 0:
        raise SystemExit(f"the uninterrupted run failed with exit status {status}")
    count = int((work / "count").read_text())
    killed = [k for k in range(1, count + 1)
              if _run(Path(shutil.copytree(base, work / f"k{k}", symlinks=True)), args, k) == KILLED]
    print(json.dumps({"count": count, "killed": killed}))


if __name__ == "__main__":
    main()
