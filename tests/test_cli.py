"""The ``hetmm`` command line: one-line errors, predict, update and audit on a real demo-line run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import DEMO_LINE, REPO, SUBPROCESS_ENV, copy_run, folder_line, write_params
from hetmm.cli import app
from hetmm.core.templates import load_template
from hetmm.pipeline.stages import STAGES
from hetmm.report.audit import audit_history

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def at(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--root", str(root)]


def assert_one_line_error(result, *names: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_help_in_a_real_subprocess_lists_the_commands_without_loading_torch():
    exe = Path(sys.executable).with_name("hetmm")
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hetmm.cli"]
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode == 0, proc.stderr
    for name in (*STAGES, "run", "predict", "update", "audit"):
        assert name in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, hetmm.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False"  # heavy imports happen inside the commands


def test_version_and_short_help_follow_click_conventions():
    from hetmm import __version__

    version = invoke("--version")
    assert version.exit_code == 0 and version.output.strip() == f"hetmm {__version__}"
    for args in (("-h",), ("tune", "-h"), ("line", "add", "-h"), ("audit", "-h")):
        result = invoke(*args)
        assert result.exit_code == 0 and "Usage:" in result.output and "--help" in result.output, args


# --------------------------------------------------------------------------- errors: one line, exit 1


def test_missing_params_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(invoke("download", "demo", "--params", missing), str(missing))


def test_unknown_line(tmp_path):
    write_params(tmp_path, {"demo": DEMO_LINE})
    assert_one_line_error(invoke("extract", "bolts", *at(tmp_path)), "'bolts'")


def test_unknown_param_key(tmp_path):
    write_params(tmp_path, {"demo": DEMO_LINE})
    text = (tmp_path / "params.yaml").read_text().replace("blur_sigma:", "blur_sigmaa:")
    (tmp_path / "params.yaml").write_text(text)
    assert_one_line_error(invoke("template", "demo", *at(tmp_path)), "product_lines.demo.post", "blur_sigmaa")


def test_bad_param_value(tmp_path):
    write_params(tmp_path, {"demo": DEMO_LINE})
    text = (tmp_path / "params.yaml").read_text().replace("kind: PTS", "kind: SOME")
    (tmp_path / "params.yaml").write_text(text)
    assert_one_line_error(invoke("template", "demo", *at(tmp_path)), "product_lines.demo.templates.kind")


def test_validate_names_the_corrupt_image(demo_tree, tmp_path):
    src = Path(shutil.copytree(demo_tree, tmp_path / "src"))
    victim = src / "test" / "good" / "003.png"
    victim.write_bytes(victim.read_bytes()[:300])
    write_params(tmp_path, {"line": folder_line(src)})
    assert invoke("download", "line", *at(tmp_path)).exit_code == 0
    line = assert_one_line_error(invoke("validate", "line", *at(tmp_path)), "test/good/003.png", "validation.html")
    assert "truncated" in line or "corrupt" in line


def test_download_names_the_empty_image(demo_tree, tmp_path):
    src = Path(shutil.copytree(demo_tree, tmp_path / "src"))
    (src / "train" / "good" / "000.png").write_bytes(b"")
    write_params(tmp_path, {"line": folder_line(src)})
    assert_one_line_error(invoke("download", "line", *at(tmp_path)), "train/good/000.png", "empty")


def test_download_error_names_the_users_file_not_the_staging_copy(demo_tree, tmp_path):
    src = Path(shutil.copytree(demo_tree, tmp_path / "src"))
    (src / "train" / "good" / "000.png").write_bytes(b"")
    write_params(tmp_path, {"line": folder_line(src)})
    assert_one_line_error(invoke("download", "line", *at(tmp_path)), str(src / "train" / "good" / "000.png"))


def test_stages_out_of_order_name_what_is_missing(tmp_path):
    write_params(tmp_path, {"demo": DEMO_LINE})
    assert_one_line_error(invoke("extract", "demo", *at(tmp_path), "-q"), "manifest")
    assert_one_line_error(invoke("report", "demo", *at(tmp_path), "-q"), "outputs/demo", "infer")
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    assert_one_line_error(invoke("predict", "demo", image, "--out", tmp_path / "p", *at(tmp_path)),
                          "models/demo/template.pt")
    assert_one_line_error(invoke("predict", "demo", image, "--threshold", "0.5", "--out", tmp_path / "p",
                                 *at(tmp_path)), "models/demo/template.pt")
    assert_one_line_error(invoke("update", "demo", image, *at(tmp_path)), "models/demo/template.pt")


def test_predict_and_update_name_missing_or_bad_inputs(demo_run, tmp_path):
    missing = tmp_path / "no_such_image.png"
    assert_one_line_error(invoke("predict", "demo", missing, "--out", tmp_path / "p", *at(demo_run)), str(missing))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert_one_line_error(invoke("update", "demo", empty, *at(demo_run)), str(empty))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    assert_one_line_error(invoke("predict", "demo", broken, "--out", tmp_path / "p", *at(demo_run), "-q"), str(broken))
    assert not (tmp_path / "p" / "predictions.csv").exists()


def test_audit_outside_git_names_the_folder(tmp_path):
    assert_one_line_error(invoke("audit", "--root", tmp_path), str(tmp_path), "git")


# --------------------------------------------------------------------------- predict


def test_predict_folder_writes_consistent_predictions_masks_and_overlays(demo_run, tmp_path):
    images = demo_run / "data" / "demo" / "test"
    out = tmp_path / "pred"
    result = invoke("predict", "demo", images, "--out", out, *at(demo_run), "-q")
    assert result.exit_code == 0, result.output
    threshold = json.loads((demo_run / "models/demo/threshold.json").read_text())
    summary = json.loads((out / "predictions.json").read_text())
    table = pd.read_csv(out / "predictions.csv")
    assert summary["images"] == len(table) == 26 and len(summary["predictions"]) == 26
    assert summary["threshold"] == threshold["threshold"]
    assert summary["pixel_threshold"] == threshold["pixel_threshold"] and summary["threshold_rule"] == "f1_max"
    assert summary["model_hash"] == load_template(demo_run / "models/demo/template.pt").meta["content_hash"]
    assert len(list((out / "masks").glob("*.png"))) == 26 and len(list((out / "overlays").glob("*.png"))) == 26

    # verdicts follow the threshold, and match the infer stage's scores of the same files
    assert (table["defective"] == (table["score"] >= threshold["threshold"])).all()
    # the p-value falls as the score rises: the share of calibration normals scoring at least as high (+1)
    n = threshold["calibration"]["n"]
    assert summary["calibration_normals"] == n == 24 and table["p_value"].between(1 / (n + 1), 1).all()
    ordered = table.sort_values("score")
    assert (np.diff(ordered["p_value"].to_numpy()) <= 0).all()
    assert summary["defective"] == int(table["defective"].sum())
    confusion = threshold["confusion"]
    assert summary["defective"] == confusion["true_positive"] + confusion["false_positive"]
    staged = pd.read_csv(demo_run / "outputs/demo/scores.csv", keep_default_na=False)
    staged_by_path = dict(zip(staged["path"], staged["score"]))
    rel = [Path(p).relative_to(demo_run / "data" / "demo").as_posix() for p in table["path"]]
    np.testing.assert_allclose(table["score"], [staged_by_path[r] for r in rel], rtol=1e-3, atol=1e-4)

    # masks: the image's own size, binary, flagged pixels exactly for the defective verdicts
    for row in table.itertuples():
        mask = np.asarray(Image.open(out / row.mask))
        assert mask.shape == Image.open(row.path).size[::-1] and set(np.unique(mask)) <= {0, 255}
        assert (mask.mean() / 255 > 0) == row.defective, row.path
        assert mask.mean() / 255 == pytest.approx(row.defect_area_fraction)
        assert Image.open(out / row.overlay).size[0] >= mask.shape[1]

    # an explicit threshold above every score: nothing is defective, every mask is empty
    strict = invoke("predict", "demo", images / "good", "--out", tmp_path / "strict", "--threshold", "1e9",
                    *at(demo_run), "-q")
    assert strict.exit_code == 0, strict.output
    table = pd.read_csv(tmp_path / "strict" / "predictions.csv")
    assert len(table) == 10 and not table["defective"].any() and (table["defect_area_fraction"] == 0).all()


def test_predict_answers_per_part_and_inspects_the_rest_when_one_file_is_corrupt(demo_run, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    test = demo_run / "data" / "demo" / "test"
    picked = [next((test / "good").iterdir()), *sorted(p for p in test.iterdir() if p.name != "good")[0].iterdir()][:3]
    parts = [incoming / f"part{i}{p.suffix}" for i, p in enumerate(picked)]
    for src, part in zip(picked, parts):
        shutil.copy(src, part)
    good_jpeg = incoming / "b_truncated.jpg"
    Image.open(parts[0]).convert("RGB").save(good_jpeg, format="JPEG")
    good_jpeg.write_bytes(good_jpeg.read_bytes()[:300])  # a camera's half-written file
    screen = invoke("predict", "demo", incoming, "--out", tmp_path / "pred", *at(demo_run), "-q")
    assert screen.exit_code == 3, screen.output  # some failed, the rest were inspected
    rows = screen.output.splitlines()
    failed = [r for r in rows if r.startswith("FAILED")]
    assert len(failed) == 1 and "b_truncated.jpg" in failed[0]
    answered = [r for r in rows if r.split(" ")[0] in ("defective", "good")]
    assert len(answered) == 3 and all(any(p.name in r for p in parts) for r in answered)  # each part by name
    as_json = invoke("predict", "demo", incoming, "--out", tmp_path / "pred2", *at(demo_run), "-q", "--json")
    assert as_json.exit_code == 3
    summary = json.loads(as_json.output)
    assert (summary["images"], summary["inspected"], summary["failed"]) == (4, 3, 1)
    by_name = {Path(r["path"]).name: r for r in summary["predictions"]}
    assert by_name["b_truncated.jpg"]["status"] == "failed" and by_name["b_truncated.jpg"]["error"]
    for part in parts:
        record = by_name[part.name]
        assert record["status"] == "inspected" and record["verdict"] == ("defective" if record["defective"] else "good")
        assert 0 <= record["defect_area_fraction"] <= 1 and (tmp_path / "pred2" / record["overlay"]).is_file()
    assert summary["defective"] == sum(r.get("defective") is True for r in summary["predictions"])
    table = pd.read_csv(tmp_path / "pred2" / "predictions.csv", keep_default_na=False)
    assert list(table["status"]) == [by_name[Path(p).name]["status"] for p in table["path"]] and len(table) == 4


def test_report_panels_name_their_test_image_and_its_manifest_sha(demo_run):
    index = pd.read_csv(demo_run / "reports/demo/overlays.csv", keep_default_na=False)
    panels = sorted((demo_run / "reports/demo/overlays").glob("*.png"))
    assert sorted(index["panel"]) == [f"overlays/{p.name}" for p in panels] and len(panels) >= 2
    manifest = pd.read_csv(demo_run / "data/demo/manifest.csv", keep_default_na=False).set_index("path")
    scores = pd.read_csv(demo_run / "outputs/demo/scores.csv", keep_default_na=False).set_index("path")["score"]
    for row in index.itertuples():
        assert manifest.loc[row.path, "sha256"] == row.sha256 and manifest.loc[row.path, "label"] == row.label
        assert row.score == pytest.approx(scores[row.path], rel=1e-5)
    # two title lines (the verdict, then the file and its sha): the header is one text line taller
    tile = 256
    for panel_png in panels:
        assert Image.open(panel_png).size[1] == tile + 92 + 18


def test_a_mistyped_data_path_fails_unless_the_copy_is_kept_on_purpose(folder_src, tmp_path, monkeypatch):
    monkeypatch.delenv("HETMM_KEEP_COPY", raising=False)
    root = tmp_path / "run"
    write_params(root, {"line": folder_line(folder_src)})
    assert invoke("download", "line", *at(root), "-q").exit_code == 0
    record = json.loads((root / "data/line/source.json").read_text())
    assert record["source"] == "folder" and record["path"] == str(folder_src.resolve())
    before = (root / "data/line/manifest.csv").read_bytes()
    typo = str(folder_src) + "_typo"
    write_params(root, {"line": folder_line(Path(typo))})
    error = assert_one_line_error(invoke("download", "line", *at(root), "-q"), "data.path", typo,
                                  str(folder_src.resolve()), "HETMM_KEEP_COPY=1")
    assert "still holds 50 images" in error
    assert (root / "data/line/manifest.csv").read_bytes() == before
    monkeypatch.setenv("HETMM_KEEP_COPY", "1")  # asked for: the last good copy, and the record of its real source
    kept = invoke("download", "line", *at(root), "-q")
    assert (kept.exit_code == 0 and "keeping the earlier copy" in kept.output
            and str(folder_src.resolve()) in kept.output)
    assert json.loads((root / "data/line/source.json").read_text()) == record


def test_the_model_card_names_the_source_the_images_came_from(demo_run):
    card = json.loads((demo_run / "reports/demo/model_card.json").read_text())
    assert card["data"]["source"] == json.loads((demo_run / "data/demo/source.json").read_text())
    assert card["data"]["source"]["source"] == "demo"


# --------------------------------------------------------------------------- update


def test_update_of_a_line_dvc_runs_is_refused_unless_it_targets_a_copy(demo_run, tmp_path):
    root = copy_run(demo_run, tmp_path / "run")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")  # runs the demo line
    template = root / "models/demo/template.pt"
    before = template.read_bytes()
    new = sorted((root / "data/demo/test/good").glob("*.png"))[:1]
    assert_one_line_error(invoke("update", "demo", *new, *at(root), "-q"), "dvc repro report@demo", "--template")
    assert template.read_bytes() == before
    copy = root / "copy.pt"
    shutil.copy(template, copy)
    result = invoke("update", "demo", *new, *at(root), "--template", copy, "-q", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["inserted"] == 1, result.output
    assert template.read_bytes() == before


def test_update_inserts_new_good_images_once(demo_run, tmp_path):
    root = copy_run(demo_run, tmp_path / "run")
    template = root / "models/demo/template.pt"
    before = load_template(template)
    new = sorted((root / "data/demo/test/good").glob("*.png"))[:3]
    first = invoke("update", "demo", *new, *at(root), "-q", "--json")
    assert first.exit_code == 0, first.output
    info = json.loads(first.output)
    assert info["inserted"] == 3 and info["skipped_known"] == 0 and info["sheets"] == 10
    after = load_template(template)
    assert len(after.meta["sources"]) == len(before.meta["sources"]) + 3
    assert after.meta["content_hash"] == info["content_hash"] != before.meta["content_hash"]
    assert after.meta["history"][-1]["event"] == "hot_update"
    record = json.loads((root / "reports/demo/template.json").read_text())
    assert (record["action"], record["new_images"], record["content_hash"]) == ("hot_update", 3, info["content_hash"])

    again = invoke("update", "demo", *new, *at(root), "-q")
    assert again.exit_code == 0, again.output
    # readable lines by default
    assert "inserted: 0" in again.output.splitlines() and "skipped_known: 3" in again.output.splitlines()
    assert load_template(template).meta["content_hash"] == after.meta["content_hash"]

    # the report after an update describes the template that scored the images
    for stage in ("infer", "report"):
        result = invoke(stage, "demo", *at(root), "-q")
        assert result.exit_code == 0, result.output
    card = json.loads((root / "reports/demo/model_card.json").read_text())
    assert card["template"]["content_hash"] == after.meta["content_hash"]
    assert json.loads((root / "models/demo/threshold.json").read_text())["model_hash"] == after.meta["content_hash"]


# --------------------------------------------------------------------------- audit


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True, env=env).stdout


def test_audit_lists_every_committed_template_version(demo_run, tmp_path):
    root = copy_run(demo_run, tmp_path / "run")
    _git(root, "init", "-q")
    card_path = root / "reports/demo/model_card.json"
    _git(root, "add", "reports/demo/model_card.json")
    _git(root, "commit", "-q", "-m", "first template")
    first = json.loads(card_path.read_text())

    # a second template version: K 10 -> 6 rebuilds it; infer and report write a new model card
    write_params(root, {"demo": {**DEMO_LINE, "templates": {"kind": "PTS", "size": 6}}})
    for stage in ("template", "calibrate", "infer", "report"):
        result = invoke(stage, "demo", *at(root), "-q")
        assert result.exit_code == 0, result.output
    second = json.loads(card_path.read_text())
    assert second["template"]["content_hash"] != first["template"]["content_hash"]
    _git(root, "add", "reports/demo/model_card.json")
    _git(root, "commit", "-q", "-m", "second template")

    result = invoke("audit", "demo", "--root", root, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["subject"] for r in rows] == ["second template", "first template"]
    assert [r["model_hash"] for r in rows] == [second["template"]["content_hash"],
                                                  first["template"]["content_hash"]]
    assert all(len(r["commit"]) == 40 and r["author"] == "t <t@example.com>" for r in rows)
    assert rows[0]["threshold"] == second["threshold"]["threshold"] and rows[0]["aupro"] == \
        second["metrics"]["all"]["aupro"]
    assert rows[0]["code"] == second["code_version"] and rows[0]["params"]["templates"]["size"] == 6
    assert [r["template"] for r in rows] == ["PTSx6", "PTSx10"]
    assert all(r["line"] == "demo" and r["backbone"] == "efficientnet_lite0" for r in rows)
    assert rows[0]["data_hash"] == rows[1]["data_hash"] != ""
    assert rows[1]["image_auroc"] == first["metrics"]["all"]["image_auroc"]
    # each version's promotion-gate verdict: the first had no baseline, the second was compared with it
    assert [r["gate"] for r in rows] == [second["gate"]["verdict"], "pass"] and "previous" in second["gate"]

    table = invoke("audit", "--root", root)
    assert table.exit_code == 0
    lines = table.output.strip().split("\n")
    assert (len(lines) == 4 and "model#" in lines[0] and "gate" in lines[0]
            and lines[3].startswith("(versions in use on "))
    assert first["template"]["content_hash"][:9] in table.output and second["template"]["content_hash"][:9] in lines[1]
    assert_one_line_error(invoke("audit", "other_line", "--root", root, "--json"), "other_line", "demo")


def _card(line: str, template: str, threshold: float) -> str:
    return json.dumps({"product_line": line, "template": {"kind": "ALL", "sheets": 5, "content_hash": template},
                       "data": {"manifest_sha256": "d" * 64}, "code_version": "c" * 40,
                       "threshold": {"threshold": threshold, "rule": "normal_fpr"},
                       "params": {"features": {"backbone": "efficientnet_lite0"}},
                       "metrics": {"all": {"image_auroc": 99.0, "pixel_auroc": 98.0, "aupro": 90.0}}})


def test_audit_answers_which_versions_inspected_a_line_in_a_period_on_every_branch(tmp_path):
    root = tmp_path / "repo"
    (root / "reports/bolts").mkdir(parents=True)
    _git(root, "init", "-q", "-b", "main")

    def commit(template: str, when: str, threshold: float) -> None:
        (root / "reports/bolts/model_card.json").write_text(_card("bolts", template, threshold))
        _git(root, "add", "-A")
        subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", f"template {template}"], check=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "Ana", "GIT_AUTHOR_EMAIL": "ana@example.com",
                            "GIT_COMMITTER_NAME": "Ana", "GIT_COMMITTER_EMAIL": "ana@example.com",
                            "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when})

    commit("a" * 64, "2026-01-10T09:00:00+00:00", 1.0)
    commit("b" * 64, "2026-02-10T09:00:00+00:00", 1.1)
    _git(root, "checkout", "-q", "-b", "exp-alphas")  # an experiment branch, not merged
    commit("e" * 64, "2026-02-20T09:00:00+00:00", 1.3)
    _git(root, "checkout", "-q", "main")
    commit("c" * 64, "2026-03-10T09:00:00+00:00", 1.2)

    # DVC's bookkeeping refs (a workspace run's EXEC_HEAD) and a real experiment, `dvc exp` style
    _git(root, "update-ref", "refs/exps/exec/EXEC_HEAD", "main")
    _git(root, "update-ref", f"refs/exps/ab/{'c' * 38}/alpha-07", "exp-alphas")

    every = json.loads(invoke("audit", "bolts", "--root", root, "--json").output)  # the current branch: main
    assert [(r["model_hash"][0], r["ref"]) for r in every] == [("c", "main"), ("b", "main"), ("a", "main")]
    assert every[0]["author"] == "Ana <ana@example.com>" and every[0]["threshold"] == 1.2
    everywhere = json.loads(invoke("audit", "bolts", "--all-refs", "--root", root, "--json").output)
    assert [(r["model_hash"][0], r["ref"]) for r in everywhere] == [
        ("c", "main"), ("e", "exp-alphas, exp:alpha-07"), ("b", "main, exp-alphas, exp:alpha-07"),
        ("a", "main, exp-alphas, exp:alpha-07")]
    assert not any("EXEC" in r["ref"] or "refs/" in r["ref"] for r in everywhere)
    # February on main: b was committed in it and a was in use when it began; e ran on an unmerged branch
    feb = json.loads(invoke("audit", "bolts", "--since", "2026-02-01", "--until", "2026-02-28", "--root", root,
                            "--json").output)
    assert [r["model_hash"][0] for r in feb] == ["b", "a"]
    # a short window after b: only b was in use on main (not a, not the experiment)
    window = json.loads(invoke("audit", "bolts", "--since", "2026-02-21T09:00", "--until", "2026-02-21T09:05",
                               "--root", root, "--json").output)
    assert [(r["model_hash"][0], r["ref"]) for r in window] == [("b", "main")]
    late = json.loads(invoke("audit", "--since", "2026-03-05", "--all-refs", "--root", root, "--json").output)
    assert [(r["model_hash"][0], r["ref"]) for r in late] == [  # b and e were in use on their refs on March 5
        ("c", "main"), ("e", "exp-alphas, exp:alpha-07"), ("b", "main")]
    assert_one_line_error(invoke("audit", "--since", "last tuesday", "--root", root), "--since", "ISO")
    assert_one_line_error(invoke("audit", "bolts", "--until", "2025-12-31", "--root", root), "bolts", "period")
    table = invoke("audit", "--root", root).output.splitlines()
    assert len(table) == 5 and table[0].split()[:3] == ["commit", "date", "author"]
    assert max(map(len, table)) <= 120, table
    wide = invoke("audit", "--all-refs", "--root", root).output.splitlines()
    assert wide[0].split()[:2] == ["ref", "commit"] and "EXEC" not in "\n".join(wide)
    # a line name never reaches git as a pathspec or an option
    for hostile in (":(glob)**", "*", "../bolts", "-n1", "bo?ts"):
        assert_one_line_error(invoke("audit", "--root", root, "--", hostile), "line name")
        assert audit_history(root, hostile) == []


def test_readable_output_shortens_what_json_keeps_whole():
    from hetmm.report.console import render

    result = {"images": 3, "threshold": 1.234567, "ok": True, "rule": None, "files": [f"f{i}" for i in range(9)],
              "split": {"train": 2, "empty": {}}, "rows": [{"a": 1}, {"a": 2}]}
    assert render(result).splitlines() == [
        "images: 3", "threshold: 1.235", "ok: yes", "rule: -", "files: f0, f1, f2, f3, f4, f5 ... (9 in all)",
        "split:", "  train: 2", "  empty:", "    (none)", "rows: 2 entries (--json lists them)"]


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing_half_written(tmp_path):
    import signal
    import time

    import torch

    root = tmp_path / "run"
    write_params(root, {"demo": {**DEMO_LINE, "features": {**DEMO_LINE["features"], "batch_size": 1}}})
    proc = subprocess.Popen([sys.executable, "-m", "hetmm.cli", "run", "demo", *at(root), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 240
    while not list((root / "features").rglob("*.pt")):  # the feature extraction is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: nothing half-written was kept; run the command again to go on"]
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".partial", ".scratch"))]
    for cached in root.joinpath("features").rglob("*.pt"):  # every feature file that exists is whole
        torch.load(cached, weights_only=False)


# --------------------------------------------------------------------------- progress under DVC


@pytest.mark.slow
def test_tune_and_calibrate_report_phases_with_counts_and_eta_without_flooding_a_log(tmp_path):
    """Under `dvc repro` every stage runs with --quiet and stderr is a pipe: a line per phase, with counts and an
    ETA, and no more than a few lines per phase."""
    from test_dvc_pipeline import DEMO_PINNED

    root = tmp_path / "run"
    write_params(root, {"demo": DEMO_PINNED})  # one key (the blur) left to the search: its five options
    proc = subprocess.run([sys.executable, "-m", "hetmm.cli", "run", "demo", *at(root), "-q"], capture_output=True,
                          text=True, env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    tune = [line for line in lines if line.startswith("tune@demo: ")]
    assert "tune@demo: matching: started, 5 candidates" in tune
    assert any(re.fullmatch(r"tune@demo: matching: 1/5 candidates, \d+ s, ETA \d+ s", line) for line in tune), tune
    assert any(re.fullmatch(r"tune@demo: matching: done, [1-5]/5 candidates in \d+ s", line) for line in tune), tune
    calibrate = [line for line in lines if line.startswith("calibrate@demo: ")]
    assert any(re.fullmatch(r"calibrate@demo: synthetic defects: started, \d+ images", line)
               for line in calibrate), calibrate
    assert any("synthetic defects: " in line and "ETA" in line for line in calibrate), calibrate
    assert any(re.match(r"calibrate@demo: cross-fitted scores \(k_fold\): done, (\d+)/\1 training images", line)
               for line in calibrate), calibrate
    phases = {line.split(": ")[1] for line in tune + calibrate}
    assert len(tune + calibrate) <= 3 * len(phases)  # started, first ETA, done: a 30 s interval adds none here
