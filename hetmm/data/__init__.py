"""Data in and checked: image decoding, dataset layouts and manifests, download sources, fixed splits, validation.

Imports nothing from the method (``hetmm.core``), the pipeline or the reports; importing this package imports no
torch.
"""
