"""The DVC pipeline itself (``dvc.yaml`` + ``params.yaml``), run offline in a throwaway copy of the repository.

The life cycle on the embedded demo line starts from one reproduced repository (a module fixture); each step works
on its own copy, so an early failure hides none of the others: no-op repro, a per-line parameter change, metrics,
offline plots, an experiment, queued experiments, edits of the feature code (a comment only, then a statement)
that must recompute exactly what depends on it, and another machine restoring from the team's remote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import MTD, REPO, SUBPROCESS_ENV
from hetmm.pipeline.lines import set_dvc_lines
from hetmm.pipeline.stages import stages_for

pytestmark = pytest.mark.slow

DVC_TIMEOUT_S = 400


def _env(root: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, **SUBPROCESS_ENV, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(root),  # the stage commands import the copy's hetmm, not the editable install's
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com", "CI": "true"}


def _run(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=DVC_TIMEOUT_S)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _commit(root: Path, message: str) -> None:
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", message)


# The demo line with every tunable key but the blur pinned (the blur is `auto`, as `hetmm line add` writes it): its
# tune stage runs a real search of a few seconds (no time-based cut, no measured-speed floor), so reruns stay short
# and repeatable.
DEMO_PINNED = {
    "data": {"source": "demo", "seed": 0},
    "features": {"backbone": "efficientnet_lite0", "layers": [1, 2, 3], "image_size": [128, 128], "pool": 1,
                 "normalisation": "imagenet"},
    "templates": {"kind": "PTS", "size": 10},
    "matching": {"mode": "mutual", "forward_windows": [5, 3, 3], "backward_windows": [3, 3, 1],
                 "alphas": [0.5, 0.5, 0.5], "weights": [1.0, 1.0, 0.5]},
    "post": {"image_score": "max", "blur_sigma": "auto"},
    "report": {"overlays": 2, "ablation": False},
    "tune": {"max_validation": 3, "min_synthetic": 10}, "inspection": {"min_images_per_second": 0},
}


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The repository's tracked files in a new git repository; params.yaml keeps the demo line and, when the
    shared MTD copy is there, a tiny MTD slice read from it."""
    return _repo(tmp_path, with_mtd=True)


def _repo(tmp_path: Path, lines: dict | None = None, with_mtd: bool = False) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout")
    root = tmp_path / "repo"
    for rel in filter(None, listed.stdout.split("\0")):
        src = REPO / rel
        if src.is_file():  # tracked but deleted in the working tree: leave it out
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    lines = lines or {"demo": DEMO_PINNED}
    # a second, tiny line shows that one line's change leaves the other be
    if with_mtd and (MTD / "MT_Free" / "Imgs").is_dir():
        mtd = yaml.safe_load((root / "examples/mtd/params.yaml").read_text())["product_lines"]["mtd"]
        mtd["data"].update({"mirror": str(MTD), "subset": "dev", "limit": 2})
        mtd["features"].update({"image_size": [64, 64], "blocks": "last"})
        mtd["templates"].update({"size": 4})
        mtd["report"] = {"overlays": 2, "ablation": False}
        lines["mtd"] = mtd
    params["product_lines"] = lines
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    set_dvc_lines({name: body.get("method", "hetmm") for name, body in lines.items()}, root / "dvc.yaml")
    (root / "dvc.lock").unlink(missing_ok=True)
    _run(root, "git", "init", "-q")
    _commit(root, "copy of the repository, demo line only")
    return root


def _set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


DVC = str(Path(sys.executable).with_name("dvc")) if Path(sys.executable).with_name("dvc").is_file() else "dvc"


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """A copy of the repository after its first `dvc repro`, committed, and that repro's output. Shared and
    read-only: each life-cycle test works on its own copy (:func:`_copy`), so one failing step hides no other."""
    root = _repo(tmp_path_factory.mktemp("reproduced"), with_mtd=True)
    first = _run(root, DVC, "repro")
    _commit(root, "first reproduction")
    return root, first.stdout


