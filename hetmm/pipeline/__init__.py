"""The DVC pipeline of a product line: the stages (:mod:`hetmm.pipeline.stages`) and what they share.

``stages/`` holds one module per DVC stage; nothing but the stage registry (``hetmm.pipeline.stages``) and the CLI
imports them. The other modules are the stages' libraries: a line's folders and run context (``line``), effective
settings (``settings``), provenance digests, the feature and match caches, a line's template and deployed model
(``line_template``, ``models``), batch scoring of cached features (``batch_scoring``), the label-free search
(``tuning``) and validation set, evaluation, the ablation, report panels, ``predict``/``update`` and Ray scale-out.
Importing this package imports no torch.
"""
