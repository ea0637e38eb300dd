"""DVC stage `template` for one product line: `python stages/template.py <line>` (see dvc.yaml)."""

import sys

from hetmm.cli import app

if __name__ == "__main__":
    app(["template", *sys.argv[1:]])
