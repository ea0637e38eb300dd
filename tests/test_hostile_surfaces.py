"""Hostile input on the newer surfaces (anomalib Folder and tables, TFA-Net, the cluster section, predict, audit,
line add, killed writes), each through the real ``hetmm`` command in a subprocess: a clear one-line error naming the
file or key (exit 1) within seconds, or a correct result; a kill between any two writes of the report leaves one
whole version (the kills come from a patched writer in a forked child, ``tests/_kill_writes.py``, never from timing).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO, SUBPROCESS_ENV, folder_line, run_stages, write_params
from hetmm.errors import ConfigError, DataError, HetmmError
from hetmm.pipeline import deploy
from hetmm.pipeline.cluster import check_address
from hetmm.pipeline.line import LinePaths

HOSTILE_TYPE = "-2+3"  # a defect folder a spreadsheet would read as a formula


def hetmm(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (this worktree's code)."""
    full = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hetmm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=full, timeout=timeout, **kw)


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit 1 and one ``error:`` line (no traceback) holding every needle."""
    err = done.stderr.strip()
    assert done.returncode == 1, (done.returncode, done.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_tree):
    """A complete folder-line run whose source has a defect type named like a formula; copied by each test."""
    base = tmp_path_factory.mktemp("hostile_run")
    src = Path(shutil.copytree(demo_tree, base / "src"))
    for top in ("test", "ground_truth"):
        (src / top / "hole").rename(src / top / HOSTILE_TYPE)
    run_stages(write_params(base / "repo", {"line": folder_line(src)}), "line", base / "repo")
    return base


@pytest.fixture
def run_copy(finished, tmp_path):
    base = Path(shutil.copytree(finished, tmp_path / "base", symlinks=True))
    root = base / "repo"
    return root, LinePaths.for_line("line", root), base / "src"


def _params(root: Path, line: dict, **top) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", **top, "product_lines": {"line": line}}))
    return root / "params.yaml"


# ----------------------------------------------------------------------------------------------------- hangs


def _folder_source(base: Path, demo_tree: Path) -> dict:
    normal, colour = base / "normal", base / "abnormal" / "colour"
    shutil.copytree(demo_tree / "train" / "good", normal)
    colour.mkdir(parents=True)
    for image in sorted((demo_tree / "test" / "stain").iterdir())[:3]:
        shutil.copy(image, colour / image.name)
    return {"source": "anomalib_folder", "normal_dir": str(normal), "abnormal_dir": str(base / "abnormal")}


@pytest.mark.parametrize("case", ["self_twice", "normal_dir_up", "link_to_link", "read_twice"])
def test_symlink_loops_in_an_anomalib_folder_are_refused_by_name(demo_tree, tmp_path, case):
    data = _folder_source(tmp_path, demo_tree)
    colour, normal = tmp_path / "abnormal" / "colour", tmp_path / "normal"
    if case == "self_twice":  # the case: 8.7 GB in 3 minutes before
        (colour / "again").symlink_to(".")
        (colour / "again2").symlink_to(".")
        needles = ("colour/again: symbolic link loop",)
    elif case == "normal_dir_up":
        (normal / "up").symlink_to("..")
        needles = ("symbolic link loop",)
    elif case == "link_to_link":
        (normal / "a").symlink_to("b")
        (normal / "b").symlink_to("a")
        needles = ("normal/a: symbolic link loop",)
    else:  # not a loop, but the same images twice
        (tmp_path / "abnormal" / "tint").symlink_to("colour")
        needles = ("abnormal/tint: leads to", "read already as", "colour")
    start = time.perf_counter()
    done = hetmm("download", "line", "-q", cwd=_params(tmp_path / "repo", {"data": data}).parent, timeout=60)
    one_line_error(done, *needles)
    assert time.perf_counter() - start < 30


def test_an_unreachable_ray_address_fails_fast_naming_the_key(run_copy):
    root, _, _ = run_copy
    start = time.perf_counter()
    done = hetmm("extract", "line", "-q", cwd=root, env={"RAY_ADDRESS": "bogus-host.invalid:1"}, timeout=60)
    one_line_error(done, "$RAY_ADDRESS", "bogus-host.invalid:1")
    assert time.perf_counter() - start < 30  # no answer within 120 s before


def test_cluster_addresses_are_checked_before_ray_sees_them():
    with pytest.raises(HetmmError, match=r"^\$RAY_ADDRESS: nothing answers at '127\.0\.0\.1:1' within"):
        check_address("127.0.0.1:1", "$RAY_ADDRESS", timeout=2)
    with pytest.raises(HetmmError, match=r"^cluster\.address: cannot resolve the Ray host 'no-such-host\.invalid'"):
        check_address("ray://no-such-host.invalid:10001", "cluster.address", timeout=2)
    for bad in ("head-node", "head:99999", " "):
        with pytest.raises(ConfigError, match=r"is not host:port \(port 1-65535\), ray://host:port or auto"):
            check_address(bad, "cluster.address")
    with pytest.raises(HetmmError, match=r"nothing answers at '\[::1\]:1'"):
        check_address("[::1]:1", "cluster.address", timeout=2)
    with pytest.raises(ConfigError, match=r"^cluster\.address: 'local' would start a new Ray cluster"):
        check_address("local", "cluster.address")  # the README says hetmm never starts one
    with socket.create_server(("127.0.0.1", 0)) as listener:  # a port that answers, but not as Ray (ssh here)
        threading.Thread(target=lambda: listener.accept()[0].sendall(b"SSH-2.0-OpenSSH_9.6\r\n"), daemon=True).start()
        with pytest.raises(HetmmError, match="answers, but not as a Ray cluster"):  # Ray retried for minutes
            check_address(f"127.0.0.1:{listener.getsockname()[1]}", "cluster.address", timeout=2)
        with pytest.raises(HetmmError, match="nothing answers at .* within 1 s"):  # accepts, never speaks
            check_address(f"127.0.0.1:{listener.getsockname()[1]}", "cluster.address", timeout=1)
    check_address("auto", "cluster.address")  # left to Ray: it fails at once when no cluster runs here


@pytest.mark.parametrize("tfa, needle", [
    ({"steps": 10_000_000}, "tfa_net.steps: must be an integer in 1..200_000, got 10000000"),
    ({"width": 1_000_000}, "tfa_net.width: must be an integer in 1..4_096"),
    ({"width": 4096, "depth": 64}, "over the cap of 250_000_000"),
    ({"cos_weight": float("nan")}, "tfa_net.cos_weight: must be a finite number, got nan"),
    ({"cos_weight": float("inf")}, "tfa_net.cos_weight: must be a finite number, got inf"),
    ({"cos_weight": 1e300}, "tfa_net.cos_weight: must be in 0..1000"),
    ({"lr": float("nan")}, "tfa_net.lr: must be a finite number"),
])
def test_tfa_net_keys_are_bounded_before_anything_runs(tmp_path, tfa, needle):
    line = {"method": "tfa_net", "data": {"source": "demo"}, "tfa_net": tfa}
    start = time.perf_counter()
    one_line_error(hetmm("train", "line", "-q", cwd=_params(tmp_path, line).parent), "product_lines.line", needle)
    assert time.perf_counter() - start < 30  # width 1000000 allocated 11 GB before


@pytest.mark.parametrize("cluster, needle", [({"cpus_per_worker": float("nan")}, "cluster.cpus_per_worker"),
                                             ({"gpus_per_worker": float("inf")}, "cluster.gpus_per_worker")])
def test_cluster_floats_must_be_finite(tmp_path, cluster, needle):
    params = _params(tmp_path, {"data": {"source": "demo"}}, cluster=cluster)
    one_line_error(hetmm("download", "line", "-q", cwd=params.parent), needle, "must be a finite number")


def _tfa_line(src: Path, **tfa) -> dict:
    return folder_line(src, tfa_net={"width": 32, "depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1,
                                     "steps": 4, "logs": 2, "batch_size": 4, **tfa}) | {"method": "tfa_net"}


def _kill(root: Path, match: str, *args: str) -> subprocess.CompletedProcess:
    """``hetmm ARGS`` in ``root``, killed just before it first puts a file whose path contains ``match`` in place."""
    return subprocess.run([sys.executable, str(REPO / "tests" / "_kill_writes.py"), str(root), str(root), "--match",
                           match, "--", *args], capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.mark.slow
def test_training_curves_stay_until_the_new_run_has_a_model(run_copy):
    root, paths, src = run_copy  # the line's data, validation and features serve a TFA-Net line as they are
    run_stages(write_params(root, {"line": _tfa_line(src)}), "line", root, ("tune", "train"))
    curves = paths.reports / "training"

    def state():
        return {p.relative_to(curves): p.read_bytes() for p in curves.rglob("*") if p.is_file()}, \
            paths.tfa_net.read_bytes()

    before = state()
    assert (curves / "metrics.json").is_file()
    run_stages(write_params(root, {"line": _tfa_line(src, steps=8, cos_weight=2.0)}), "line", root, ("tune",))
    args = ("train", "line", "--root", ".", "--params", "params.yaml", "-q")
    # killed after its last training step, before the model is saved: the previous curves and model stay whole
    killed = _kill(root, "tfa_net.pt", *args)
    assert json.loads(killed.stdout)["killed"] and "steps left, about" in killed.stderr  # and it said how long
    assert state() == before
    # the next run resumes at its last step and saves the model; killed between moving the old curves aside and
    # moving the new ones in
    assert json.loads(_kill(root, "/training", *args).stdout)["killed"]
    assert paths.tfa_net.read_bytes() != before[1] and not curves.exists()
    done = hetmm(*args, cwd=root)  # the model is current: the old curves come back, then the new ones go in
    assert done.returncode == 0, done.stderr[-2000:]
    assert "action: unchanged" in done.stdout
    assert state()[0] != before[0] and json.loads((curves / "metrics.json").read_text())["step"] == 1
    assert not (paths.reports / ".training.staging").exists() and not (paths.reports / ".training.old").exists()
    assert not tfa_resume(paths).exists()


def tfa_resume(paths: LinePaths) -> Path:
    return paths.models / ".tfa_net.resume.pt"


# ----------------------------------------------------------------------------------------- half-replaced or lost


def _normalised(path: Path) -> bytes:
    """A report file with the report's own run time taken out (it differs between two runs of one version)."""
    if path.name == "model_card.json":
        card = json.loads(path.read_text())
        card["timings_seconds"].pop("report")
        return json.dumps(card, sort_keys=True).encode()
    if path.name == "model_card.md":
        return b"\n".join(line for line in path.read_bytes().splitlines() if not line.startswith(b"| report |"))
    return path.read_bytes()


