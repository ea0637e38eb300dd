"""Which product lines exist: ``params.yaml`` holds their settings, ``dvc.yaml`` the list of lines that run.

The list in ``dvc.yaml`` (``foreach: &lines [...]`` on the first stage, ``*lines`` on the others) is a literal, so
no params key can ever become part of a stage command. :func:`add_line` writes a new line's entry (every key
spelled out, so ``dvc exp run -S`` can set it, except the keys the tune stage chooses) and appends its checked name
to that list;
:func:`check_lines` says where the two files disagree.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

from hetmm.config import AUTO, TUNABLE, DataConfig, ProductLine, build_config, check_line_name, validate_line
from hetmm.errors import ConfigError
from hetmm.io import write_text_atomic

_LIST = re.compile(r"^(?P<head>\s*foreach:\s*&lines\s*)\[(?P<names>[^\]]*)\]\s*$", re.M)


def dvc_lines(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The product lines ``dvc.yaml`` runs."""
    match = _LIST.search(Path(dvc_yaml).read_text())
    if match is None:
        raise ConfigError(f"{dvc_yaml}: no `foreach: &lines [...]` list of product lines on the first stage")
    return [name.strip() for name in match["names"].split(",") if name.strip()]


def set_dvc_lines(names: list[str], dvc_yaml: str | Path = "dvc.yaml") -> None:
    """Make ``dvc.yaml`` run exactly ``names`` (each checked)."""
    for name in names:
        check_line_name(name)
    dvc_yaml = Path(dvc_yaml)
    text = dvc_yaml.read_text()
    dvc_lines(dvc_yaml)  # a clear error when the list is missing
    match = _LIST.search(text)
    write_text_atomic(dvc_yaml, text[:match.start()] + f"{match['head']}[{', '.join(names)}]" + text[match.end():])


def check_lines(params_yaml: str | Path = "params.yaml", dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """Lines only in params.yaml (never run by DVC), only in dvc.yaml (their stages fail), or with unsafe names."""
    import yaml

    raw = yaml.safe_load(Path(params_yaml).read_text()) or {}
    in_params = [str(name) for name in (raw.get("product_lines") or {})]
    in_dvc = dvc_lines(dvc_yaml)
    unsafe = []
    for name in in_params + in_dvc:
        try:
            check_line_name(name)
        except ConfigError:
            unsafe.append(name)
    return {"not_in_dvc_yaml": [n for n in in_params if n not in in_dvc],
            "not_in_params_yaml": [n for n in in_dvc if n not in in_params], "unsafe_names": sorted(set(unsafe))}


def line_entry(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The checked params entry of a new line: ``data`` plus every key at its default, the tunable ones
    (:data:`~hetmm.config.TUNABLE`) at ``auto``: the tune stage chooses them until the entry pins a value, and every
    key is present for ``dvc exp run -S``."""
    key = f"product_lines.{check_line_name(name)}"
    line = ProductLine(name=name, data=build_config(DataConfig, data, f"{key}.data"))
    validate_line(line, key)
    entry = json.loads(json.dumps(dataclasses.asdict(line), default=list))  # enums -> values, tuples -> lists
    for dropped in ("name", "pinned"):
        entry.pop(dropped)
    for tunable in TUNABLE:
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
             dvc_yaml: str | Path = "dvc.yaml") -> dict[str, Any]:
    """Write the line's entry into params.yaml (comments kept) and its name into dvc.yaml's list."""
    from ruamel.yaml import YAML

    entry = line_entry(name, data)
    params_yaml, dvc_yaml = Path(params_yaml), Path(dvc_yaml)
    names = dvc_lines(dvc_yaml)
    yml = YAML()  # round trip: the file's comments and order survive
    doc = yml.load(params_yaml.read_text())
    if name in (doc.get("product_lines") or {}) or name in names:
        raise ConfigError(f"product_lines.{name}: the line exists already; edit its entry in {params_yaml}")
    doc.setdefault("product_lines", {})[name] = _flow_lists(entry)
    out = io.StringIO()
    yml.dump(doc, out)
    write_text_atomic(params_yaml, out.getvalue())
    set_dvc_lines([*names, name], dvc_yaml)
    return {"line": name, "params": str(params_yaml), "dvc": str(dvc_yaml), "entry": entry}
