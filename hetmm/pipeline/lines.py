"""Which product lines exist: ``params.yaml`` holds their settings, ``dvc.yaml`` the list of lines that run.

The lists in ``dvc.yaml`` (``foreach: &lines {...}`` on the first stage, ``*lines`` on the others, and the lines of
the ``template`` and ``train`` stages) are literals, so no params key can ever become part of a stage command.
:func:`add_line` writes a new line's entry (every key
spelled out, so ``dvc exp run -S`` can set it, except the keys the tune stage chooses) and appends its checked name
to that list;
:func:`remove_line` takes a line out of both; :func:`check_lines` says where the two files disagree.
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
from hetmm.errors import ConfigError
from hetmm.io import write_text_atomic
from hetmm.methods import METHODS, spec
from hetmm.modes import Method

# One flow mapping per list, each on its own line: every line -> its model file's stem (``template`` or
# ``tfa_net``), then the lines of each model stage (DVC cannot filter a foreach, so each stage gets its own list).
_STAGE_LISTS = {"templated": "template", "trained": "train"}  # dvc.yaml anchor -> the model stage it runs
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
    by_stem = {s.model_file: method for method, s in METHODS.items()}
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
    bodies = {"lines": "{" + ", ".join(f"{n}: {spec(m).model_file}" for n, m in methods.items()) + "}"}
    for anchor, stage in _STAGE_LISTS.items():
        bodies[anchor] = f"[{', '.join(n for n, m in methods.items() if spec(m).model_stage == stage)}]"
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
    # the other method's section would be inert: a HETMM line has no network, a TFA-Net line no template set
    for dropped in ("name", "pinned", *spec(line.method).inert_sections):
        entry.pop(dropped)
    for tunable in line.tunable():
        section, field = tunable.split(".")
        entry[section][field] = AUTO
    entry["data"] = {k: v for k, v in entry["data"].items() if v is not None}
    return {section: values for section, values in entry.items() if values}


def check_source(name: str, data: Mapping[str, Any]) -> None:
    """A new line's local source is there and holds images, so a typo is caught now, not in the first repro."""
    from hetmm.data.images import IMAGE_EXTENSIONS

    key = f"product_lines.{name}.data"
    folders = {"folder": ["path"], "anomalib_folder": ["normal_dir", "abnormal_dir", "normal_test_dir"]}
    if data.get("source") == "table" and data.get("path"):
        if not Path(data["path"]).expanduser().is_file():
            raise ConfigError(f"{key}.path: {data['path']} is not a file; give the CSV or parquet table of images")
    for field in folders.get(str(data.get("source")), []):
        if not data.get(field):
            continue
        folder = Path(data[field]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{key}.{field}: {data[field]} is not a folder on this machine; give the folder that "
                              "holds the line's images")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
            raise ConfigError(f"{key}.{field}: {data[field]} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")


def add_line(name: str, data: dict[str, Any], params_yaml: str | Path = "params.yaml",
             dvc_yaml: str | Path = "dvc.yaml", method: str = Method.HETMM) -> dict[str, Any]:
    """Write the line's entry into params.yaml (comments kept) and its name into dvc.yaml's list."""
    from ruamel.yaml import YAML

    entry = line_entry(name, data, method)
    check_source(name, entry["data"])
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
    # block lists, as DVC writes them: `dvc exp run -S` then changes the keys it sets and no other line
    if doc.get("product_lines") is None:  # `product_lines:` with no line left (hetmm line remove)
        doc["product_lines"] = {}
    doc["product_lines"][name] = entry
    out = io.StringIO()
    yml.dump(doc, out)
    write_text_atomic(params_yaml, out.getvalue())
    set_dvc_lines({**names, name: entry["method"]}, dvc_yaml)
    return {"line": name, "params": str(params_yaml), "dvc": str(dvc_yaml), "entry": entry}


def _entry_span(text: str, name: str) -> tuple[int, int] | None:
    """Character span of ``product_lines.<name>`` in params.yaml: its key, its body (deeper lines), and the comment
    lines right above it (its own description); ``None`` when the entry is not a plain block at the usual place."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(rf"^(\s+){re.escape(name)}\s*:", line)]
    if len(starts) != 1:
        return None
    first = last = starts[0]
    indent = len(lines[first]) - len(lines[first].lstrip())
    while last + 1 < len(lines) and (not lines[last + 1].strip() or
                                     len(lines[last + 1]) - len(lines[last + 1].lstrip()) > indent):
        last += 1
    while last > first and not lines[last].strip():  # the blank lines after it stay, as separators
        last -= 1
    while first > 0 and lines[first - 1].strip().startswith("#") and \
            len(lines[first - 1]) - len(lines[first - 1].lstrip()) == indent:
        first -= 1
    if first > 0 and not lines[first - 1].strip():  # one separator goes with the entry
        first -= 1
    elif last + 1 < len(lines) and not lines[last + 1].strip():
        last += 1
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    return offsets[first], offsets[last + 1]


def _lines_of(text: str) -> Any:
    """The parsed params with an empty ``product_lines`` as ``{}``; ``None`` when the text is not YAML."""
    import yaml

    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return None
    return {**raw, "product_lines": raw.get("product_lines") or {}}


def remove_line(name: str, params_yaml: str | Path = "params.yaml", dvc_yaml: str | Path = "dvc.yaml") -> dict:
    """Take the line out of params.yaml (its entry and the comment above it; every other byte stays) and out of
    dvc.yaml's lists. Its data, models and reports stay on disk: DVC no longer tracks them."""

    params_yaml, dvc_yaml = Path(params_yaml), Path(dvc_yaml)
    names = dvc_line_methods(dvc_yaml)
    text = params_yaml.read_text()
    raw = _lines_of(text)
    if raw is None:
        raise ConfigError(f"{params_yaml}: not valid YAML; fix it first")
    entries = raw["product_lines"]
    if name not in entries and name not in names:
        raise ConfigError(f"product_lines.{name}: no such line in {params_yaml} or {dvc_yaml} "
                          f"(lines: {', '.join(sorted(set(entries) | set(names))) or 'none'})")
    if name in entries:
        want = {**raw, "product_lines": {k: v for k, v in entries.items() if k != name}}
        span = _entry_span(text, name)
        new = text[:span[0]] + text[span[1]:] if span else ""
        if _lines_of(new) != want:  # an unusual layout: ruamel's round trip, comments kept
            from ruamel.yaml import YAML

            yml = YAML()
            doc = yml.load(text)
            del doc["product_lines"][name]
            out = io.StringIO()
            yml.dump(doc, out)
            new = out.getvalue()
            if _lines_of(new) != want:
                raise ConfigError(f"{params_yaml}: could not take product_lines.{name} out safely; delete its entry "
                                  "by hand, then run `hetmm line remove` again for dvc.yaml")
        write_text_atomic(params_yaml, new)
    if name in names:
        set_dvc_lines({k: v for k, v in names.items() if k != name}, dvc_yaml)
    kept = [f"{folder}/{name}" for folder in ("data", "features", "models", "outputs", "reports")]
    return {"removed": name, "params": str(params_yaml), "dvc": str(dvc_yaml), "left_on_disk": kept}