def _deployed(root: Path) -> dict[str, bytes]:
    paths = LinePaths.for_line("line", root)
    files = [p for p in paths.reports.rglob("*") if p.is_file()] + [paths.threshold]
    return {p.relative_to(root).as_posix(): _normalised(p) for p in files if p.is_file()}


@pytest.mark.slow
def test_a_report_killed_between_any_two_writes_leaves_one_whole_version(run_copy, tmp_path):
    root, paths, src = run_copy
    # the next version: another threshold rule and fewer panels
    params = write_params(root, {"line": folder_line(src, threshold={"rule": "normal_quantile", "value": 0.9},
                                                     report={"overlays": 1})})
    run_stages(params, "line", root, ("tune", "calibrate"))
    base, old = Path(shutil.copytree(root, tmp_path / "next", symlinks=True)), _deployed(root)
    done = subprocess.run([sys.executable, str(REPO / "tests" / "_kill_writes.py"), str(base), str(tmp_path / "kills"),
                           "--", "report", "line", "--root", ".", "--params", "params.yaml", "-q"],
                          capture_output=True, text=True, env={**os.environ, **SUBPROCESS_ENV}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kills = json.loads(done.stdout.splitlines()[-1])
    assert kills["count"] > 20 and kills["killed"] == list(range(1, kills["count"] + 1))
    new = _deployed(tmp_path / "kills" / "full")
    assert new["models/line/threshold.json"] != old["models/line/threshold.json"]
    seen, journal = [], Path(".hetmm") / "release" / "line" / deploy.JOURNAL
    for k in kills["killed"]:
        killed = tmp_path / "kills" / f"k{k}"
        if (killed / journal).is_file() and not (tmp_path / "late").exists():  # past the commit point, mid-renames
            shutil.copytree(killed, tmp_path / "late", symlinks=True)
        deploy.settle(LinePaths.for_line("line", killed))  # what the next report or predict does first
        state = _deployed(killed)
        assert state in (old, new), f"kill before write {k} left a mixed version"
        seen.append(state == new)
    assert any(seen) and not all(seen)  # kills before and after the commit point
    # a real predict after a kill past the commit point: it finishes the version and uses it whole
    out = hetmm("predict", "line", str(src / "test" / "good"), "--out", str(tmp_path / "p"), "--json", "-q",
                cwd=tmp_path / "late")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["threshold"] == json.loads(new["models/line/threshold.json"])["threshold"]
    assert _deployed(tmp_path / "late") == new


def test_a_failing_report_replaces_nothing(run_copy):
    root, paths, src = run_copy
    shutil.rmtree(paths.reports / "overlays")
    (paths.reports / "overlays").write_text("a file where the panels go")  # the case
    old, written = _deployed(root), paths.threshold.stat().st_mtime_ns
    one_line_error(hetmm("report", "line", "-q", cwd=root), "reports/line/overlays", "nothing was replaced")
    assert _deployed(root) == old and paths.threshold.stat().st_mtime_ns == written  # it was rewritten first before
    assert not (root / ".hetmm" / "release" / "line" / deploy.JOURNAL).exists()


def test_stale_temp_files_are_removed_and_never_reach_dvc(run_copy, tmp_path):
    root, paths, _ = run_copy
    key = next(p for p in paths.features.iterdir() if p.is_dir())
    stale = [paths.models / ".template.pt.ab12cd34.tmp", key / f".{next(key.iterdir()).name}.x_y9z8w7.tmp",
             paths.outputs / ".maps.npy.qwertyui.tmp", paths.reports / ".metrics.json.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(b"half-written")
    kept = paths.reports / "notes.tmp"  # not a name hetmm gives its temporary files
    kept.write_text("mine")
    assert hetmm("report", "line", "-q", cwd=root).returncode == 0
    assert not any(p.exists() for p in stale) and kept.exists()
    # in a DVC repository with the project's .dvcignore, a leftover never enters an output's hash
    repo = tmp_path / "dvc"
    (repo / "features" / "line" / "k").mkdir(parents=True)
    (repo / "features" / "line" / "k" / "a.pt").write_bytes(b"features")
    (repo / "features" / "line" / "k" / ".a.pt.ab12cd34.tmp").write_bytes(b"half")
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    env = {**os.environ, **SUBPROCESS_ENV}
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "add", "-q", "features/line"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True, timeout=120)
    out = yaml.safe_load((repo / "features" / "line.dvc").read_text())["outs"][0]
    assert out["nfiles"] == 1 and out["size"] == len(b"features")


# ------------------------------------------------------------------------------------------------ silently wrong


@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_predict_refuses_a_non_finite_threshold(run_copy, tmp_path, value):
    root, _, src = run_copy
    done = hetmm("predict", "line", str(src / "test" / "good"), "--threshold", value, "--out", str(tmp_path / "o"),
                 "-q", cwd=root)
    one_line_error(done, "--threshold: must be a finite score")


@pytest.mark.parametrize("damage, needle", [
    (lambda t: [], "damaged (not a JSON object)"),
    (lambda t: "{", "damaged (not a JSON object)"),
    (lambda t: {**t, "threshold": None}, "must be finite numbers"),
    (lambda t: {**t, "pixel_threshold": "0.3"}, "must be finite numbers"),
    (lambda t: {**t, "pixel_threshold": float("nan")}, "must be finite numbers"),
])
def test_a_damaged_saved_threshold_is_refused(run_copy, damage, needle):
    from hetmm.pipeline.predict import saved_threshold

    root, paths, _ = run_copy
    saved = json.loads(paths.threshold.read_text())
    assert saved_threshold(paths, "line", saved["model_hash"])["threshold"] == saved["threshold"]
    bad = damage(saved)
    paths.threshold.write_text(bad if isinstance(bad, str) else json.dumps(bad))  # NaN as JSON's NaN token
    with pytest.raises(DataError, match=r"models/line/threshold\.json: .*" + re.escape(needle)):
        saved_threshold(paths, "line", saved["model_hash"])


def test_text_reaching_a_spreadsheet_or_terminal_is_neutralised(run_copy, tmp_path):
    root, paths, src = run_copy
    images = tmp_path / "in"
    images.mkdir()
    good = next((src / "test" / "good").iterdir())
    names = ["=1+1.png", "+SUM(A1).png", "@cmd.png", "-2.png", "esc\x1b[31mred.png", "plain.png"]
    for name in names:
        shutil.copy(good, images / name)
    # relative names, as a user types them: the cell starts with the file's name
    done = hetmm("predict", "line", "--root", str(root), "--params", str(root / "params.yaml"), "--out", "out",
                 "--", *names, cwd=images)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = pd.read_csv(images / "out" / "predictions.csv", dtype=str)["path"]
    assert sorted(cells) == sorted(["'=1+1.png", "'+SUM(A1).png", "'@cmd.png", "'-2.png", "esc\x1b[31mred.png",
                                    "plain.png"])
    assert "\x1b" not in done.stdout + done.stderr
    # a second, smaller run into the same folder: none of the first run's masks or panels pass for its own
    again = hetmm("predict", "line", "--root", str(root), "--params", str(root / "params.yaml"), "--out", "out", "-q",
                  "plain.png", cwd=images)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.name for p in (images / "out" / "masks").iterdir()] == ["00000_plain.png"]
    assert len(list((images / "out" / "overlays").iterdir())) == 1
    for csv, name in ((paths.reports / "per_defect.csv", "group"), (paths.outputs / "scores.csv", "defect_type"),
                      (paths.manifest, "defect_type")):
        column = pd.read_csv(csv, dtype=str, keep_default_na=False)[name]
        assert f"'{HOSTILE_TYPE}" in set(column) and HOSTILE_TYPE not in set(column), csv
    bad = tmp_path / "bad\x1b]0;owned\x07.png"
    bad.symlink_to(tmp_path / "gone.png")
    one_line_error(hetmm("predict", "line", str(bad), "--out", str(tmp_path / "o2"), cwd=root), "\\x1b]0;owned\\x07")


