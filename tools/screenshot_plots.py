"""Screenshot of the `dvc plots show` page, taken with headless Chromium, for people to look at without a browser.

Renders the workspace's plots (ROC/PRO curves per line, the curve PNGs and the overlay panels) with the repository's
offline vega template into a temporary folder and writes ``docs/screenshots/plots.png``. Needs Debian's
``chromium`` (``apt-get install chromium``) and a reproduced pipeline.

    .venv/bin/python tools/screenshot_plots.py [--out docs/screenshots/plots.png] [--height 6000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" / "plots.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    dvc = Path(sys.executable).with_name("dvc")
    with tempfile.TemporaryDirectory(prefix="plots-") as tmp:
        subprocess.run([str(dvc) if dvc.is_file() else "dvc", "plots", "show", "-o", tmp], cwd=REPO, check=True,
                       capture_output=True, text=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # --virtual-time-budget lets vega finish drawing before the shot
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.width},{args.height}", "--virtual-time-budget=10000",
                        f"--screenshot={args.out}", (Path(tmp) / "index.html").as_uri()],
                       check=True, capture_output=True, text=True, timeout=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
