"""What a new user types first, on a fresh clone without network: `dvc repro` and `dvc exp run -S` with no target,
a failed experiment, `hetmm line remove`; and the MTD example project that keeps the lines needing a download apart.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import DEMO_PINNED, _commit, _env, _ran, _repo, _run

from conftest import REPO, SUBPROCESS_ENV
from hetmm.pipeline.experiments import _leaves
from hetmm.pipeline.lines import dvc_line_methods
from hetmm.pipeline.stages import stages_for

pytestmark = pytest.mark.slow  # a clone, a DVC repro and experiments in it: minutes

EXAMPLE = REPO / "examples" / "mtd"
# tiny settings for the repository's TFA-Net line, so that its training takes seconds
TINY_TFA = {"features": {"image_size": [128, 128]}, "report": {"overlays": 1, "ablation": False},
            "tfa_net": {"width": 32, "depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1, "steps": 10,
                        "logs": 2},
            "tune": {"max_validation": 3, "min_synthetic": 6}}
# DVC's own experiments table at its narrowest readable (README "Run an experiment", docs/PIPELINE.md): the keys
# that differ (the settings.yaml copies dropped) and one line's headline figures
NARROW_EXP_SHOW = ("--only-changed", "--drop", "models/", "--keep",
                   r"reports/demo/metrics\.json:(image_auroc|pixel_auroc|aupro)$")


def _hetmm(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hetmm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**SUBPROCESS_ENV, "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)},
                          timeout=120)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def test_the_default_pipeline_holds_only_lines_a_fresh_clone_builds_offline():
    lines = yaml.safe_load((REPO / "params.yaml").read_text())["product_lines"]
    assert set(lines) == set(dvc_line_methods(REPO / "dvc.yaml"))
    assert {entry["data"]["source"] for entry in lines.values()} == {"demo"}  # embedded images, no download
    # the MTD lines are a DVC project of their own (examples/mtd), derived from the repository's stages
    assert (EXAMPLE / ".dvc").is_dir() and set(dvc_line_methods(EXAMPLE / "dvc.yaml")) == {"mtd", "mtd_tfa"}
    check = subprocess.run([sys.executable, str(REPO / "tools/sync_example.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    assert _hetmm("line", "check", cwd=EXAMPLE).returncode == 0
    assert (EXAMPLE / "reports/mtd/metrics.json").is_file()  # the committed results the docs cite


@pytest.mark.parametrize("params", [REPO / "params.yaml", EXAMPLE / "params.yaml"], ids=["repo", "example"])
def test_dvc_rewrites_the_params_files_byte_for_byte(params, tmp_path):
    """`dvc exp run -S` reloads and rewrites the whole file: in the form kept here, only the key set changes."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copy(params, copy)
    apply_overrides(copy, [f"device={yaml.safe_load(params.read_text())['device']}"])
    assert filecmp.cmp(params, copy, shallow=False)


