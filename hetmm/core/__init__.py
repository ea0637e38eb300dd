"""The method: features, templates, matching, scoring and metrics as pure functions on tensors.

Nothing here reads pipeline folders, manifests or reports; modules import only ``hetmm.core``, the typed settings
(``hetmm.config``), the user-facing errors (``hetmm.errors``) and hashing/atomic-write helpers (``hetmm.io``).
``tests/test_architecture.py`` enforces it. Importing this package imports no torch.
"""
