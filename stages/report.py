"""DVC stage `report` for one product line: `python stages/report.py <line>` (see dvc.yaml)."""

import sys

from hetmm.cli import app

if __name__ == "__main__":
    app(["report", *sys.argv[1:]])
