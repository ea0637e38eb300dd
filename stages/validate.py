"""DVC stage `validate` for one product line: `python stages/validate.py <line>` (see dvc.yaml)."""

import sys

from hetmm.cli import app

if __name__ == "__main__":
    app(["validate", *sys.argv[1:]])
