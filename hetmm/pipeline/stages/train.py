"""Stage ``train`` (``method: tfa_net`` lines only): fit TFA-Net on the line's good training images.

Reads the feature cache and the ``features`` / ``tfa_net`` / ``tune`` settings; writes ``models/<line>/tfa_net.pt``
(:mod:`hetmm.pipeline.tfa_model`), ``reports/<line>/tfa_net.json`` and the DVCLive folder ``reports/<line>/training/``
(training loss and validation figures at ``tfa_net.logs`` points, for ``dvc exp show`` and ``dvc plots``). The
validation normals (the calibration's held-out share) are never trained on: each point scores them and synthetic
defects made on them (no test image is read) and saves the training state atomically beside the model. A killed run
resumes from it when its key (settings, images, features, code) is unchanged and restarts otherwise; a model whose
key equals the current one is kept. Batches and masks come from per-epoch and per-step seeds, so a resumed run
computes what an uninterrupted one would.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hetmm.core.device import resolve_device
from hetmm.core.tfa_net import to_grid
from hetmm.data.splits import validation_split
from hetmm.errors import DataError
from hetmm.io import atomic_path, write_json_atomic
from hetmm.pipeline import deploy, tfa_model, tfa_training
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import StageRun, split, validated_manifest
from hetmm.pipeline.provenance import FeatureKey, tfa_code
from hetmm.pipeline.stages import require_method
from hetmm.pipeline.validation_set import tfa_validation, validation_features


def run(ctx: StageRun) -> dict:
    line, paths = ctx.line, ctx.paths
    require_method(line, "train")
    train = split(validated_manifest(paths, line.name), "train")
    tune = line.tune
    fit, normals = validation_split(list(train["sha256"]), tune.validation_share, tune.max_validation, tune.seed)
    if not normals:
        raise DataError(f"{paths.manifest}: line {line.name!r} has {len(fit)} training image(s); training holds "
                        "some out for validation and needs >= 2")
    key = tfa_model.model_key(line, fit)
    saved = tfa_model.read(paths.tfa_net)
    curves = paths.reports / "training"
    if saved is not None and saved["meta"].get("key") == key:
        tfa_model.finish_curves(curves, paths.tfa_net, key)
        info = {**saved["meta"]["record"], "content_hash": saved["meta"]["content_hash"], "action": "unchanged",
                "reason": "same settings, images and code"}
        write_json_atomic(paths.reports / "tfa_net.json", info)
        return info
    start = time.perf_counter()
    device = resolve_device(ctx.device)
    cfg = line.tfa_net.resolved(line.features)
    cache = FeatureCache(paths.features, FeatureKey.of(line.features))
    grids = to_grid(cache.load(fit)[0], cfg["grid"])
    chosen = tfa_training.template_index(grids, cfg)
    template = grids[chosen : chosen + 1].clone()
    net, optimiser = tfa_training.initial(grids, cfg, device)
    resume = tfa_model.resume_path(paths.tfa_net)
    state = tfa_model.resume_state(resume, key)
    if state is not None:
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
    done = state["step"] if state is not None else 0
    validation = validation_features(line, paths, cache, train, normals, device)
    from dvclive import Live  # imported here: the stage's only use of it

    # dvcyaml/save_dvc_exp off: dvc.yaml declares the metrics and plots and DVC records the experiment. A resumed
    # run rewrites the log from its saved history (beside the previous curves, kept until this run has a model)
    live = Live(str(deploy.staging_folder(curves)), dvcyaml=None, save_dvc_exp=False, report=None)
    history = state["history"] if state is not None else []
    for figures in history:
        _log(live, figures)
    steps, per_epoch, _ = tfa_training.schedule(len(grids), cfg)
    tick = tfa_model.check_schedule(line.name, cfg, per_epoch, steps)

    def point(step: int, losses: list[float]) -> None:
        figures = {"train/loss": float(np.mean(losses)), "epoch": step / per_epoch,
                   **tfa_validation(line, net, template, device, validation)}
        history.append(figures)
        _log(live, figures)
        with atomic_path(resume) as tmp:
            torch.save({"key": key, "step": step, "net": net.state_dict(), "optimiser": optimiser.state_dict(),
                        "history": history}, tmp)

    tfa_training.fit(net, optimiser, grids, template.to(device), cfg, done, point, f"train {line.name}",
                     ctx.progress, on_pace=lambda ran, left: tfa_model.say_pace(line.name, tick, ran, left))
    live.end()
    record = {"kind": "tfa_net", "sheets": 1, "action": "resumed" if state is not None else "trained",
              "reason": f"resumed after step {done}" if state is not None else _why_train(saved),
              "steps": steps, "epochs": round(steps / per_epoch, 2), "train_images": len(fit),
              "validation_normals": len(normals),
              "template_image": str(train.set_index("sha256").loc[fit[chosen], "path"]),
              "parameters": sum(p.numel() for p in net.parameters()), "final": history[-1] if history else {},
              "seconds": round(time.perf_counter() - start, 2), "device": str(device), "settings": cfg}
    meta = tfa_model.save_model(paths.tfa_net, net, template, {
        "key": key, "features": FeatureKey.of(line.features).record(), "code": tfa_code(), "record": record})
    tfa_model.finish_curves(curves, paths.tfa_net, key)
    info = {**record, "content_hash": meta["content_hash"]}
    write_json_atomic(paths.reports / "tfa_net.json", info)
    return info


def _log(live, figures: dict[str, float]) -> None:
    for name, value in figures.items():
        live.log_metric(name, round(value, 6))
    live.next_step()


def _why_train(saved: dict | None) -> str:
    return "no previous model" if saved is None else "settings, training images or code changed"
