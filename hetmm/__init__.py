"""hetmm: training-free defect inspection by Hard-normal Example-aware Template Mutual Matching."""

import os

# OpenMP threads that spin while waiting make torch 10-50x slower when other processes share the cores
# (measured in benchmarks/README.md); passive waiting costs nothing on an idle machine. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
