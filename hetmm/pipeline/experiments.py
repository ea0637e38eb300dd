"""``hetmm exp run``: ``dvc exp run`` that leaves the params files as they were when the experiment fails.

DVC writes the ``-S`` values into ``params.yaml`` before the first stage runs and leaves them there when a stage
fails, so a failed trial would stay in the workspace and be committed with the next change. Here the files are read
before DVC starts and written back, byte for byte, when ``dvc exp run`` exits non-zero (a successful run keeps
DVC's result). The arguments go to DVC as a list, never through a shell.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from hetmm.errors import HetmmError
from hetmm.io import atomic_path


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")  # the dvc of this environment first
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if found is None:
        raise HetmmError("dvc is not installed in this environment: `make setup` installs it")
    return found


def run_experiment(dvc_args: list[str], params_files: tuple[Path, ...] = (Path("params.yaml"),)) -> tuple[int, list]:
    """Run ``dvc exp run <dvc_args>``; returns its exit code and the files restored after a failure."""
    before = {path: path.read_bytes() for path in params_files if path.is_file()}
    code = subprocess.run([_dvc(), "exp", "run", *dvc_args]).returncode
    restored = []
    if code != 0:
        for path, content in before.items():
            if not path.is_file() or path.read_bytes() != content:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(content)
                restored.append(path)
    return code, restored
