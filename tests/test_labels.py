"""Lines with image-level labels only, some masks, unlabelled test images, and the anomalib-style sources."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import folder_line, run_stages, write_params
from hetmm.data.sources import fetch
from hetmm.data.validation import validate
from hetmm.errors import ConfigError, DataError


def _defects(tree: Path) -> list[Path]:
    return sorted(p for p in (tree / "test").glob("*/*.png") if p.parent.name != "good")


def _drop_mask(tree: Path, image: Path) -> None:
    (tree / "ground_truth" / image.parent.name / image.name).unlink()


def _mixed_tree(src: Path) -> tuple[Path, list[str]]:
    """The demo tree with 4 defect images' masks removed and 2 good + 2 defect test images moved to
    ``test/unlabelled/`` (their masks dropped): the unmasked defect images' names are returned."""
    defects = _defects(src)
    unmasked = defects[::4]
    for image in unmasked:
        _drop_mask(src, image)
    (src / "test/unlabelled").mkdir()
    for image in [*sorted((src / "test/good").glob("*.png"))[:2], defects[1], defects[2]]:
        if image.parent.name != "good":
            _drop_mask(src, image)
        image.rename(src / "test/unlabelled" / f"{image.parent.name}_{image.name}")
    return src, [f"test/{p.parent.name}/{p.name}" for p in unmasked]


def test_some_masks_and_unlabelled_images(folder_src, tmp_path):
    tree, unmasked = _mixed_tree(folder_src)
    root = tmp_path / "run"
    params = write_params(root, {"mixed": folder_line(tree, threshold={"rule": "f1_max"})})
    run_stages(params, "mixed", root)

    df = pd.read_csv(root / "data/mixed/manifest.csv", keep_default_na=False)
    test = df[df["split"] == "test"]
    assert ((test["label"] == "unlabelled").sum() == 4
            and (test.loc[test["label"] == "unlabelled", "mask_path"] == "").all())
    assert sorted(test.loc[(test["label"] == "defect") & (test["mask_path"] == ""), "path"]) == unmasked

    metrics = json.loads((root / "reports/mixed/evaluation.json").read_text())
    n_defect = int((test["label"] == "defect").sum())
    assert (metrics["n_unlabelled"], metrics["n_unmasked_defects"]) == (4, len(unmasked))
    assert metrics["n_masked_defects"] == n_defect - len(unmasked) and metrics["n_images"] == len(test) - 4
    # image AUROC over the labelled images only (an independent implementation), pixel metrics defined
    scores = pd.read_csv(root / "outputs/mixed/scores.csv", keep_default_na=False)
    labelled = scores[scores["label"] != "unlabelled"]
    assert metrics["image_auroc"] == pytest.approx(100 * roc_auc_score(labelled["label"] == "defect",
                                                                       labelled["score"]), abs=1e-6)
    assert metrics["pixel_auroc"] is not None and metrics["aupro"] is not None
    counts = metrics["confusion"]
    assert sum(counts.values()) == len(labelled)  # the oracle threshold never saw the unlabelled images

    # the pixel metrics are those of the same line without its unmasked defect images and unlabelled images
    for rel in unmasked:
        (tree / rel).unlink()
    shutil.rmtree(tree / "test/unlabelled")
    root2 = tmp_path / "run2"
    run_stages(write_params(root2, {"mixed": folder_line(tree, threshold={"rule": "f1_max"})}), "mixed", root2)
    trimmed = json.loads((root2 / "reports/mixed/evaluation.json").read_text())
    # (float32 maps batched differently: equal to 1e-4 percentage points)
    assert trimmed["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-4)
    assert trimmed["aupro"] == pytest.approx(metrics["aupro"], abs=1e-4)

    card = json.loads((root / "reports/mixed/model_card.json").read_text())
    assert card["data"]["unlabelled"] == 4 and card["data"]["defective_with_mask"] == n_defect - len(unmasked)
    overlays = sorted(p.name for p in (root / "reports/mixed/overlays").iterdir())
    assert "unlabelled_1.png" in overlays and "unlabelled_2.png" in overlays
    assert "overlays/unlabelled_1.png" in card["overlays"]
    assert (root / "reports/mixed/scores.png").stat().st_size > 5000


def test_image_level_labels_only_and_tuning_without_masks(demo_tree, tmp_path):
    root = tmp_path / "run"
    line = folder_line(demo_tree, data={"masks": "none"}, threshold={"rule": "normal_fpr"},
                       tune={"enabled": True, "budget_s": 15, "max_validation": 3, "min_synthetic": 10})
    del line["matching"], line["post"]  # left to the tuner
    run_stages(write_params(root, {"labels": line}), "labels", root)
    df = pd.read_csv(root / "data/labels/manifest.csv", keep_default_na=False)
    assert (df["mask_path"] == "").all() and not (root / "data/labels/ground_truth").exists()
    metrics = json.loads((root / "reports/labels/evaluation.json").read_text())
    assert metrics["image_auroc"] is not None and metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["undefined"]["pixel_auroc"] == "none of the 16 defect image(s) has a mask"
    tuning = json.loads((root / "reports/labels/tuning.json").read_text())
    assert len(tuning["candidates"]) > 1  # the synthetic validation set needs no real masks


def test_required_masks_stay_an_error(folder_src, tmp_path):
    _drop_mask(folder_src, _defects(folder_src)[0])
    with pytest.raises(DataError, match=r"has no mask \(data.masks is 'required'\)"):
        fetch("folder", tmp_path / "dest", path=str(folder_src), masks="required")
    df = fetch("folder", tmp_path / "dest", path=str(folder_src))  # the default: optional
    assert ((df["label"] == "defect") & (df["mask_path"] == "")).sum() == 1
    out = tmp_path / "v"
    required = validate(df, tmp_path / "dest", out / "v.json", out / "v.html", masks="required")
    assert not required.success and any("data.masks is 'required'" in f for f in required.failures)
    assert validate(df, tmp_path / "dest", out / "v.json", out / "v.html", masks="optional").success


def _anomalib_layout(demo_tree: Path, tmp_path: Path) -> Path:
    """The demo images as anomalib's Folder layout: normal/, abnormal/<type>/, masks/<type>/<stem>_mask.png."""
    base = tmp_path / "anomalib"
    shutil.copytree(demo_tree / "train/good", base / "normal")
    shutil.copytree(demo_tree / "test/good", base / "normal_test")
    for image in _defects(demo_tree):
        kind = image.parent.name
        (base / "abnormal" / kind).mkdir(parents=True, exist_ok=True)
        (base / "masks" / kind).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, base / "abnormal" / kind / image.name)
        shutil.copyfile(demo_tree / "ground_truth" / kind / image.name,
                        base / "masks" / kind / f"{image.stem}_mask.png")
    return base


