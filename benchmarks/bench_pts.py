"""PTS speed: batched OPTICS + selection (hetmm.core.templates) against the official per-pixel path.

The official code runs scikit-learn OPTICS once per pixel with a Python callable metric
(``lambda a, b: 1 - a.b``) and ``min_samples = N // K``. Both paths get the same clustered unit
vectors. The official path is timed on a few pixels (its per-pixel cost is flat), ours on a full
grid; labels and prototypes are compared on the pixels both ran.

    .venv/bin/python benchmarks/bench_pts.py            # writes benchmarks/results/pts.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.cluster import OPTICS

from hetmm.core.templates import build_pts, optics_labels, select_prototypes
from hetmm.io import write_json_atomic

RESULTS = Path(__file__).parent / "results" / "pts.json"


def clustered(n: int, c: int, side: int, seed: int) -> torch.Tensor:
    """``[N, C, side, side]`` unit vectors: per pixel 6 modes with noise, 2% of images duplicated."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, c, side, side, generator=gen)
    mode = torch.randint(0, 6, (n,), generator=gen)
    x = centres[mode] + 0.7 * torch.randn(n, c, side, side, generator=gen)
    copies = max(1, n // 50)
    x[torch.randint(0, n, (copies,), generator=gen)] = x[torch.randint(0, n, (copies,), generator=gen)]
    return torch.nn.functional.normalize(x, dim=1)


def reference_selection(x: np.ndarray, labels: np.ndarray, k: int) -> list[int]:
    """Per-pixel PTS selection written out as the official kernels describe it (spec §5)."""
    gram = x @ x.T
    clusters = list(dict.fromkeys(int(v) for v in labels if v >= 0))
    picked = []
    for label in clusters[:k]:
        members = np.flatnonzero(labels == label)
        picked.append(int(members[np.argmax(gram[np.ix_(members, members)].sum(1))]))
    if not clusters:
        picked.append(int(np.argmax(gram.sum(1))))
    acc = x[picked].sum(0)
    while len(picked) < min(len(x), k):
        free = [i for i in range(len(x)) if i not in picked]
        best = free[int(np.argmin(x[free] @ acc))]
        picked.append(best)
        acc = acc + x[best]
    return picked


def run(n: int, c: int, k: int, side: int, official_pixels: int, seed: int) -> dict:
    feats = clustered(n, c, side, seed)
    pixels = side * side
    min_samples = max(2, n // k)
    probe = [(p // side, p % side) for p in np.linspace(0, pixels - 1, official_pixels).astype(int)]

    # Official: sklearn OPTICS per pixel, Python callable metric (brute force since C > 15).
    official_labels, t_official = [], 0.0
    for i, j in probe:
        x = feats[:, :, i, j].numpy()
        start = time.perf_counter()
        official_labels.append(OPTICS(min_samples=min_samples, metric=lambda a, b: 1 - np.dot(a, b)).fit(x).labels_)
        t_official += time.perf_counter() - start
    # sklearn with a precomputed distance matrix, for scale (spec §5: about 5x).
    start = time.perf_counter()
    for i, j in probe:
        x = feats[:, :, i, j].double().numpy()
        OPTICS(min_samples=min_samples, metric="precomputed").fit(np.maximum(0.0, 1.0 - x @ x.T))
    t_precomputed = time.perf_counter() - start

    start = time.perf_counter()
    labels = optics_labels(feats, k)
    t_optics = time.perf_counter() - start
    start = time.perf_counter()
    sheets = select_prototypes(feats, labels, k)
    t_select = time.perf_counter() - start
    start = time.perf_counter()
    tset = build_pts([feats], k, [str(i) for i in range(n)], {}, progress=False)
    t_build = time.perf_counter() - start

    labels_equal = all(np.array_equal(labels[:, i, j].numpy(), ref) for (i, j), ref in zip(probe, official_labels))
    protos_equal = all(
        torch.equal(sheets[:, :, i, j], feats[reference_selection(feats[:, :, i, j].double().numpy(), ref, k), :, i, j])
        for (i, j), ref in zip(probe, official_labels)
    )
    official_px = t_official / official_pixels
    ours_px = t_optics / pixels
    return {
        "N": n, "C": c, "K": k, "grid": [side, side], "min_samples": min_samples,
        "official_pixels_timed": official_pixels,
        "official_optics_ms_per_pixel": 1e3 * official_px,
        "sklearn_precomputed_ms_per_pixel": 1e3 * t_precomputed / official_pixels,
        "ours_optics_ms_per_pixel": 1e3 * ours_px,
        "ours_select_ms_per_pixel": 1e3 * t_select / pixels,
        "ours_build_pts_ms_per_pixel": 1e3 * t_build / pixels,
        "speedup_optics": official_px / ours_px,
        "speedup_build_vs_official_optics": official_px / (t_build / pixels),
        "labels_identical": labels_equal,
        "prototypes_identical": protos_equal and torch.equal(tset.layers[0], sheets),
        "official_extrapolated_s_for_grid": official_px * pixels,
        "ours_build_s_for_grid": t_build,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32, help="grid side for our path (side x side pixels)")
    parser.add_argument("--official-pixels", type=int, default=16)
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [(200, 112), (200, 24), (100, 64)]
    with np.errstate(divide="ignore"):  # sklearn divides by zero reachabilities (duplicated images)
        rows = [run(n, c, args.k, args.side, args.official_pixels, seed) for seed, (n, c) in enumerate(configs)]
    print(f"{'N':>4} {'C':>4} {'official':>10} {'precomp':>9} {'optics':>8} {'select':>8} {'build':>8} "
          f"{'speedup':>8} {'labels':>7} {'protos':>7}   (ms per pixel)")
    for r in rows:
        print(f"{r['N']:4d} {r['C']:4d} {r['official_optics_ms_per_pixel']:10.1f} "
              f"{r['sklearn_precomputed_ms_per_pixel']:9.1f} "
              f"{r['ours_optics_ms_per_pixel']:8.3f} {r['ours_select_ms_per_pixel']:8.3f} "
              f"{r['ours_build_pts_ms_per_pixel']:8.3f} "
              f"{r['speedup_optics']:7.0f}x {str(r['labels_identical']):>7} {str(r['prototypes_identical']):>7}")
    write_json_atomic(RESULTS, {
        "benchmark": "pts",
        "command": "python benchmarks/bench_pts.py",
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__},
        "note": "official = sklearn OPTICS per pixel with a Python callable metric, timed on official_pixels pixels; "
                "ours = batched optics_labels / select_prototypes / build_pts over the whole grid; speedup_optics = "
                "official per-pixel / ours per-pixel (OPTICS only); labels and prototypes compared on the timed "
                "pixels.",
        "runs": rows,
    })
    print(f"wrote {RESULTS}")
    if not all(r["labels_identical"] and r["prototypes_identical"] for r in rows):
        raise SystemExit("labels or prototypes differ from the official path")


if __name__ == "__main__":
    main()
