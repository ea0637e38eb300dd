"""The matching kernel in bfloat16 against float32 on this CPU: speed and how far the distances move (issue: fast by
contract, "bf16 where exact enough -- measure and choose").

The kernel today computes in float32 on the CPU (``hetmm.core.matching._compute_dtype``: reduced precision had no
fast CPU matmul). CPUs with AVX512-BF16 or AMX do have one, and the kernel is bound by writing and reducing its
product tables, which bf16 halves. This times ``match_layer`` on EfficientNet-Lite0's three layers at 256 px (16
queries against 40 sheets, the tuner's template size) with the compute dtype forced to each, best of ``--repeats``,
the two dtypes interleaved so that load hits both alike, and records the largest absolute difference of the
forward and backward distances (``1 - cosine``, range [0, 2]). Nothing in the product uses bf16 yet; this is the
measurement a choice would rest on.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_kernel_dtype.py   # writes results/kernel_dtype.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from hetmm.core import matching
from hetmm.io import write_json_atomic

RESULTS = Path(__file__).parent / "results" / "kernel_dtype.json"
LAYERS = [(24, 64, 5), (40, 32, 5), (112, 16, 3)]  # (C, side, forward window) of Lite0 at 256 px


def _timed(query: torch.Tensor, sheets: torch.Tensor, window: int, dtype: torch.dtype):
    with mock.patch.object(matching, "_compute_dtype", lambda templates: dtype):
        start = time.perf_counter()
        out = matching.match_layer(query.to(dtype), sheets.to(dtype), window, 3)
        return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--sheets", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for channels, side, window in LAYERS:
        query = F.normalize(torch.randn(args.queries, channels, side, side), dim=1)
        sheets = F.normalize(torch.randn(args.sheets, channels, side, side), dim=1)
        best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
        outs = {}
        for _ in range(args.repeats):
            for dtype in best:
                seconds, outs[dtype] = _timed(query, sheets, window, dtype)
                best[dtype] = min(best[dtype], seconds)
        diff = max((a - b).abs().max().item() for a, b in zip(outs[torch.float32], outs[torch.bfloat16]))
        row = {"channels": channels, "side": side, "forward_window": window, "backward_window": 3,
               "float32_s": round(best[torch.float32], 4), "bfloat16_s": round(best[torch.bfloat16], 4),
               "speedup": round(best[torch.float32] / best[torch.bfloat16], 2),
               "max_abs_distance_diff": round(diff, 5)}
        rows.append(row)
        print(row, flush=True)
    total = {k: round(sum(r[k] for r in rows), 4) for k in ("float32_s", "bfloat16_s")}
    total["speedup"] = round(total["float32_s"] / total["bfloat16_s"], 2)
    print("three layers:", total)
    write_json_atomic(RESULTS, {
        "benchmark": "bench_kernel_dtype",
        "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_kernel_dtype.py",
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "queries": args.queries, "sheets": args.sheets, "layers": rows, "three_layers": total})


if __name__ == "__main__":
    main()
