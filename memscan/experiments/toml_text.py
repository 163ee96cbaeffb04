"""TOML text for a resolved experiment: `tomllib` only reads, so memscan writes the little TOML it needs.

Strings, integers, floats, booleans, lists of them and tables: a top-level table is a
`[name]` section whose nested tables become dotted keys (`query.k = 10` under `[paper]`),
and a table of tables (`[variant]`, `[paper]`) becomes one `[name.child]` section per
child. None is TOML's missing key: it is left out and named in a comment.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def flatten(table: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested tables as {(key, subkey, ...): value}, in the order written."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def dumps(document: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """The TOML text of `document` (top-level tables only), `header` as leading comment lines."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, table in document.items():
        lines += _section((name,), table)
    return "\n".join(lines).lstrip("\n") + "\n"


def _section(path: tuple[str, ...], table: Mapping[str, Any]) -> list[str]:
    """`[path]` and its keys; a table of tables as one section per child instead."""
    if table and all(isinstance(value, Mapping) for value in table.values()):
        return [line for key, child in table.items() for line in _section((*path, key), child)]
    lines = ["", f"[{'.'.join(map(key_text, path))}]"]
    unset = []
    for keys, value in flatten(table).items():
        if value is None:
            unset.append(".".join(keys))
        else:
            lines.append(f"{'.'.join(map(key_text, keys))} = {value_text(value)}")
    if unset:
        lines.append(f"# not set (the default applies): {', '.join(unset)}")
    return lines


def key_text(key: str) -> str:
    """A key, bare where TOML allows it, else quoted."""
    return key if _BARE_KEY.fullmatch(key) else string_text(key)


def string_text(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, everything else as is."""
    escaped = "".join(f"\\{ch}" if ch in '"\\' else f"\\u{ord(ch):04x}" if ch < " " or ch == "\x7f" else ch
                      for ch in text)
    return f'"{escaped}"'


def value_text(value: Any) -> str:
    """A TOML value: bool before int (a bool is an int in Python), floats as repr (inf and nan as TOML names them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return string_text(value)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(value_text(item) for item in value)}]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")
