"""DVC stage `extract` for one product line: `python stages/extract.py <line>` (see dvc.yaml)."""

import sys

from hetmm.cli import app

if __name__ == "__main__":
    app(["extract", *sys.argv[1:]])