def test_a_mask_dir_matching_no_image_is_refused_with_a_hint(demo_tree, tmp_path):
    data = _folder_source(tmp_path, demo_tree)
    masks = tmp_path / "masks" / "colour"
    masks.mkdir(parents=True)
    for mask in sorted((demo_tree / "ground_truth" / "stain").iterdir())[:3]:
        shutil.copy(mask, masks / f"x{mask.name}")  # named for no image
    params = _params(tmp_path / "repo", {"data": {**data, "mask_dir": str(tmp_path / "masks")}})
    one_line_error(hetmm("download", "line", "-q", cwd=params.parent), "data.mask_dir holds no mask for any of the 3",
                   "colour/000.png")


def test_folders_that_overlap_are_refused(demo_tree, tmp_path):
    data = _folder_source(tmp_path, demo_tree)  # masks inside the defect folder would be read as defect images
    params = _params(tmp_path / "repo", {"data": {**data, "mask_dir": str(tmp_path / "abnormal" / "colour")}})
    one_line_error(hetmm("download", "line", "-q", cwd=params.parent), "data.abnormal_dir and data.mask_dir",
                   "one holds the other")


def test_table_rows_whose_copies_collide_are_named_by_their_csv_lines(demo_tree, tmp_path):
    files = tmp_path / "files"
    (files / "a").mkdir(parents=True)
    goods = sorted((demo_tree / "train" / "good").iterdir())
    shutil.copy(goods[0], files / "a" / "b.png")
    shutil.copy(goods[1], files / "a__b.png")  # both would be stored as train/good/a__b.png
    rows = [(f"x{i}.png", "train", "good") for i in range(3)] + [("a/b.png", "train", "good"),
                                                                 ("a__b.png", "train", "good")]
    for name, _, _ in rows[:3]:
        shutil.copy(goods[2], files / name)
    pd.DataFrame(rows, columns=["path", "split", "label"]).to_csv(files / "images.csv", index=False)
    params = _params(tmp_path / "repo", {"data": {"source": "table", "path": str(files / "images.csv")}})
    one_line_error(hetmm("download", "line", "-q", cwd=params.parent), "images.csv line 6: would be stored as "
                   "train/good/a__b.png", "images.csv line 5 has already")


