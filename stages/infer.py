"""DVC stage `infer` for one product line: `python stages/infer.py <line>` (see dvc.yaml)."""

import sys

from hetmm.cli import app

if __name__ == "__main__":
    app(["infer", *sys.argv[1:]])
