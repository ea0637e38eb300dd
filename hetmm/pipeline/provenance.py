"""What an artifact was made from: digests of its settings and of the code that computes it.

A *code digest* covers modules given as module objects and, transitively, every ``hetmm.core`` module they import
(found in their source, lazy imports included), so it follows the code wherever files move. Each module counts by
its syntax tree with docstrings removed: comments, docstrings and formatting do not change a digest, any edit to a
statement does. Artifacts and the code they depend on:

* features (cache folder): :class:`~hetmm.config.FeatureConfig` + :mod:`hetmm.core.features` (backbones included)
  + :mod:`hetmm.data.images` (decoding);
* templates: the feature key + :mod:`hetmm.core.templates`;
* stored matching distances: the feature key + the template code + :mod:`hetmm.core.inspector` (matching, scoring);
* a TFA-Net model: its settings, training images, the feature key + :mod:`hetmm.pipeline.tfa_training` (the
  training loop) and :mod:`hetmm.core.tfa_net` (the network);
* a tuning search: its settings + :mod:`hetmm.pipeline.tuning` and the values it tries
  (:mod:`hetmm.config.tunable`), the synthetic defects, the validation split, image
  decoding and the features and matching it runs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from hetmm.config import FeatureConfig
from hetmm.io import sha256_json

_FOLLOW = "hetmm.core"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module a parsed source imports, anywhere in it (``from x import submodule`` gives ``x.submodule``).

    ``package`` resolves relative imports.
    """
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


@cache
def _module_digest(name: str) -> tuple[str, frozenset[str]]:
    """(digest of the module's normalised syntax tree, the ``hetmm.core`` modules it imports)."""
    spec = importlib.util.find_spec(name)  # source read without importing (a digest must not cost a torch import)
    tree = ast.parse(Path(spec.origin).read_text())
    package = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
    imports = {m for m in imported_modules(tree, package) if m == _FOLLOW or m.startswith(_FOLLOW + ".")}
    return hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest(), frozenset(imports)


def covered(*modules: ModuleType | str) -> set[str]:
    """Names of ``modules`` (objects or dotted names) and of the ``hetmm.core`` modules they import, transitively."""
    todo, seen = [m if isinstance(m, str) else m.__name__ for m in modules], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(_module_digest(name)[1])
    return seen


def code_digest(*modules: ModuleType | str) -> str:
    """sha256 over the normalised source of :func:`covered` modules (see the module docstring)."""
    # by content only: a module that moves keeps its digest
    return hashlib.sha256("".join(sorted(_module_digest(n)[0] for n in covered(*modules))).encode()).hexdigest()


@cache
def feature_code() -> str:
    from hetmm.core import features
    from hetmm.data import images

    return code_digest(features, images)


@cache
def template_code() -> str:
    from hetmm.core import templates

    return code_digest(templates)


@cache
def match_code() -> str:
    from hetmm.core import inspector

    return code_digest(inspector)


@cache
def tuning_code() -> str:
    # by name: the tune stage computes its key without importing torch
    return code_digest("hetmm.pipeline.tuning", "hetmm.config.tunable", "hetmm.pipeline.settings",
                       "hetmm.pipeline.validation_set",
                       "hetmm.data.synthetic", "hetmm.data.splits", "hetmm.data.images", "hetmm.core.features",
                       "hetmm.core.inspector", "hetmm.pipeline.throughput")


@cache
def tfa_code() -> str:
    # what the weights depend on: the training loop and the network (hetmm.core.tfa_net, followed from its
    # imports); not the train stage's validation, logging and records, nor the scorer
    return code_digest("hetmm.pipeline.tfa_training", "hetmm.pipeline.tfa_model")


@dataclass(frozen=True)
class FeatureKey:
    """The feature settings and feature code digest; :attr:`digest` names the feature cache folder."""

    settings: dict
    code: str

    @classmethod
    def of(cls, config: FeatureConfig) -> "FeatureKey":
        return cls(config.fingerprint(), feature_code())

    @property
    def digest(self) -> str:
        return sha256_json({"settings": self.settings, "code": self.code})[:16]

    def record(self) -> dict:
        return {"settings": self.settings, "code": self.code}

    def differences(self, other: dict) -> str | None:
        """Why features recorded as ``other`` (a :meth:`record`) differ from these, or None if they do not."""
        settings = other.get("settings") or {}
        changed = sorted(k for k in {*settings, *self.settings} if settings.get(k) != self.settings.get(k))
        if changed:
            return f"feature settings changed ({', '.join(changed)})"
        if other.get("code") != self.code:
            return "feature code changed"
        return None


def template_code_record(key: FeatureKey) -> dict[str, str]:
    """What a template records as ``meta["code"]``: the code behind its features and behind its selection."""
    return {"features": key.code, "templates": template_code()}
