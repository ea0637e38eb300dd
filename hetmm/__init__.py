"""hetmm: training-free defect inspection by Hard-normal Example-aware Template Mutual Matching."""

__version__ = "0.1.0"