# ----------------------------------------------------------------------------------------------------- tracebacks


def test_predict_out_pointing_at_a_file(run_copy, tmp_path):
    root, _, src = run_copy
    (tmp_path / "taken").write_text("not a folder")
    one_line_error(hetmm("predict", "line", str(src / "test" / "good"), "--out", str(tmp_path / "taken"), cwd=root),
                   "taken: --out names a folder")


@pytest.mark.parametrize("content, needle", [(None, "params.yaml: file not found"),
                                             ("- a\n- b\n", "expected a mapping with a product_lines mapping"),
                                             ("product_lines: [1]\n", "expected a mapping with a product_lines"),
                                             ("a: [\n", "not valid YAML")])
def test_line_add_with_a_bad_params_file(tmp_path, content, needle):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    if content is not None:
        (tmp_path / "params.yaml").write_text(content)
    (tmp_path / "src" / "train" / "good").mkdir(parents=True)  # a real source: the params file is what is wrong
    Image.new("RGB", (32, 32)).save(tmp_path / "src" / "train" / "good" / "000.png")
    one_line_error(hetmm("line", "add", "bolts", "--path", str(tmp_path / "src"), cwd=tmp_path), needle)
    one_line_error(hetmm("line", "check", cwd=tmp_path), needle)


def test_line_add_table_without_path_fails_at_once(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("product_lines:\n  a:\n    data: {source: demo}\n")
    one_line_error(hetmm("line", "add", "bolts", "--source", "table", cwd=tmp_path),
                   "product_lines.bolts.data.path: the table source needs the path")
    one_line_error(hetmm("line", "add", "bolts", "--source", "anomalib_folder", cwd=tmp_path), "data.normal_dir")
    assert "bolts" not in (tmp_path / "dvc.yaml").read_text()


def test_audit_over_a_malformed_committed_card(run_copy, tmp_path):
    root, paths, _ = run_copy
    repo = tmp_path / "git"
    card = repo / "reports" / "line" / "model_card.json"
    card.parent.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    shutil.copy(paths.reports / "model_card.json", card)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "good"], cwd=repo, check=True)
    subprocess.run(["git", "checkout", "-qb", "other"], cwd=repo, check=True)
    card.write_text("[]")
    subprocess.run([*git, "commit", "-qam", "bad"], cwd=repo, check=True)
    done = hetmm("audit", "--root", str(repo), cwd=repo)
    one_line_error(done, "reports/line/model_card.json: committed model card is not a JSON object")
    assert "line" in done.stdout and "good" not in done.stderr  # the readable version is still listed


def test_a_failing_template_write_names_the_file(run_copy):
    root, paths, _ = run_copy
    paths.template.unlink()  # a rebuild: the template is written again
    limit = 64 * 1024  # far below the template's size; Python ignores SIGXFSZ, so the write fails with EFBIG
    done = hetmm("template", "line", "-q", cwd=root,
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    one_line_error(done, "models/line/template.pt: could not write it", "ulimit -f")
    assert not paths.template.exists() and not list(paths.models.glob(".*.tmp"))
