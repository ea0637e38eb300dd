"""The layout's rules, checked on the source: layer boundaries, no import cycles, light stages, and ``dvc.yaml``
dependencies that cover every module a stage runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hetmm.pipeline.provenance import imported_modules

PACKAGE = REPO / "hetmm"
# what each layer may import from hetmm (prefixes); the pipeline and the CLI may import everything below them
ALLOWED = {
    "hetmm.core": ("hetmm.core", "hetmm.modes", "hetmm.config", "hetmm.errors", "hetmm.io"),
    "hetmm.data": ("hetmm.data", "hetmm.modes", "hetmm.errors", "hetmm.io"),
    "hetmm.report": ("hetmm.report", "hetmm.core.metrics", "hetmm.core.thresholds", "hetmm.modes", "hetmm.errors",
                     "hetmm.io"),
    "hetmm.config": ("hetmm.config", "hetmm.methods", "hetmm.modes", "hetmm.errors"),
    "hetmm.methods": ("hetmm.modes",),
    "hetmm.modes": (),
    "hetmm.pipeline": ("hetmm.pipeline", "hetmm.core", "hetmm.data", "hetmm.report", "hetmm.methods", "hetmm.modes",
                       "hetmm.config", "hetmm.errors", "hetmm.io"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_command(node: ast.stmt) -> bool:
    """A function decorated ``@app.command(...)``: a CLI command of its own, not run by a stage's command."""
    return isinstance(node, ast.FunctionDef) and any(
        "app.command" in ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list)


def _imports(name: str, skip_commands: bool = False, parents: bool = True) -> set[str]:
    """hetmm modules imported by ``name`` anywhere in its source (lazy imports included), and their parent
    packages (whose ``__init__`` runs too) unless ``parents`` is off. ``skip_commands`` leaves out the bodies of
    other CLI commands (``predict``, ``audit``, ...)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    if skip_commands:
        tree.body = [node for node in tree.body if not _is_command(node)]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = imported_modules(tree, package)
    if name == "hetmm.pipeline.stages":  # stage(): any stage module, by import_module
        found |= {m for m in MODULES if m.startswith("hetmm.pipeline.stages.")}
    out = found & set(MODULES)
    for module in list(out) if parents else []:
        parts = module.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out - {name}


def _layer(name: str) -> str | None:
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True)
                 if name == layer or name.startswith(layer + ".")), None)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layer_imports_stay_inside_their_boundary(name):
    layer = _layer(name)
    if layer is None:
        pytest.skip(f"{name} is not layered (CLI, package root, shared helpers)")
    allowed = ALLOWED[layer]
    # the package root (its __version__) is open to every layer
    bad = sorted(m for m in _imports(name, parents=False)
                 if m != "hetmm" and not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not bad, f"{name} ({layer}) imports {bad}; allowed: {allowed}"


def test_no_import_cycles_between_modules():
    # package __init__ files that only re-export are skipped: importing a submodule loads them anyway
    graph = {name: {m for m in _imports(name) if m in MODULES and not MODULES[m].name == "__init__.py"}
             for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _stage_closure(stage: str) -> set[Path]:
    """Files of every module that ``hetmm <stage>`` can run: the CLI less its other commands, then the stage module
    with everything it imports (lazy imports too)."""
    todo = ["hetmm.cli", f"hetmm.pipeline.stages.{stage}"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        imported = _imports(name, skip_commands=name == "hetmm.cli")
        if name == "hetmm.pipeline.stages":  # its stage() imports the one stage that runs, not all of them
            imported = {m for m in imported if not m.startswith("hetmm.pipeline.stages.")}
        todo += sorted(imported)
    return {MODULES[name].relative_to(REPO) for name in seen}


DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(DVC))
def test_dvc_stage_dependencies_cover_every_module_the_stage_runs(stage):
    body = DVC[stage]["do"]
    # every line (a mapping line -> model) is ${key}; the model stages' own lists of line names are ${item}
    assert body["cmd"].split()[:3] == ["hetmm", stage, "${item}" if stage in ("template", "train") else "${key}"]
    deps = [Path(d) for d in body["deps"]]
    code = [d for d in deps if d.parts[0] == "hetmm"]
    for dep in code:
        assert (REPO / dep).exists(), f"{stage}: dependency {dep} does not exist"
    missing = sorted(str(f) for f in _stage_closure(stage) if not any(f == d or d in f.parents for d in code))
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not depend on them"


def test_dvc_resource_dependencies():
    assert "hetmm/resources" in DVC["download"]["do"]["deps"]  # the committed MTD split


def test_light_stages_import_neither_torch_nor_great_expectations():
    probe = ("import sys\nfrom hetmm.pipeline.stages import stage\n"
             "for name in ('download', 'validate', 'report'):\n    stage(name)\n"
             "print(sorted(m for m in ('torch', 'great_expectations') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_is_for(name):
    assert ast.get_docstring(ast.parse(MODULES[name].read_text())), f"{MODULES[name]} has no module docstring"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_modules_stay_small(stage):
    lines = MODULES[f"hetmm.pipeline.stages.{stage}"].read_text().count("\n")
    assert lines <= 150, f"hetmm/pipeline/stages/{stage}.py has {lines} lines"


def test_only_the_stage_registry_and_the_cli_import_stage_modules():
    stage_modules = {m for m in MODULES if m.startswith("hetmm.pipeline.stages.")}
    assert len(stage_modules) == 9
    importers = {name: sorted(_imports(name, parents=False) & stage_modules) for name in MODULES
                 if name not in ("hetmm.pipeline.stages", "hetmm.cli")}
    offenders = {name: found for name, found in importers.items() if found}
    assert not offenders, f"stage modules are imported by more than the stage registry and the CLI: {offenders}"


def test_every_method_loader_lives_in_the_module_that_loads_models():
    # hetmm.methods names its loaders as strings (it imports no pipeline code); hetmm.pipeline.models, the only
    # caller of MethodSpec.load, holds them all, so the dependency closures above see every loader
    from hetmm.methods import METHODS

    calls = sorted(name for name, path in MODULES.items() if ").load()(" in path.read_text())
    assert calls == ["hetmm.pipeline.models"]
    for method, spec in METHODS.items():
        assert spec.loader.partition(":")[0] == "hetmm.pipeline.models", method
        assert callable(spec.load())


def test_method_dispatch_goes_through_the_registry():
    # the method's name is compared nowhere outside hetmm/methods.py and the enum itself: every branch asks spec()
    compares = []
    for name, path in MODULES.items():
        if name in ("hetmm.methods", "hetmm.modes"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(x, ast.Attribute) and x.attr in ("HETMM", "TFA_NET")
                    or isinstance(x, ast.Constant) and x.value in ("hetmm", "tfa_net")
                    for x in [node.left, *node.comparators]):
                compares.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and any(
                    getattr(a, "id", "") in ("Inspector", "TFAInspector") for a in ast.walk(node.args[1])):
                compares.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not compares, f"method branches outside the registry: {compares}"
