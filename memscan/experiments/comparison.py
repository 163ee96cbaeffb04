"""The paper's numbers beside the measured ones: one row per [paper] key, with the ratio measured / paper."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from memscan.experiments.toml_text import flatten


def rows(paper: Mapping[str, Any], measured: Callable[[str], Any]) -> list[dict[str, Any]]:
    """{quantity, paper, measured, ratio} per paper number; `measured(stage)` is the stage's record.

    `measured` and `ratio` are None where the record has no number at that key (a quantity
    the data leaves undefined, or a key that names none) or the paper's number is 0.
    """
    table = []
    for keys, expected in flatten(paper).items():
        record = measured(keys[0])
        failed = _failed_verdict(record, keys[1:])
        found = None if failed else _number_at(record, keys[1:])
        ratio = found / expected if found is not None and expected else None
        row = {"quantity": ".".join(keys), "paper": expected, "measured": found, "ratio": ratio}
        table.append({**row, "not_applicable": "; ".join(failed["reasons"])} if failed else row)
    return table


def _failed_verdict(record: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The failed verdict beside the number at `keys` (a floor whose premises fail), or None: such a number
    is a verdict, not a figure to divide by the paper's."""
    parent = _object_at(record, keys[:-1])
    verdict = parent.get("verdict") if isinstance(parent, Mapping) else None
    return verdict if isinstance(verdict, Mapping) and verdict.get("applicable") is False else None


def _object_at(record: Any, keys: tuple[str, ...]) -> Any:
    value = record
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _number_at(record: Any, keys: tuple[str, ...]) -> float | None:
    """The finite number at `keys` in a record of nested objects, or None."""
    value = _object_at(record, keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def document(plan: Mapping[str, Any], table: list[dict[str, Any]]) -> dict[str, Any]:
    """comparison.json: the experiment's name and what it reproduces, and the rows."""
    return {"format": "memscan.comparison", "format_version": 1, "experiment": plan["experiment"]["name"],
            "reproduces": plan["experiment"]["reproduces"], "rows": table}


def text(table: list[dict[str, Any]]) -> list[str]:
    """The rows as aligned plain-text lines for the terminal."""
    def shown(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    cells = [("quantity", "paper", "measured", "measured/paper")]
    cells += [(row["quantity"], shown(row["paper"]), "not applicable" if "not_applicable" in row
               else shown(row["measured"]), shown(row["ratio"])) for row in table]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return lines + [f"{row['quantity']}: not applicable: {row['not_applicable']}" for row in table
                    if "not_applicable" in row]
