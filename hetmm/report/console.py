"""Human-readable rendering of a command's result (a JSON-like dict) for the terminal.

``render(result) -> str``: one ``key: value`` line per scalar, nested mappings indented under their key, floats
to 4 significant digits, long lists shortened with their length. ``--json`` prints the full result instead.
"""

from __future__ import annotations

from typing import Any

LIST_ITEMS = 6  # a list longer than this shows its first items and its length


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _lines(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            out += [f"{pad}{key}:"] + (_lines(item, indent + 1) if item else [f"{pad}  (none)"])
        elif isinstance(item, (list, tuple)):
            if all(not isinstance(x, (dict, list, tuple)) for x in item):
                shown = ", ".join(_scalar(x) for x in item[:LIST_ITEMS])
                more = f" ... ({len(item)} in all)" if len(item) > LIST_ITEMS else ""
                out.append(f"{pad}{key}: {shown or '(none)'}{more}")
            else:
                out.append(f"{pad}{key}: {len(item)} entries (--json lists them)")
        else:
            out.append(f"{pad}{key}: {_scalar(item)}")
    return out


def render(result: dict) -> str:
    """The terminal form of ``result`` (see the module docstring)."""
    return "\n".join(_lines(result, 0))
