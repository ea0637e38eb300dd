"""Derive ``examples/mtd/dvc.yaml`` from the repository's ``dvc.yaml``, so the two pipelines never drift apart.

The MTD lines live in their own DVC project (``examples/mtd``, a ``dvc init --subdir`` repository): their images
cannot be downloaded offline, so they stay out of the default ``dvc repro`` and ``dvc exp show`` of the repository.
Their stages are the repository's stages with the code dependencies two folders up and the example's own list of
lines. After an edit of ``dvc.yaml`` run

    .venv/bin/python tools/sync_example.py           # rewrite examples/mtd/dvc.yaml
    .venv/bin/python tools/sync_example.py --check   # exit 1 when it is out of date (tests/test_fresh_clone.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetmm.pipeline.lines import _LISTS, dvc_line_methods  # noqa: E402

EXAMPLE = REPO / "examples" / "mtd"
HEADER = ("# GENERATED from ../../dvc.yaml by tools/sync_example.py: edit that file and rerun the tool. Only the\n"
          "# lists of lines below are this project's own (`hetmm line add/remove` keep them); code paths point two\n"
          "# folders up, at the repository's hetmm package.\n")


def derived(root_text: str, example_text: str | None) -> str:
    """The example's dvc.yaml: the root's stages, code dependencies two folders up, the example's lists kept."""
    text = re.sub(r"^(\s*- )hetmm/", r"\1../../hetmm/", root_text, flags=re.M)
    if example_text is not None:
        for pattern in _LISTS.values():
            own, root = pattern.search(example_text), pattern.search(text)
            text = text[:root.start()] + own.group(0) + text[root.end():]
    return HEADER + text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when examples/mtd/dvc.yaml is out of date")
    args = parser.parse_args()
    target = EXAMPLE / "dvc.yaml"
    current = target.read_text() if target.is_file() else None
    want = derived((REPO / "dvc.yaml").read_text(), current)
    if args.check:
        if want != current:
            print(f"{target.relative_to(REPO)} is out of date: run .venv/bin/python tools/sync_example.py",
                  file=sys.stderr)
            return 1
        return 0
    target.write_text(want)
    dvc_line_methods(target)  # the lists still parse
    return 0


if __name__ == "__main__":
    sys.exit(main())
