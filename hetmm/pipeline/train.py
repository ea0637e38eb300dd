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
from tqdm import tqdm

from hetmm.core.device import resolve_device
from hetmm.core.metrics import image_auroc, pixel_auroc
from hetmm.core.tfa_inspector import TFAInspector
from hetmm.core.tfa_net import NetShape, TFANet, loss, medoid, random_mask, to_grid
from hetmm.data.splits import validation_split
from hetmm.errors import DataError
from hetmm.io import atomic_path, write_json_atomic
from hetmm.pipeline import deploy, require_method, tfa_model
from hetmm.pipeline.feature_cache import FeatureCache
from hetmm.pipeline.line import StageRun, split, validated_manifest
from hetmm.pipeline.provenance import FeatureKey, tfa_code
from hetmm.pipeline.validation_set import validation_features


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
    chosen = medoid(grids) if cfg["template"] == "medoid" else 0
    template = grids[chosen : chosen + 1].clone()
    torch.manual_seed(cfg["seed"])
    net = TFANet(NetShape(int(grids.shape[1]), cfg["grid"], cfg["patch"], cfg["width"], cfg["depth"], cfg["heads"],
                          cfg["decoder_width"], cfg["decoder_depth"])).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
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
    size, seed = cfg["batch_size"], cfg["seed"] << 32
    per_epoch = -(-len(grids) // size)
    steps = cfg["steps"] or cfg["epochs"] * per_epoch
    tick = tfa_model.check_schedule(line.name, cfg, per_epoch, steps)
    every, running = -(-steps // cfg["logs"]), []
    template_dev = template.to(device)
    net.train()
    for step in tqdm(range(done, steps), desc=f"train {line.name}", unit="step", initial=done, total=steps,
                     disable=not ctx.progress):
        # the order of each epoch and the mask of each step come from their own seeds: a resumed run draws the
        # same batches an uninterrupted one would
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(grids), generator=torch.Generator().manual_seed(seed + epoch))
        query = grids[order[offset * size : (offset + 1) * size]].to(device)
        generator = torch.Generator().manual_seed(seed + (1 << 31) + step)
        mask = random_mask(len(query), net.tokens, cfg["mask_ratio"], generator, device)
        batch_loss = loss(net(query, template_dev, mask), query, cfg["cos_weight"])
        optimiser.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimiser.step()
        running.append(float(batch_loss.detach()))
        if step == done + 2:  # the first steps' pace, before the long part starts
            tfa_model.say_pace(line.name, tick, 3, steps - step - 1)
        if (step + 1) % every and step + 1 < steps:
            continue
        figures = {"train/loss": float(np.mean(running)), "epoch": (step + 1) / per_epoch,
                   **_validate(line, net, template, device, validation)}
        net.train()
        running = []
        history.append(figures)
        _log(live, figures)
        with atomic_path(resume) as tmp:
            torch.save({"key": key, "step": step + 1, "net": net.state_dict(), "optimiser": optimiser.state_dict(),
                        "history": history}, tmp)
    live.end()
    record = {"kind": "tfa_net", "sheets": 1, "action": "resumed" if state is not None else "trained",
              "reason": f"resumed after step {done}" if state is not None else _why_train(saved),
              "steps": steps, "epochs": round(steps / per_epoch, 2), "train_images": len(fit), "validation_normals": len(normals),
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


def _validate(line, net: TFANet, template: torch.Tensor, device, validation: dict) -> dict[str, float]:
    """Validation loss on the normals (unmasked) and image / pixel AUROC on normals + synthetic defects."""
    scorer = TFAInspector(line, net, template, "", device)
    good_layers, good_boxes = validation["good"]
    raw = scorer.match(good_layers)  # the per-pixel loss: its mean is the validation loss
    outs = [scorer.finish(raw, good_boxes)] + [scorer.score_features(f, b) for f, b in validation["defects"]]
    scores = torch.cat([o.scores for o in outs]).numpy()
    maps = torch.cat([o.maps for o in outs]).numpy()
    n = len(good_boxes)
    masks = np.concatenate([np.zeros((n, *validation["masks"].shape[1:]), dtype=bool), validation["masks"]])
    return {"val/loss": float(raw.mean()), "val/image_auroc": image_auroc(scores, np.arange(len(scores)) >= n),
            "val/pixel_auroc": pixel_auroc(maps, masks)}
