"""The report stage's pictures of single test images: which images get a heat-map panel, and the score groups.

``report_panels`` replaces ``reports/<line>/overlays/`` with panels (image | heat map | mask, as deployed) of the
worst labelled cases (missed defects, false alarms), the best defects and, apart from those, the most anomalous
unlabelled images: ``report.overlays`` labelled panels and as many unlabelled ones at most. Each panel's title
names its test image (manifest path and sha256), and ``reports/<line>/overlays.csv`` lists them, one row per panel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hetmm.data.images import load_image
from hetmm.data.manifest import UNLABELLED
from hetmm.io import atomic_path, spreadsheet_safe
from hetmm.pipeline import evaluation
from hetmm.pipeline.line import StageRun
from hetmm.report import overlays

OVERLAY_GROUPS = ("worst_defect", "worst_good", "best_defect")
# reports/<line>/overlays.csv, one row per panel: which test image (manifest path and sha256) each panel shows
INDEX_COLUMNS = ["panel", "group", "rank", "path", "sha256", "label", "defect_type", "score", "flagged"]


def score_groups(test: pd.DataFrame, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Image scores [n] per kind of test image (good, defect, unlabelled), kinds without images left out."""
    groups = {"good": test["label"] == "good", "defect": test["label"] == "defect",
              UNLABELLED: test["label"] == UNLABELLED}
    return {name: scores[keep.to_numpy()] for name, keep in groups.items() if keep.any()}


def report_panels(ctx: StageRun, test: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                  decision: dict, out_dir: Path | None = None) -> list[Path]:
    """Write the panels (see the module docstring) into ``out_dir`` (default ``reports/<line>/overlays``) and their
    index beside it;
    ``scores`` [M], ``maps`` / ``masks`` [M, H, W] follow ``test``'s rows. Returns the files written."""
    out_dir = out_dir or ctx.paths.reports / "overlays"
    index_path = out_dir.parent / "overlays.csv"  # beside the folder: staged with it when the report is released
    for old in out_dir.glob("*.png") if out_dir.is_dir() else []:
        old.unlink()
    count = ctx.line.report.overlays
    if count <= 0:
        with atomic_path(index_path) as tmp:
            pd.DataFrame(columns=INDEX_COLUMNS).to_csv(tmp, index=False)
        return []
    labels, label = (test["label"] == "defect").to_numpy(), test["label"].to_numpy()
    lowest_defects = [i for i in np.argsort(scores) if labels[i]]
    highest_good = [i for i in np.argsort(-scores) if label[i] == "good"]
    picks = dict(zip(OVERLAY_GROUPS, overlays.picks(count, lowest_defects, highest_good)))
    picks[UNLABELLED] = [i for i in np.argsort(-scores) if label[i] == UNLABELLED][:count]
    height, width = ctx.line.features.image_size
    flagged, pixel = scores >= decision["threshold"], decision["pixel_threshold"]
    masked = (test["mask_path"].astype(str) != "").to_numpy()
    cases = [overlays.OverlayCase(
        name=f"{group}_{rank + 1}", image=load_image(ctx.paths.data / test["path"][i]).resize((width, height)),
        amap=maps[i], mask=masks[i] if masked[i] or label[i] == "good" else None, score=None,
        pred_mask=evaluation.predicted_mask(maps[i], flagged[i], pixel),
        title=f"{group} #{rank + 1}: {test['defect_type'][i]} score {scores[i]:.3f} "
              f"{'flagged' if flagged[i] else 'passed'} (threshold {decision['threshold']:.3f})\n"
              f"{test['path'][i]}  sha256 {test['sha256'][i][:12]}")  # which part: traceable to the manifest
        for group, indices in picks.items() for rank, i in enumerate(indices)]
    vmin, vmax = overlays.anchored_scale(pixel)  # one scale for every panel, the pixel threshold in the middle
    written = overlays.save_overlays(out_dir, cases, vmin=vmin, vmax=vmax, kind="panel", bar_threshold=pixel)
    order = [(group, rank, i) for group, indices in picks.items() for rank, i in enumerate(indices)]
    index = pd.DataFrame([{"panel": f"overlays/{path.name}", "group": group, "rank": rank + 1,
                           "path": test["path"][i], "sha256": test["sha256"][i], "label": label[i],
                           "defect_type": test["defect_type"][i], "score": float(scores[i]),
                           "flagged": bool(flagged[i])} for path, (group, rank, i) in zip(written, order)],
                         columns=INDEX_COLUMNS)
    with atomic_path(index_path) as tmp:
        spreadsheet_safe(index).to_csv(tmp, index=False)
    return written
