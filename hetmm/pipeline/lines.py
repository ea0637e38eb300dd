"""Which product lines exist: ``params.yaml`` holds their settings, ``dvc.yaml`` the list of lines that run.

The lists in ``dvc.yaml`` (``foreach: &lines {...}`` on the first stage, ``*lines`` on the others, and the lines of
the ``template`` and ``train`` stages) are literals, so no params key can ever become part of a stage command. :func:`add_line` writes a new line's entry (every key
spelled out, so ``dvc exp run -S`` can set it, except the keys the tune stage chooses) and appends its checked name
to that list;
:func:`check_lines` says where the two files disagree.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hetmm.config import AUTO, DataConfig, ProductLine, _check_value, build_config, check_line_name, validate_line
from hetmm.core.modes import Method
from hetmm.errors import ConfigError
from hetmm.pipeline import MODEL_FILES
from hetmm.io import write_text_atomic

# One flow mapping per list, each on its own line: every line -> its model file's stem (``template`` or
# ``tfa_net``), then the lines of each model stage (DVC cannot filter a foreach, so each stage gets its own list).
_LISTS = {"lines": re.compile(r"^(?P<head>\s*foreach:\s*&lines\s*)\{(?P<body>[^\n]*)\}\s*$", re.M),
          "templated": re.compile(r"^(?P<head>\s*foreach:\s*&templated\s*)\[(?P<body>[^\]\n]*)\]\s*$", re.M),
          "trained": re.compile(r"^(?P<head>\s*foreach:\s*&trained\s*)\[(?P<body>[^\]\n]*)\]\s*$", re.M)}


def _match(text: str, name: str, dvc_yaml: str | Path) -> re.Match:
    match = _LISTS[name].search(text)
    if match is None:
        raise ConfigError(f"{dvc_yaml}: no one-line `foreach: &{name} ...` list (dvc.yaml's lists of product lines)")
    return match


def dvc_line_methods(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, Method]:
    """The product lines ``dvc.yaml`` runs, with the method its stages are wired for."""
    body = _match(Path(dvc_yaml).read_text(), "lines", dvc_yaml)["body"]
    by_stem = {stem: Method(method) for method, stem in MODEL_FILES.items()}
    out = {}
    for entry in filter(None, (e.strip() for e in body.split(","))):
        name, _, stem = (part.strip() for part in entry.partition(":"))
        if stem not in by_stem:
            raise ConfigError(f"{dvc_yaml}: line {name!r} has model {stem!r}; use one of {', '.join(by_stem)}")
        out[name] = by_stem[stem]
    return out


def dvc_lines(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The product lines ``dvc.yaml`` runs."""
    return list(dvc_line_methods(dvc_yaml))


def set_dvc_lines(lines: Mapping[str, str] | Sequence[str], dvc_yaml: str | Path = "dvc.yaml") -> None:
    """Make ``dvc.yaml`` run exactly ``lines`` (name -> method; a plain list: every line uses HETMM), each checked."""
    methods = {name: Method(m) for name, m in lines.items()} if isinstance(lines, Mapping) else \
        {name: Method.HETMM for name in lines}
    for name in methods:
        check_line_name(name)
    dvc_yaml = Path(dvc_yaml)
    text = dvc_yaml.read_text()
    bodies = {"lines": "{" + ", ".join(f"{n}: {MODEL_FILES[m]}" for n, m in methods.items()) + "}",
              "templated": f"[{', '.join(n for n, m in methods.items() if m == Method.HETMM)}]",
              "trained": f"[{', '.join(n for n, m in methods.items() if m == Method.TFA_NET)}]"}
    for name, body in bodies.items():
        match = _match(text, name, dvc_yaml)
        text = text[:match.start()] + match["head"] + body + text[match.end():]
    write_text_atomic(dvc_yaml, text)