def _copy(reproduced: tuple[Path, str], tmp_path: Path) -> tuple[Path, set[str], set[str]]:
    """A private copy of the reproduced repository, its product lines and their download stages."""
    root = Path(shutil.copytree(reproduced[0], tmp_path / "repo", symlinks=True))
    lines = set(yaml.safe_load((root / "params.yaml").read_text())["product_lines"])
    return root, lines, {f"download@{line}" for line in lines}


def test_the_first_reproduction_runs_every_stage_and_a_second_only_refreshes_the_downloads(reproduced, tmp_path):
    root, lines, downloads = _copy(reproduced, tmp_path)
    assert _ran(reproduced[1]) == {f"{s}@{line}" for s in stages_for("hetmm") for line in lines}
    metrics = json.loads((root / "reports/demo/evaluation.json").read_text())
    assert metrics["n_images"] == 26 and metrics["image_auroc"] >= 95.0 and metrics["pixel_auroc"] >= 97.0
    assert (root / "dvc.lock").is_file() and (root / "reports/demo/model_card.json").is_file()
    assert json.loads((root / "reports/demo/template.json").read_text())["action"] == "rebuild"
    # nothing changed: only the download stages (always_changed: their sources are outside DVC) refresh their
    # copy, which hashes the same, so nothing downstream runs
    assert _ran(_run(root, DVC, "repro").stdout) == downloads


def test_a_matching_parameter_reruns_only_the_stages_that_read_it(reproduced, tmp_path):
    # (report declares the matching settings because its ablation uses them)
    root, _, downloads = _copy(reproduced, tmp_path)
    tuning = json.loads((root / "reports/demo/tuning.json").read_text())
    assert tuning["action"] == "searched" and set(tuning["chosen"]) == {"post.blur_sigma"}
    _set_param(root, "product_lines.demo.matching.alphas", [0.7, 0.5, 0.5])
    status = json.loads(_run(root, DVC, "status", "--json").stdout)
    assert set(status) == {"tune@demo"} | downloads  # the effective settings are remade first
    third = _run(root, DVC, "repro")
    assert _ran(third.stdout) == {"tune@demo", "calibrate@demo", "infer@demo", "report@demo"} | downloads
    assert json.loads((root / "reports/demo/tuning.json").read_text())["action"] == "searched"  # a new input
    assert json.loads((root / "reports/demo/template.json").read_text())["action"] == "rebuild"  # not rerun


