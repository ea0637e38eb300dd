"""What people read: heat-map overlays, ROC/PRO plots, model cards, and the audit trail from git history.

Imports the method's metric helpers (``hetmm.core.metrics``) but nothing from the pipeline or the data layer.
"""