def check_lines(params_yaml: str | Path = "params.yaml", dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """Lines only in params.yaml (never run by DVC), only in dvc.yaml (their stages fail), wired in dvc.yaml for
    another method than params.yaml gives them, or with unsafe names."""
    import yaml

    if not Path(params_yaml).is_file():
        raise ConfigError(f"{params_yaml}: file not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(Path(params_yaml).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_yaml}: not valid YAML ({type(exc).__name__}); fix the file") from None
    entries = raw.get("product_lines") or {} if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"{params_yaml}: expected a mapping with a product_lines mapping at the top level; fix the "
                          "file or pass the right --params")
    in_params = [str(name) for name in entries]
    in_dvc = dvc_line_methods(dvc_yaml)
    unsafe = []
    for name in in_params + list(in_dvc):
        try:
            check_line_name(name)
        except ConfigError:
            unsafe.append(name)
    wired = [n for n in in_params if n in in_dvc and
             str((entries[n] or {}).get("method", Method.HETMM) if isinstance(entries[n], dict) else "") != in_dvc[n]]
    return {"not_in_dvc_yaml": [n for n in in_params if n not in in_dvc],
            "not_in_params_yaml": [n for n in in_dvc if n not in in_params], "other_method_in_dvc_yaml": wired,
            "unsafe_names": sorted(set(unsafe))}


def line_entry(name: str, data: dict[str, Any], method: str = Method.HETMM) -> dict[str, Any]:
    """The checked params entry of a new line: ``data`` plus every key at its default, the tunable ones
    (:data:`~hetmm.config.TUNABLE`) at ``auto``: the tune stage chooses them until the entry pins a value, and every
    key is present for ``dvc exp run -S``."""
    key = f"product_lines.{check_line_name(name)}"
    line = ProductLine(name=name, method=_check_value(method, Method, f"{key}.method"),
                       data=build_config(DataConfig, data, f"{key}.data"))
    validate_line(line, key)
    entry = json.loads(json.dumps(dataclasses.asdict(line), default=list))  # enums -> values, tuples -> lists
    for dropped in ("name", "pinned"):
        entry.pop(dropped)
    for tunable in line.tunable():
        section, field = tunable.split(".")
        entry[section][field] = AUTO
    entry["data"] = {k: v for k, v in entry["data"].items() if v is not None}
    return {section: values for section, values in entry.items() if values}


def _flow_lists(value: Any) -> Any:
    """Lists written inline (``[5, 5, 3]``), as in the hand-written entries."""
    from ruamel.yaml.comments import CommentedSeq

    if isinstance(value, dict):
        return {k: _flow_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def add_line(name: str, data: dict[str, Any], params_yaml: str | Path = "params.yaml",
             dvc_yaml: str | Path = "dvc.yaml", method: str = Method.HETMM) -> dict[str, Any]:
    """Write the line's entry into params.yaml (comments kept) and its name into dvc.yaml's list."""
    from ruamel.yaml import YAML

    entry = line_entry(name, data, method)
    params_yaml, dvc_yaml = Path(params_yaml), Path(dvc_yaml)
    for given, option in ((params_yaml, "--params"), (dvc_yaml, "--dvc")):
        if not given.is_file():
            raise ConfigError(f"{given}: file not found; run from the repository root or pass {option}")
    names = dvc_line_methods(dvc_yaml)
    yml = YAML()  # round trip: the file's comments and order survive
    try:
        doc = yml.load(params_yaml.read_text())
    except Exception as exc:  # noqa: BLE001 - ruamel's errors share no base class worth naming
        raise ConfigError(f"{params_yaml}: not valid YAML ({type(exc).__name__}); fix the file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("product_lines") or {}, dict):
        raise ConfigError(f"{params_yaml}: expected a mapping with a product_lines mapping at the top level; fix the "
                          "file or pass the right --params")
    if name in (doc.get("product_lines") or {}) or name in names:
        raise ConfigError(f"product_lines.{name}: the line exists already; edit its entry in {params_yaml}")
    if not doc.get("product_lines"):
        doc["product_lines"] = {}
    doc["product_lines"][name] = _flow_lists(entry)
    out = io.StringIO()
    yml.dump(doc, out)
    write_text_atomic(params_yaml, out.getvalue())
    set_dvc_lines({**names, name: entry["method"]}, dvc_yaml)
    return {"line": name, "params": str(params_yaml), "dvc": str(dvc_yaml), "entry": entry}