def test_line_remove_takes_out_the_entry_and_its_lists_and_nothing_else(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    before = (tmp_path / "params.yaml").read_text()
    out = _hetmm("line", "remove", "mtd", cwd=tmp_path).stdout
    assert "removed: mtd" in out and "data/mtd" in out  # it says what stays on disk
    after = (tmp_path / "params.yaml").read_text()
    raw = yaml.safe_load(before)
    del raw["product_lines"]["mtd"]
    assert yaml.safe_load(after) == raw
    kept = [line for line in before.splitlines() if line not in after.splitlines()]
    assert "  # Magnetic Tile Defects (the paper's MTD): fixed seeded split committed in hetmm/resources/" \
        "mtd_split.json" in kept  # its own description goes with it ...
    assert "  # MTD with TFA-Net on the mtd line's frozen feature profile (no tuning on the test split); HETMM " \
        "beside it in the" in after  # ... the other line's stays, every byte of the rest too
    same = len(os.path.commonprefix([before, after]))
    assert before.endswith(after[same:])  # one contiguous piece taken out, the rest byte for byte
    assert dvc_line_methods(tmp_path / "dvc.yaml") == {"mtd_tfa": "tfa_net"}
    assert _hetmm("line", "check", cwd=tmp_path).returncode == 0
    refused = _hetmm("line", "remove", "nope", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: product_lines.nope: no such line")
    # the last line out, a new one in: a HETMM entry without the TFA-Net section, in DVC's own list style
    _hetmm("line", "remove", "mtd_tfa", cwd=tmp_path)
    _hetmm("line", "add", "bolts", "--source", "demo", cwd=tmp_path)
    entry = yaml.safe_load((tmp_path / "params.yaml").read_text())["product_lines"]["bolts"]
    assert "tfa_net" not in entry and "templates" in entry
    _hetmm("line", "add", "bolts_tfa", "--source", "demo", "--method", "tfa_net", cwd=tmp_path)
    entry = yaml.safe_load((tmp_path / "params.yaml").read_text())["product_lines"]["bolts_tfa"]
    assert "tfa_net" in entry and "templates" not in entry
    # a mistyped or empty folder is refused now, not at the first `dvc repro`
    typo = _hetmm("line", "add", "nuts", "--path", str(tmp_path / "no_such_folder"), cwd=tmp_path, check=False)
    assert typo.returncode == 1 and "no_such_folder is not a folder" in typo.stderr
    (tmp_path / "empty").mkdir()
    empty = _hetmm("line", "add", "nuts", "--path", str(tmp_path / "empty"), cwd=tmp_path, check=False)
    assert empty.returncode == 1 and "holds no images" in empty.stderr
    assert "nuts" not in (tmp_path / "params.yaml").read_text()
    (tmp_path / "dvc_copy").mkdir()
    test_dvc_rewrites_the_params_files_byte_for_byte(tmp_path / "params.yaml", tmp_path / "dvc_copy")


@pytest.mark.slow
def test_a_fresh_clone_runs_offline_and_a_failed_experiment_leaves_params_yaml_as_it_was(tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):  # no network at all
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    own = yaml.safe_load((REPO / "params.yaml").read_text())["product_lines"]
    # the repository's own lines, with their own data blocks, at sizes that run in seconds
    lines = {name: {**(DEMO_PINNED if entry.get("method", "hetmm") == "hetmm" else TINY_TFA),
                    "data": entry["data"], **({"method": entry["method"]} if "method" in entry else {})}
             for name, entry in own.items()}
    root = _repo(tmp_path, lines)
    dvc = str(Path(sys.executable).with_name("dvc"))
    first = _run(root, dvc, "repro")  # no target: the whole default pipeline
    assert _ran(first.stdout) == {f"{stage}@{name}" for name, entry in lines.items()
                                  for stage in stages_for(entry.get("method", "hetmm"))}
    _commit(root, "first reproduction")

    before = (root / "params.yaml").read_text()
    _run(root, dvc, "exp", "run", "-S", "product_lines.demo.report.overlays=1")  # no target
    after = (root / "params.yaml").read_text().splitlines()
    assert len(after) == len(before.splitlines())
    changed = [(a, b) for a, b in zip(before.splitlines(), after) if a != b]
    assert changed == [("      overlays: 2", "      overlays: 1")]  # DVC rewrote the file: one line differs

    ok = (root / "params.yaml").read_bytes()
    failed = _run(root, sys.executable, "-m", "hetmm.cli", "exp", "run", "report@demo", "-S",
                  "product_lines.demo.features.backbone=no_such_net", check=False)
    assert failed.returncode != 0
    assert (root / "params.yaml").read_bytes() == ok
    assert "params.yaml is back as it was before it" in failed.stderr

    # seven lines, five added as a user adds them; their metrics files are copies of the demo's (what is measured is
    # the width of the experiments view, not the figures)
    for i in range(5):
        _run(root, sys.executable, "-m", "hetmm.cli", "line", "add", f"line{i}", "--source", "demo")
        (root / f"reports/line{i}").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "reports/demo/metrics.json", root / f"reports/line{i}/metrics.json")
    _commit(root, "seven lines")
    _run(root, dvc, "exp", "run", "report@demo", "-S", "product_lines.demo.report.overlays=3", "-n", "three")
    shown = json.loads(_run(root, dvc, "exp", "show", "--json").stdout)
    dvc_columns = sum(len(_leaves(shown[0]["data"][kind])) for kind in ("params", "metrics", "deps"))
    view = _run(root, sys.executable, "-m", "hetmm.cli", "exp", "show").stdout.splitlines()
    assert max(map(len, view)) <= 200, (dvc_columns, view)
    head = view[0].split()
    assert head[:3] == ["experiment", "created", "demo.report.overlays"] and "demo" in head
    demo = json.loads((root / "reports/demo/metrics.json").read_text())
    cell = "/".join(f"{demo[k]:.1f}" for k in ("image_auroc", "pixel_auroc", "aupro"))
    three = next(line for line in view if line.split()[0] == "three")
    assert three.split()[3:5] == ["3", cell]  # the key set, the line's headline figures
    assert dvc_columns > 300  # what DVC's own table shows for the same repository

    def dvc_table(width: int, *args: str) -> list[str]:  # `dvc exp show` in a terminal `width` columns wide
        proc = subprocess.run([dvc, "exp", "show", "--no-pager", *args], cwd=root, capture_output=True, text=True,
                              env={**_env(root), "COLUMNS": str(width)}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    assert max(map(len, dvc_table(100_000))) > 10_000  # the default table, unconstrained: 30,474 characters here
    assert "…" in "".join(dvc_table(200))  # ... so at 200 columns its cells are cut
    narrow = dvc_table(200, *NARROW_EXP_SHOW)
    assert max(map(len, narrow)) <= 200 and "…" not in "".join(narrow), narrow
    assert max(map(len, dvc_table(100_000, *NARROW_EXP_SHOW))) <= 200  # it fits on its own, not by cutting
    assert "product_lines.demo.report.overlays" in narrow[1] and "reports/demo/metrics.json:aupro" in narrow[1]
    cells = next(line for line in narrow if "[three]" in line).split()
    assert cells[-1] == "3" and sorted(map(float, cells[-4:-1])) == pytest.approx(
        sorted(demo[k] for k in ("image_auroc", "pixel_auroc", "aupro")), abs=0.01)

    # a failed experiment: plain `dvc exp run` leaves its -S value in params.yaml (DVC's behaviour); in a temporary
    # copy (--temp, as the README shows) the workspace's params.yaml is never written
    ok = (root / "params.yaml").read_bytes()
    bad = ("report@demo", "-S", "product_lines.demo.features.backbone=no_such_net")
    plain = _run(root, dvc, "exp", "run", *bad, check=False)
    assert plain.returncode != 0 and "no_such_net" in (root / "params.yaml").read_text()
    (root / "params.yaml").write_bytes(ok)
    temp = _run(root, dvc, "exp", "run", "--temp", *bad, check=False)
    assert temp.returncode != 0 and "unknown backbone 'no_such_net'" in temp.stdout + temp.stderr
    assert (root / "params.yaml").read_bytes() == ok


def test_small_things_a_new_user_meets(tmp_path, demo_tree):
    from hetmm.data.sources import SOURCES

    helped = " ".join(_hetmm("download", "--help", cwd=tmp_path).stdout.split())
    assert all(source in helped for source in SOURCES) and "HETMM_KEEP_COPY" in helped
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "dvc_plots/index.html"])
    assert ignored.returncode == 0  # `dvc plots show` output never lands in a commit
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    good = demo_tree / "train" / "good"
    _hetmm("line", "add", "folder_line", "--source", "anomalib_folder", "--normal-dir", str(good), "--abnormal-dir",
           str(demo_tree / "test"), "--normal-test-dir", str(demo_tree / "test" / "good"), cwd=tmp_path)
    data = yaml.safe_load((tmp_path / "params.yaml").read_text())["product_lines"]["folder_line"]["data"]
    assert data["normal_test_dir"] == str(demo_tree / "test" / "good")