def test_metrics_and_plots_are_shown_offline(reproduced, tmp_path):
    root, lines, _ = _copy(reproduced, tmp_path)
    shown = json.loads(_run(root, DVC, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    demo = files["reports/demo/metrics.json"]["data"]
    if "mtd" in lines:
        assert 0 <= files["reports/mtd/metrics.json"]["data"]["image_auroc"] <= 100
    assert demo["image_auroc"] == json.loads((root / "reports/demo/metrics.json").read_text())["image_auroc"]
    assert 0 <= demo["pixel_auroc"] <= 100
    plots_dir = tmp_path / "plots"
    _run(root, DVC, "plots", "show", "-o", str(plots_dir))
    html = (plots_dir / "index.html").read_text()
    assert "cdn.jsdelivr" not in html
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "plots must not load scripts from anywhere"
    assert "vega" in html and "demo image ROC" in html and "demo PRO curve" in html
    assert re.search(r"<img[^>]+roc\.png", html) and re.search(r"<img[^>]+overlays", html)  # image plots


def test_an_experiment_sets_its_parameter_and_runs_only_the_affected_stages(reproduced, tmp_path):
    root, _, downloads = _copy(reproduced, tmp_path)
    before = json.loads((root / "reports/demo/metrics.json").read_text())
    # (pinning the blur, the last tuned key, reruns the tuning: nothing is left to search)
    exp = _run(root, DVC, "exp", "run", "-S", "product_lines.demo.post.blur_sigma=1.0")  # `auto` key: no `+`
    assert _ran(exp.stdout) == {"tune@demo", "calibrate@demo", "infer@demo", "report@demo"} | downloads
    assert yaml.safe_load((root / "params.yaml").read_text())["product_lines"]["demo"]["post"]["blur_sigma"] == 1.0
    tuning = json.loads((root / "reports/demo/tuning.json").read_text())
    assert tuning["action"] == "none" and "pinned" in tuning["reason"]
    after = json.loads((root / "reports/demo/metrics.json").read_text())
    assert after["image_auroc"] >= 95.0 and after != before
    assert "blur_sigma" in _run(root, DVC, "exp", "show", "--json").stdout


def test_queued_experiments_run_on_two_workers(reproduced, tmp_path):
    root, _, _ = _copy(reproduced, tmp_path)
    for count in (1, 3):
        _run(root, DVC, "exp", "run", "--queue", "-n", f"overlays{count}",
             "-S", f"product_lines.demo.report.overlays={count}")
    # the workers run on in the background (and stop when the queue is empty): they must not hold our pipes
    subprocess.run([DVC, "queue", "start", "-j", "2"], cwd=root, env=_env(root), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120, check=True)
    deadline = time.monotonic() + DVC_TIMEOUT_S
    while re.search(r"\b(Queued|Running)\b", status := _run(root, DVC, "queue", "status").stdout):
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert re.search(r"overlays1\s.*Success", status) and re.search(r"overlays3\s.*Success", status), status
    assert {"overlays1", "overlays3"} <= set(_run(root, DVC, "exp", "list", "--name-only").stdout.split())


def test_feature_code_edits_recompute_what_depends_on_them_and_comments_nothing(reproduced, tmp_path):
    # a comment-only edit reruns the stages that depend on the file (DVC hashes files) but recomputes nothing; a
    # behaviour-preserving statement edit recomputes every feature and rebuilds the template, saying why
    root, _, _ = _copy(reproduced, tmp_path)
    features_py = root / "hetmm" / "core" / "features.py"
    source = features_py.read_text()
    body = "    return F.normalize(features, p=2, dim=1)\n"
    assert body in source
    features_py.write_text(source.replace(body, "    # unit length: dot products are cosines\n" + body))
    _run(root, DVC, "repro", "report@demo")
    extract = json.loads((root / "reports/demo/extract.json").read_text())
    assert (extract["computed"], extract["reason"]) == (0, "feature settings and code unchanged")
    assert json.loads((root / "reports/demo/template.json").read_text())["action"] == "unchanged"
    features_py.write_text(source.replace(body, "    normalised = F.normalize(features, p=2, dim=1)\n"
                                                "    return normalised\n"))
    _run(root, DVC, "repro", "report@demo")
    extract = json.loads((root / "reports/demo/extract.json").read_text())
    assert extract["computed"] == 50 and extract["reused"] == 0 and extract["reason"] == "feature code changed"
    template = json.loads((root / "reports/demo/template.json").read_text())
    assert template["action"] == "rebuild" and template["reason"].startswith("feature code changed")


def test_another_machine_restores_every_artifact_from_the_team_remote(reproduced, tmp_path):
    # a fresh clone without a remote restores nothing but fails nothing (--allow-missing); with the team's remote
    # (a local folder here) `dvc pull` restores every artifact byte for byte
    root, _, downloads = _copy(reproduced, tmp_path)
    fresh = tmp_path / "fresh"
    _run(tmp_path, "git", "clone", "-q", str(root), str(fresh))
    for command in (("pull", "--allow-missing"), ("checkout", "--allow-missing")):
        _run(fresh, DVC, *command)
    assert not (fresh / "models/demo/template.pt").exists()
    _run(root, DVC, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    _run(root, DVC, "push")
    _commit(root, "team remote")
    teammate = tmp_path / "teammate"
    _run(tmp_path, "git", "clone", "-q", str(root), str(teammate))
    _run(teammate, DVC, "pull")
    for rel in ("models/demo/template.pt", "outputs/demo/maps.npy", "reports/demo/overlays/worst_defect_1.png"):
        assert (teammate / rel).read_bytes() == (root / rel).read_bytes(), rel
    # the same stages are stale as on the first machine, and no more
    stale = json.loads(_run(teammate, DVC, "status", "--json").stdout)
    assert set(stale) == set(json.loads(_run(root, DVC, "status", "--json").stdout))
    assert not {name for name in stale if name.endswith("@demo")} - downloads


HOSTILE = ["inj;touch M1", "inj$(touch M2)", "inj`touch M3`", "..", "a/../../b", "--help"]


def test_hostile_line_names_never_reach_a_shell_and_a_missing_source_keeps_the_data(repo_copy, tmp_path,
                                                                                     monkeypatch):
    root = repo_copy
    dvc = str(Path(sys.executable).with_name("dvc"))
    hetmm = [sys.executable, "-m", "hetmm.cli"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    demo = params["product_lines"]["demo"]
    src = tmp_path / "src"
    _run(root, *hetmm, "download", "demo", "-q")  # the demo images as a folder source
    shutil.copytree(root / "data" / "demo", src)
    (src / "manifest.csv").unlink()
    shutil.rmtree(root / "data" / "demo")
    params["product_lines"] = {"line": {**demo, "data": {"source": "folder", "path": str(src)}}}
    for name in HOSTILE:  # keys anyone could add to params.yaml (a pull request, `dvc exp run -S`)
        params["product_lines"][name] = {**demo, "data": {"source": "folder", "path": str(src)}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    set_dvc_lines(["line"], root / "dvc.yaml")
    _commit(root, "one folder line and hostile keys")

    # the hostile keys have no stages: DVC never builds a command from them
    listed = _run(root, dvc, "stage", "list").stdout
    assert "@line" in listed and not any(name in listed for name in HOSTILE)
    assert _run(root, dvc, "status").returncode == 0
    _run(root, dvc, "repro", "validate@line")
    for name in HOSTILE:
        refused = _run(root, *hetmm, "line", "add", "--path", str(src), "--", name, check=False)
        assert refused.returncode == 1 and "a line name is" in refused.stderr
    check = _run(root, *hetmm, "line", "check", "--json", check=False)
    assert check.returncode == 1 and sorted(json.loads(check.stdout)["unsafe_names"]) == sorted(HOSTILE)
    exp = _run(root, dvc, "exp", "run", "-S", "product_lines.inj;touch M4.data.seed=1", check=False)
    assert exp.returncode != 0 or "M4" not in exp.stdout
    assert not [p.name for p in root.rglob("M[0-9]")], "a line name ran as a shell command"

    # the folder source disappears (a typo, a teammate's machine): the stage fails naming both ways out; asked to,
    # it goes on with the copy DVC kept
    before = (root / "data" / "line" / "manifest.csv").read_bytes()
    shutil.move(src, tmp_path / "elsewhere")
    refused = _run(root, dvc, "repro", "download@line", check=False)
    assert refused.returncode != 0 and "HETMM_KEEP_COPY=1" in refused.stderr
    assert (root / "data" / "line" / "manifest.csv").read_bytes() == before
    monkeypatch.setenv("HETMM_KEEP_COPY", "1")
    kept = _run(root, dvc, "repro", "download@line")
    monkeypatch.delenv("HETMM_KEEP_COPY")
    assert "keeping the earlier copy" in kept.stderr + kept.stdout
    assert (root / "data" / "line" / "manifest.csv").read_bytes() == before
    # a source that is there but broken fails the stage, and still leaves the copy as it was
    shutil.move(tmp_path / "elsewhere", src)
    next((src / "train" / "good").iterdir()).write_bytes(b"")
    broken = _run(root, dvc, "repro", "download@line", check=False)
    assert broken.returncode != 0 and "empty" in broken.stderr
    assert (root / "data" / "line" / "manifest.csv").read_bytes() == before
    assert _run(root, dvc, "status", "download@line", check=False).returncode == 0


def test_a_new_lines_cached_outputs_are_git_ignored_before_dvc_lists_them():
    """A first run that fails after extract must not leave features/<line>/ for `git add -A` to commit; the
    line's committed records (settings, calibration, threshold) stay visible to git."""
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path]).returncode == 0

    assert all(ignored(f"{folder}/bolts/part.pt") for folder in ("data", "features", "outputs"))
    assert not any(ignored(f"models/bolts/{name}") for name in ("settings.yaml", "calibration.json", "threshold.json"))
    assert not ignored("reports/bolts/metrics.json")


def test_a_tfa_net_line_trains_in_dvc_with_dvclive_metrics_and_experiments(tmp_path):
    """A TFA-Net line runs its own chain (train, no template) under `dvc repro`; DVCLive's figures are DVC metrics
    and plots, and `dvc exp run -S` on a training param retrains and compares."""
    tiny = {"method": "tfa_net", "data": {"source": "demo", "seed": 0},
            "features": {"image_size": [128, 128]}, "report": {"overlays": 1, "ablation": False},
            "tfa_net": {"width": 32, "depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1, "steps": 10,
                        "logs": 2},
            "tune": {"max_validation": 3, "min_synthetic": 6}}
    root = _repo(tmp_path, {"tiny": tiny})
    dvc = str(Path(sys.executable).with_name("dvc"))
    first = _run(root, dvc, "repro")
    assert _ran(first.stdout) == {f"{s}@tiny" for s in stages_for("tfa_net")}
    assert json.loads((root / "reports/tiny/tfa_net.json").read_text())["action"] == "trained"
    metrics = json.loads(_run(root, dvc, "metrics", "show", "--json").stdout)
    figures = next(iter(metrics.values()))["data"]["reports/tiny/training/metrics.json"]["data"]
    assert figures["step"] == 1 and figures["train"]["loss"] > 0 and "image_auroc" in figures["val"]
    assert _ran(_run(root, dvc, "repro").stdout) == {"download@tiny"}  # nothing retrains
    # a comment in the network's code: DVC reruns the stage, the code key is unchanged, the model is kept
    net_code = root / "hetmm/core/tfa_net.py"
    net_code.write_text(net_code.read_text() + "\n# a comment changes no statement\n")
    assert "train@tiny" in _ran(_run(root, dvc, "repro").stdout)
    assert json.loads((root / "reports/tiny/tfa_net.json").read_text())["action"] == "unchanged"
    # a statement: the model's code key changes and it is retrained, with the reason recorded
    net_code.write_text(net_code.read_text() + "_UNUSED_CONSTANT = 1\n")
    _run(root, dvc, "repro")
    record = json.loads((root / "reports/tiny/tfa_net.json").read_text())
    assert record["action"] == "trained" and "code changed" in record["reason"]
    _commit(root, "tiny tfa line")
    _run(root, dvc, "exp", "run", "-S", "product_lines.tiny.tfa_net.steps=16", "-n", "longer")
    shown = json.loads(_run(root, dvc, "exp", "show", "--json").stdout)
    runs = [e for baseline in shown for e in (baseline.get("experiments") or [])]
    longer = next(r["revs"][0]["data"] for r in runs if r.get("name") == "longer")
    assert longer["params"]["params.yaml"]["data"]["product_lines"]["tiny"]["tfa_net"]["steps"] == 16
    assert "reports/tiny/training/metrics.json" in longer["metrics"]
    plots = _run(root, dvc, "plots", "diff", "longer", "--json", "--split").stdout
    assert "reports/tiny/training/plots/metrics/train/loss.tsv" in plots
