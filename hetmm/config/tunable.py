"""The keys the label-free tuner may choose, defined once with the values it tries.

Contract: :data:`TUNABLE_KEYS` maps each dotted key, in the order the search settles them, to a :class:`TunableKey`:
the values tried (a per-layer key tries each value at one layer at a time), and the phase of the search
(:mod:`hetmm.pipeline.tuning`) that settles it. A key is tuned unless the line's entry sets it; ``auto`` (:data:`AUTO`)
leaves it open explicitly. Every option is a valid value of its key (``tests/test_config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hetmm.modes import MatchMode, TemplateKind

AUTO = "auto"  # a tunable key's value that leaves it to the tuner (so `dvc exp run -S` can set every key)


@dataclass(frozen=True)
class TunableKey:
    options: tuple[Any, ...]  # the values tried (per layer: at each layer in turn)
    # matching: searched on the starting features and again on the chosen ones; features: searched once between;
    # layers: what the search weighted 0 is dropped; templates: fixed first, from the measured speed
    phase: Literal["matching", "features", "layers", "templates"]
    per_layer: bool = False


_WINDOWS = (1, 3, 5, 7)
TUNABLE_KEYS: dict[str, TunableKey] = {
    "matching.mode": TunableKey((MatchMode.MUTUAL, MatchMode.FORWARD, MatchMode.BACKWARD, MatchMode.PATCH),
                                "matching"),
    "matching.forward_windows": TunableKey(_WINDOWS, "matching", per_layer=True),
    "matching.backward_windows": TunableKey(_WINDOWS, "matching", per_layer=True),
    "matching.alphas": TunableKey((0.25, 0.5, 0.75), "matching", per_layer=True),
    "matching.weights": TunableKey((0.0, 0.5, 1.0), "matching", per_layer=True),
    "post.blur_sigma": TunableKey((0.0, 1.0, 2.0, 4.0, 8.0), "matching"),
    # sides above the images' own are not tried (but the first always is)
    "features.image_size": TunableKey(((256, 256), (320, 320), (384, 384)), "features"),
    "features.backbone": TunableKey(("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"), "features"),
    "features.pool": TunableKey((1, 3), "features"),
    "features.normalisation": TunableKey(("imagenet", "image"), "features"),
    "features.layers": TunableKey((), "layers"),  # the layers weighted 0 are not extracted
    # the first when it meets the throughput floor with every training image, else the second with the largest
    # templates.size that does (the last when none does)
    "templates.kind": TunableKey((TemplateKind.ALL, TemplateKind.PTS), "templates"),
    "templates.size": TunableKey((200, 100, 60, 40, 20, 10), "templates"),
}
TUNABLE = tuple(TUNABLE_KEYS)


def phase_keys(phase: str) -> tuple[str, ...]:
    """The keys a phase of the search settles, in order."""
    return tuple(key for key, spec in TUNABLE_KEYS.items() if spec.phase == phase)
