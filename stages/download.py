"""DVC stage `download` for one product line: `python stages/download.py <line>` (see dvc.yaml)."""

import sys

from hetmm.cli import app

if __name__ == "__main__":
    app(["download", *sys.argv[1:]])
