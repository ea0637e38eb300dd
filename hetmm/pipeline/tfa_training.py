"""TFA-Net's training: the template image, the seeded initial network and the step loop, nothing else.

What a trained model's weights depend on lives here (with :mod:`hetmm.core.tfa_net`), so its code digest
(:func:`hetmm.pipeline.provenance.tfa_code`) retrains a model exactly when the weights could change; the train stage
around it (validation figures, DVCLive, resume files, records) can change without retraining anything.

Batches and masks come from per-epoch and per-step seeds, so a run resumed at a log point computes what an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from hetmm.core.tfa_net import NetShape, TFANet, loss, medoid, random_mask

PACE_STEPS = 3  # steps timed before a training says how long the rest will take


def template_index(grids: torch.Tensor, cfg: dict[str, Any]) -> int:
    """Which training image ``[N, C, G, G]`` is the template (``tfa_net.template``: medoid or first)."""
    return medoid(grids) if cfg["template"] == "medoid" else 0


def initial(grids: torch.Tensor, cfg: dict[str, Any], device: torch.device) -> tuple[TFANet, torch.optim.Optimizer]:
    """The seeded network for grids ``[N, C, G, G]`` and its Adam optimiser (``cfg``: resolved ``tfa_net``)."""
    torch.manual_seed(cfg["seed"])
    net = TFANet(NetShape(int(grids.shape[1]), cfg["grid"], cfg["patch"], cfg["width"], cfg["depth"], cfg["heads"],
                          cfg["decoder_width"], cfg["decoder_depth"])).to(device)
    return net, torch.optim.Adam(net.parameters(), lr=cfg["lr"])


def schedule(images: int, cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(steps in all, steps per epoch, steps between log points) for ``images`` training images."""
    per_epoch = -(-images // cfg["batch_size"])
    steps = cfg["steps"] or cfg["epochs"] * per_epoch
    return steps, per_epoch, -(-steps // cfg["logs"])


def fit(net: TFANet, optimiser: torch.optim.Optimizer, grids: torch.Tensor, template: torch.Tensor,
        cfg: dict[str, Any], done: int, on_point: Callable[[int, list[float]], None], desc: str,
        progress: bool = True, on_pace: Callable[[int, int], None] | None = None) -> None:
    """Train from step ``done`` to the end of the schedule; at every log point (and the last step) call
    ``on_point(steps_done, batch_losses_since_the_last_point)`` with the network in train mode again after it, and
    once, after this run's first ``PACE_STEPS`` steps, ``on_pace(steps_run, steps_left)`` (an estimate's input)."""
    device = template.device
    steps, per_epoch, every = schedule(len(grids), cfg)
    size, seed = cfg["batch_size"], cfg["seed"] << 32
    running: list[float] = []
    net.train()
    for step in tqdm(range(done, steps), desc=desc, unit="step", initial=done, total=steps, disable=not progress):
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(grids), generator=torch.Generator().manual_seed(seed + epoch))
        query = grids[order[offset * size : (offset + 1) * size]].to(device)
        generator = torch.Generator().manual_seed(seed + (1 << 31) + step)
        mask = random_mask(len(query), net.tokens, cfg["mask_ratio"], generator, device)
        batch_loss = loss(net(query, template, mask), query, cfg["cos_weight"])
        optimiser.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimiser.step()
        running.append(float(batch_loss.detach()))
        if on_pace is not None and step + 1 == done + PACE_STEPS:
            on_pace(PACE_STEPS, steps - step - 1)
        if (step + 1) % every and step + 1 < steps:
            continue
        on_point(step + 1, running)
        net.train()
        running = []
