"""Matching distances of a product line's test images, kept so that a grown ALL template re-matches only its
new sheets.

Every forward, backward and nearest-patch distance is a minimum over the template sheets, and an ALL template
grows by appending sheets (:func:`hetmm.core.templates.hot_update`). So the distances to the grown template are the
elementwise minimum of the stored distances to the old sheets and fresh distances to the appended ones
(:meth:`hetmm.core.scoring.LayerMatches.merged`), equal to a full re-match up to float rounding. Fusion, blur and image
scores are recomputed from the distances, so a change of alphas, layer weights or post-processing re-matches
nothing at all.

Stored distances are trusted only when everything they depend on is unchanged: the feature key (settings and
code), the match plan (layers, windows, mode), the template dtype, the matching and template code
(:mod:`hetmm.pipeline.provenance`), and the template's sheets, which for ALL are the cached features of its
``sources`` in order. Anything else, a torn file included, means a full re-match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from hetmm.core.scoring import LayerMatches, LayerPlan
from hetmm.core.templates import TemplateSet
from hetmm.io import atomic_path
from hetmm.modes import TemplateKind
from hetmm.pipeline import provenance
from hetmm.pipeline.provenance import FeatureKey

# per image: (forward, backward) distances [h_j, w_j] of each planned layer, None for a direction not computed
Entry = tuple[list[torch.Tensor | None], list[torch.Tensor | None]]
_KEY_NAMES = {"feature": "features (settings or code)", "code": "matching code", "template_code": "template code"}


class MatchCache:
    """This run's distances per test image (sha256), plus the reusable part of an earlier run's.

    ``plan``: :func:`hetmm.core.scoring.match_plan` of the current settings; ``key``: what the distances depend on
    besides the template's sheets (feature key, plan geometry, dtype, code).
    """

    def __init__(self, template: TemplateSet, plan: Sequence[LayerPlan], features: FeatureKey):
        self.plan = list(plan)
        self.key: dict[str, Any] = {"feature": features.digest, "plan": [list(p.geometry) for p in plan],
                                    "dtype": str(template.layers[0].dtype), "code": provenance.match_code(),
                                    "template_code": provenance.template_code()}
        self.kind = template.meta.get("kind")
        self.sources = list(template.meta.get("sources", []))
        self.sheets = int(template.layers[0].shape[0])
        self.entries: dict[str, Entry] = {}
        self.previous: dict[str, Entry] = {}
        self.reuse = 0  # leading template sheets that the previous entries cover
        self.reason = "no stored matches"
        self.reused_images = 0

    def resume(self, path: str | Path) -> None:
        """Take the reusable part of the matches stored at ``path``; ``reason`` says why not, if not."""
        path = Path(path)
        if not path.is_file():
            return
        try:
            item = torch.load(path, map_location="cpu", weights_only=True)
            key, sources = item["key"], list(item["sources"])
            previous = {sha: ([None if t is None else t[i] for t in item["forward"]],
                              [None if t is None else t[i] for t in item["backward"]])
                        for i, sha in enumerate(item["shas"])}
        except Exception as exc:  # a torn or foreign file is re-computed, never trusted
            self.reason = f"stored matches unreadable ({type(exc).__name__})"
            return
        if self.kind != TemplateKind.ALL:
            self.reason = "a PTS template changes its sheets on every update"
        elif key != self.key:
            changed = sorted(_KEY_NAMES.get(k, k) for k in {*key, *self.key} if key.get(k) != self.key.get(k))
            self.reason = f"changed since the stored matches: {', '.join(changed)}"
        elif not sources or self.sources[: len(sources)] != sources:
            self.reason = "the template is not the stored matches' template plus new sheets"
        else:
            self.previous, self.reuse = previous, len(sources)
            added = self.sheets - self.reuse
            self.reason = (f"matched the {added} new sheet(s) only" if added else
                           "template unchanged: distances reused, fusion and post-processing recomputed")

    def lookup(self, shas: Sequence[str], device: torch.device) -> LayerMatches | None:
        """Stored distances of ``shas`` to the first :attr:`reuse` sheets, or None unless all are stored."""
        if not self.previous or any(sha not in self.previous for sha in shas):
            return None
        self.reused_images += len(shas)

        def stack(direction: int, layer: int) -> torch.Tensor | None:
            rows = [self.previous[sha][direction][layer] for sha in shas]
            return None if rows[0] is None else torch.stack(rows).to(device)

        n = len(self.plan)
        return LayerMatches([stack(0, i) for i in range(n)], [stack(1, i) for i in range(n)], list(self.plan),
                            len(shas))

    def add(self, shas: Sequence[str], matches: LayerMatches) -> None:
        if self.kind != TemplateKind.ALL:  # never reused, so not kept
            return
        for i, sha in enumerate(shas):
            self.entries[sha] = ([None if t is None else t[i].float().cpu() for t in matches.forward],
                                 [None if t is None else t[i].float().cpu() for t in matches.backward])

    def summary(self) -> dict[str, Any]:
        if self.reused_images:
            return {"images_reused": self.reused_images, "sheets_matched": self.sheets - self.reuse,
                    "reason": self.reason}
        reason = "no test image was in the stored matches" if self.previous else self.reason
        return {"images_reused": 0, "sheets_matched": self.sheets, "reason": reason}

    def save(self, path: str | Path) -> None:
        """This run's distances, atomically (only ALL templates: PTS distances are never reused)."""
        shas = list(self.entries)
        if not shas:
            Path(path).unlink(missing_ok=True)
            return
        first = self.entries[shas[0]]

        def stacked(direction: int) -> list[torch.Tensor | None]:
            return [None if first[direction][i] is None else
                    torch.stack([self.entries[sha][direction][i] for sha in shas])
                    for i in range(len(first[direction]))]

        with atomic_path(path) as tmp:
            torch.save({"key": self.key, "sources": self.sources, "shas": shas,
                        "forward": stacked(0), "backward": stacked(1)}, tmp)