def test_anomalib_folder_source_matches_the_mvtec_layout(demo_tree, tmp_path):
    base = _anomalib_layout(demo_tree, tmp_path)
    df = fetch("anomalib_folder", tmp_path / "a", normal_dir=str(base / "normal"), abnormal_dir=str(base / "abnormal"),
               mask_dir=str(base / "masks"), normal_test_dir=str(base / "normal_test"))
    mvtec = fetch("folder", tmp_path / "m", path=str(demo_tree))
    key = ["split", "label", "defect_type", "sha256"]
    assert sorted(map(tuple, df[key].values)) == sorted(map(tuple, mvtec[key].values))
    masks = df.set_index("sha256")["mask_path"] != ""
    assert (masks == (mvtec.set_index("sha256")["mask_path"] != "").reindex(masks.index)).all()

    # without normal_test_dir a share of normal/ is held out, chosen on contents: renaming files changes nothing
    held = fetch("anomalib_folder", tmp_path / "h", normal_dir=str(base / "normal"),
                 abnormal_dir=str(base / "abnormal"), mask_dir=str(base / "masks"))
    for image in (base / "normal").iterdir():
        image.rename(image.with_name(f"x_{image.name}"))
    renamed = fetch("anomalib_folder", tmp_path / "r", normal_dir=str(base / "normal"),
                    abnormal_dir=str(base / "abnormal"), mask_dir=str(base / "masks"))
    test_goods = lambda d: sorted(d.loc[(d["split"] == "test") & (d["label"] == "good"), "sha256"])  # noqa: E731
    assert test_goods(held) == test_goods(renamed) and len(test_goods(held)) == round(0.2 * 24)
    with pytest.raises(ConfigError, match="normal_dir"):
        fetch("anomalib_folder", tmp_path / "x")
    with pytest.raises(ConfigError, match="normal_test_share"):
        fetch("anomalib_folder", tmp_path / "x", normal_dir=str(base / "normal"), normal_test_share=1.5)


def _table(demo_tree: Path, folder: Path) -> pd.DataFrame:
    """The demo images listed in a table (paths relative to the table, anomalib's column names and words)."""
    folder.mkdir(parents=True)
    rows = []
    for image in sorted(demo_tree.glob("t*/*/*.png")):
        split, kind = image.parts[-3], image.parent.name
        mask = demo_tree / "ground_truth" / kind / image.name
        rows.append({"image_path": os.path.relpath(image, folder),  # relative to the table; the masks absolute
                     "split": split, "label": "normal" if kind == "good" else "abnormal",
                     "defect_type": "" if kind == "good" else kind,
                     "mask_path": str(mask) if mask.is_file() else ""})
    return pd.DataFrame(rows)


def test_table_source_csv_and_parquet_and_bad_rows(demo_tree, tmp_path):
    rows = _table(demo_tree, tmp_path / "tables")
    csv = tmp_path / "tables/images.csv"
    rows.to_csv(csv, index=False)
    df = fetch("table", tmp_path / "c", path=str(csv))
    mvtec = fetch("folder", tmp_path / "m", path=str(demo_tree))
    key = ["split", "label", "defect_type", "sha256"]
    assert sorted(map(tuple, df[key].values)) == sorted(map(tuple, mvtec[key].values))
    parquet = tmp_path / "tables/images.parquet"
    rows.to_parquet(parquet)
    assert fetch("table", tmp_path / "p", path=str(parquet))[key].equals(df[key])

    def refused(change: dict, *words: str) -> None:
        bad = rows.copy()
        for column, value in change.items():
            bad.loc[7, column] = value
        bad.to_csv(csv, index=False)
        with pytest.raises(DataError) as info:
            fetch("table", tmp_path / "bad", path=str(csv))
        for word in (f"{csv} line 9", *words):  # row 7 is line 9 (line 1 is the header)
            assert word in str(info.value), (word, str(info.value))
        assert not (tmp_path / "bad").exists()

    refused({"split": "tset"}, "'tset'", "train or test")
    refused({"label": "maybe"}, "'maybe'")
    refused({"image_path": "../nowhere.png"}, "does not exist")
    refused({"image_path": rows["image_path"][3]}, "listed twice", "line 5")
    defect = int(np.flatnonzero(rows["label"] == "abnormal")[0])
    bad = rows.copy()
    bad.loc[defect, "mask_path"] = ""
    bad.to_csv(csv, index=False)
    with pytest.raises(DataError, match="data.masks is 'required'"):
        fetch("table", tmp_path / "bad", path=str(csv), masks="required")
    assert (fetch("table", tmp_path / "ok", path=str(csv))["mask_path"] == "").sum() > (df["mask_path"] == "").sum()
