"""TFA-Net (``method: tfa_net``): the network, a real training run on the demo line, resume, keys and the CLI.

The training runs are tiny (128 px, a 64-wide network, a few epochs) but real: the loss must fall and the trained
model must find the demo line's defects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_stages, write_params
from hetmm.core.tfa_net import NetShape, TFANet, error_maps, medoid, random_mask, to_grid
from hetmm.errors import ConfigError, TemplateMismatchError
from hetmm.pipeline.stages import stages_for

pytestmark = pytest.mark.slow  # real TFA-Net trainings

TINY = {"width": 64, "depth": 2, "heads": 4, "decoder_width": 64, "decoder_depth": 1, "batch_size": 8}


def tfa_line(steps: int = 30, logs: int = 6, **net) -> dict:
    return {"method": "tfa_net", "data": {"source": "demo", "seed": 0},
            "features": {"backbone": "efficientnet_lite0", "layers": [1, 2, 3], "image_size": [128, 128]},
            "tfa_net": {**TINY, "steps": steps, "logs": logs, **net},
            "tune": {"max_validation": 4, "min_synthetic": 8},
            "report": {"overlays": 2, "ablation": True}}


def test_network_shapes_grid_and_masking():
    layers = [torch.randn(2, 8, 16, 16), torch.randn(2, 4, 8, 8)]
    grid = to_grid(layers, 16)
    assert grid.shape == (2, 12, 16, 16) and torch.equal(grid[:, :8], layers[0])
    net = TFANet(NetShape(channels=12, grid=16, patch=4, width=32, depth=1, heads=2, decoder_width=16,
                          decoder_depth=1))
    out = net(grid, grid[:1], random_mask(2, net.tokens, 0.5))
    assert out.shape == grid.shape and net.tokens == 16
    mask = random_mask(3, 16, 0.25)
    assert mask.shape == (3, 16) and mask.sum(dim=1).tolist() == [4, 4, 4]
    assert random_mask(3, 16, 0.0) is None
    assert torch.allclose(error_maps(grid, grid, 5.0), torch.zeros(2, 16, 16), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch"):
        TFANet(NetShape(channels=12, grid=10, patch=4))


def test_medoid_is_the_most_central_image():
    base = torch.randn(1, 4, 8, 8)
    grids = torch.cat([base + 3.0, base, base - 3.0, base + 0.5])  # index 1 lies between all the others
    assert medoid(grids) == 1


def test_config_presets_and_errors(tmp_path):
    params = write_params(tmp_path, {"a": tfa_line(), "b": {**tfa_line(), "tfa_net": {"preset": "paper"}},
                                     "c": {**tfa_line(), "tfa_net": {"patch": 5}},
                                     "d": {**tfa_line(), "tfa_net": {"mask_ratio": 1.0}}})
    a, b = params.line("a"), params.line("b")
    assert a.tfa_net.resolved(a.features)["grid"] == 32 and a.tunable() == ()
    assert b.tfa_net.resolved(b.features)["width"] == 768 and b.tfa_net.resolved(b.features)["epochs"] == 400
    with pytest.raises(ConfigError, match=r"product_lines\.c\.tfa_net\.grid"):
        params.line("c")
    with pytest.raises(ConfigError, match=r"product_lines\.d\.tfa_net\.mask_ratio"):
        params.line("d")
    assert "train" in stages_for("tfa_net") and "template" not in stages_for("tfa_net")
    assert "template" in stages_for("hetmm") and "train" not in stages_for("hetmm")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tfa")
    params = write_params(root, {"line": tfa_line()})
    return root, run_stages(params, "line", root, stages_for("tfa_net"))


def test_training_lowers_the_loss_and_the_model_finds_the_demo_defects(trained):
    root, out = trained
    record = out["train"]
    assert record["action"] == "trained" and record["steps"] == 30
    curve = [float(line.split("\t")[1]) for line in
             (root / "reports/line/training/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve
    evaluation = json.loads((root / "reports/line/evaluation.json").read_text())
    assert evaluation["image_auroc"] >= 85.0 and evaluation["pixel_auroc"] >= 90.0, evaluation
    summary = json.loads((root / "reports/line/training/metrics.json").read_text())
    assert summary["step"] == 5 and 0 <= summary["val"]["image_auroc"] <= 100 and summary["epoch"] == 10
    # the report puts HETMM beside it on the same features, and the threshold names the model it was chosen for
    rows = (root / "reports/line/ablation.csv").read_text().splitlines()
    assert rows[1].startswith("method=tfa_net,") and rows[2].startswith("method=hetmm template=ALL,")
    threshold = json.loads((root / "models/line/threshold.json").read_text())
    assert threshold["model_hash"] == record["content_hash"]
    card = json.loads((root / "reports/line/model_card.json").read_text())
    assert (card["method"] == "tfa_net" and card["template"]["kind"] == "tfa_net"
            and card["title"] == "TFA-Net model card")


def test_unchanged_training_is_kept_and_other_features_are_refused(trained, tmp_path):
    from hetmm.pipeline.tfa_model import load_model

    root, out = trained
    params = write_params(root, {"line": tfa_line()})
    again = run_stages(params, "line", root, ("train",))["train"]
    assert again["action"] == "unchanged" and again["content_hash"] == out["train"]["content_hash"]
    other = write_params(tmp_path, {"line": {**tfa_line(), "features": {**tfa_line()["features"], "pool": 3}}})
    with pytest.raises(TemplateMismatchError, match=r"feature settings changed \(pool\).*dvc repro train@line"):
        load_model(other.line("line"), root / "models/line/tfa_net.pt")


def test_predict_and_update_on_a_tfa_line(trained, tmp_path):
    from hetmm.pipeline.line import LinePaths
    from hetmm.pipeline.predict import predict_images, update_template

    root, out = trained
    params = write_params(root, {"line": tfa_line()})
    line, paths = params.line("line"), LinePaths.for_line("line", root)
    images = sorted((root / "data/line/test").rglob("*.png"))[:3]
    summary = predict_images(line, paths, images, tmp_path / "pred", device="cpu", progress=False)
    assert summary["images"] == 3 and summary["method"] == "tfa_net"
    assert summary["model_hash"] == out["train"]["content_hash"]
    assert len(list((tmp_path / "pred/overlays").glob("*.png"))) == 3
    with pytest.raises(ConfigError, match=r"product_lines\.line\.method: tfa_net .* train@line"):
        update_template(line, paths, images[:1], device="cpu")


def test_train_refuses_a_hetmm_line(tmp_path):
    params = write_params(tmp_path, {"h": {"data": {"source": "demo"}, "tune": {"enabled": False}}})
    with pytest.raises(ConfigError, match=r"product_lines\.h\.method: the train stage is for method tfa_net"):
        run_stages(params, "h", tmp_path, ("train",))
    params = write_params(tmp_path, {"t": tfa_line()})
    with pytest.raises(ConfigError, match=r"product_lines\.t\.method: the template stage .* `hetmm train t`"):
        run_stages(params, "t", tmp_path, ("template",))


def _state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def test_a_killed_training_resumes_to_the_same_model_and_a_changed_one_restarts(trained, tmp_path):
    """Kill ``hetmm train`` after its second validation point; the rerun resumes and ends with the weights an
    uninterrupted run has. A resume state made with other settings is discarded, and so is a torn one."""
    root, _ = trained
    for name in ("straight", "killed"):
        target = tmp_path / name
        (target / "data").mkdir(parents=True)
        (target / "features").mkdir()
        os.symlink(root / "data/line", target / "data/line")
        os.symlink(root / "features/line", target / "features/line")
        (target / "reports/line").mkdir(parents=True)
        (target / "reports/line/validation.json").write_text((root / "reports/line/validation.json").read_text())
        write_params(target, {"line": tfa_line(steps=60, logs=12)})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both runs: bitwise equal arithmetic
    cmd = [str(Path(sys.executable).with_name("hetmm")), "train", "line", "--quiet", "--device", "cpu", "--json"]
    subprocess.run(cmd, cwd=tmp_path / "straight", env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    state = killed / "models/line/.tfa_net.resume.pt"
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from hetmm.pipeline.tfa_model import read_state

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        body = read_state(state) if state.is_file() else None
        if body is not None and body["step"] >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the training finished before it could be killed"
    assert not (killed / "models/line/tfa_net.pt").exists()  # nothing half-written a later run would trust
    done = subprocess.run(cmd, cwd=killed, env=env, check=True, capture_output=True, text=True, timeout=600)
    record = json.loads(done.stdout)
    assert record["action"] == "resumed" and not state.exists()
    a, b = _state_dict(tmp_path / "straight/models/line/tfa_net.pt"), _state_dict(killed / "models/line/tfa_net.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = (killed / "reports/line/training/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    assert [int(s.split("\t")[0]) for s in steps] == list(range(12))  # every epoch logged once

    from hetmm.pipeline.tfa_model import resume_path

    for bad in (b"torn", None):
        path = resume_path(killed / "models/line/tfa_net.pt")
        if bad is None:  # a state from other settings (another learning rate)
            write_params(killed, {"line": tfa_line(steps=60, logs=12, lr=3e-4)})
            torch.save({"key": "other", "step": 10, "net": {}, "optimiser": {}, "history": []}, path)
        else:
            path.write_bytes(bad)
            (killed / "models/line/tfa_net.pt").unlink()
        out = subprocess.run(cmd, cwd=killed, env=env, check=True, capture_output=True, text=True, timeout=600)
        assert json.loads(out.stdout)["action"] == "trained"


def test_line_add_wires_a_tfa_net_line_into_its_own_stages(tmp_path):
    import shutil

    import yaml

    from conftest import REPO
    from hetmm.pipeline.lines import add_line, check_lines, dvc_line_methods

    dvc, params = tmp_path / "dvc.yaml", tmp_path / "params.yaml"
    shutil.copy(REPO / "dvc.yaml", dvc)
    write_params(tmp_path, {"demo": {"data": {"source": "demo"}}})
    from hetmm.pipeline.lines import set_dvc_lines

    set_dvc_lines({"demo": "hetmm"}, dvc)
    entry = add_line("bolts", {"source": "demo"}, params, dvc, "tfa_net")["entry"]
    assert entry["method"] == "tfa_net" and "auto" not in json.dumps(entry)  # nothing for the tuner to choose
    assert dvc_line_methods(dvc) == {"demo": "hetmm", "bolts": "tfa_net"}
    stages = yaml.safe_load(dvc.read_text())["stages"]
    assert stages["train"]["foreach"] == ["bolts"] and stages["template"]["foreach"] == ["demo"]
    assert stages["infer"]["foreach"] == {"demo": "template", "bolts": "tfa_net"}
    assert check_lines(params, dvc) == {"not_in_dvc_yaml": [], "not_in_params_yaml": [],
                                        "other_method_in_dvc_yaml": [], "unsafe_names": []}
    set_dvc_lines({"demo": "hetmm", "bolts": "hetmm"}, dvc)
    assert check_lines(params, dvc)["other_method_in_dvc_yaml"] == ["bolts"]
    with pytest.raises(ConfigError, match=r"product_lines\.x\.method: 'trained' is not one of"):
        add_line("x", {"source": "demo"}, params, dvc, "trained")
