"""The paper's numbers, and memscan's own derivations, beside the measured ones; the run's scale beside the paper's.

[paper] maps measured quantities to the paper's numbers; four tables inside it say more (docs/experiments.md):
[paper.derived] numbers memscan derives itself (not the paper's), [paper.source] where each number comes from,
[paper.scale] the paper's model and data, and [paper.depends_on] the scale quantity at which a number holds (a
raw distance holds at the paper's width only): such a row of a run at another scale has no ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from memscan.experiments.toml_text import flatten

PAPER, DERIVATION = "paper", "memscan's derivation"
REFERENCE_KEY = {PAPER: "paper", DERIVATION: "derived"}   # the row's field that holds the number compared with
RESERVED = ("derived", "source", "scale", "depends_on")   # [paper]'s own tables, never stages
SCALE_NUMBERS = {"width": "width n", "layers": "layers", "patterns": "patterns d", "train_tokens": "training tokens",
                 "corpus_tokens": "corpus tokens"}
SCALE_FACTOR = 1.5   # scales within this factor agree: the paper's are approximate ("about 2M tokens")
NO_SOURCE = "not given in the experiment file"


class Table(list):
    """The rows, with the run's scale against the paper's (`scale_verdict`): comparison.json's `scale`."""

    def __init__(self, rows: list[dict[str, Any]], scale: dict[str, Any]):
        super().__init__(rows)
        self.scale = scale


def quantities(table: Mapping[str, Any]) -> dict[str, Any]:
    """A table keyed by quantity, nested (`query = {r_star = ...}`) or quoted (`"query.r_star"`), as {'query.r_star': ...}."""
    return {".".join(keys): value for keys, value in flatten(table).items()}


def numbers(paper: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """{keys: (kind, number)}: the paper's numbers, then memscan's derivations."""
    own = {key: value for key, value in paper.items() if key not in RESERVED}
    return {**{keys: (PAPER, value) for keys, value in flatten(own).items()},
            **{keys: (DERIVATION, value) for keys, value in flatten(paper.get("derived", {})).items()}}


# ---------------------------------------------------------------- the run's scale


def run_scale(measured: Callable[[str], Any]) -> dict[str, int]:
    """Width, layers, patterns and tokens from the stages' records: the query run's last layer, the dataset
    manifest, the training run.json (each only where the experiment has that stage)."""
    train, extract, query = measured("train"), measured("extract"), measured("query")
    trained = train["settings"] if train else {}
    layers = extract and extract["settings"]["layers"] in ("last", "all") and max(extract["layers"])
    scale = {"width": (query or {}).get("n") or (extract or {}).get("n") or trained.get("n_embd"),
             "layers": trained.get("n_layer") or layers or None, "patterns": (query or {}).get("d"),
             "train_tokens": train and train["data"]["train_tokens"],
             "corpus_tokens": extract and extract["corpus"]["tokens"]}
    return {key: value for key, value in scale.items() if value}


def _differs(run: float, paper: float) -> bool:
    return max(run, paper) > SCALE_FACTOR * min(run, paper)


def scale_verdict(run: Mapping[str, Any], paper: Mapping[str, Any]) -> dict[str, Any]:
    """{run, paper, reduced, differences}: reduced where a scale quantity both state differs by more than
    SCALE_FACTOR; None where the paper states none that the run measures (nothing to judge by)."""
    compared = [key for key in SCALE_NUMBERS if key in paper and key in run]
    differences = [f"{SCALE_NUMBERS[key]} {run[key]:,}, the paper's {paper[key]:,}" for key in compared
                   if _differs(run[key], paper[key])]
    reduced = bool(differences) if compared else None
    return {"run": dict(run), "paper": dict(paper), "reduced": reduced, "compared": compared,
            "differences": differences}


def scale_note(scale: Mapping[str, Any]) -> str:
    """One line: 'reduced run: ...', the scale both share, or why the scale is not compared."""
    if scale["reduced"]:
        return "reduced run: " + "; ".join(scale["differences"])
    if scale["reduced"] is False:
        return (f"at the paper's scale (within a factor {SCALE_FACTOR:g}): "
                + ", ".join(SCALE_NUMBERS[key] for key in scale["compared"]))
    model = scale["paper"].get("model")
    return ("scale not compared: the paper states no width, layers, patterns or tokens that this run measures"
            + (f" (the paper's model: {model})" if model else ""))


def _incomparable(scale: Mapping[str, Any], key: str | None) -> str | None:
    """Why a number that holds at the paper's `key` (width, ...) cannot be compared with this run's, or None."""
    if key is None or key not in scale["compared"] or not _differs(scale["run"][key], scale["paper"][key]):
        return None
    word = SCALE_NUMBERS[key]
    return f"holds at {word} {scale['paper'][key]:,} (the paper's); this run's {word} is {scale['run'][key]:,}"


# ---------------------------------------------------------------- the rows


def rows(paper: Mapping[str, Any], measured: Callable[[str], Any]) -> Table:
    """{quantity, kind, paper | derived, source, measured, ratio} per number; `measured(stage)` is the stage's record.

    `measured` and `ratio` are None where the record has no number at that key (a quantity the data leaves
    undefined, or a key that names none) or the reference is 0; `ratio` is None where the number holds at a
    scale this run does not have (`incomparable` says which).
    """
    scale = scale_verdict(run_scale(measured), paper.get("scale", {}))
    sources, depends = quantities(paper.get("source", {})), quantities(paper.get("depends_on", {}))
    table = []
    for keys, (kind, reference) in numbers(paper).items():
        quantity = ".".join(keys)
        row = _row(kind, keys, reference, measured(keys[0]))
        table.append({**row, "source": sources.get(quantity, NO_SOURCE)})
        reason = _incomparable(scale, depends.get(quantity))
        if reason:
            table[-1].update(ratio=None, incomparable=reason)
    return Table(table, scale)


def _row(kind: str, keys: tuple[str, ...], reference: float, record: Any) -> dict[str, Any]:
    """One row: the measured number at `keys`, its ratio to `reference`, its interval where the record has one."""
    failed = _failed_verdict(record, keys[1:])
    found = None if failed else _number_at(record, keys[1:])
    row = {"quantity": ".".join(keys), "kind": kind, REFERENCE_KEY[kind]: reference, "measured": found,
           "ratio": found / reference if found is not None and reference else None}
    if failed:
        row["not_applicable"] = "; ".join(failed["reasons"])
    interval = _interval_at(record, keys[1:])
    if found is not None and interval:
        row.update(interval=interval, reference_in_interval=interval[0] <= reference <= interval[1])
    return row


def reference(row: Mapping[str, Any]) -> Any:
    """The number a row compares with: the paper's, or memscan's derivation."""
    return row.get("paper", row.get("derived"))


def _failed_verdict(record: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The failed verdict beside the number at `keys` (a floor whose premises fail), or None: such a number
    is a verdict, not a figure to divide by the paper's."""
    parent = _object_at(record, keys[:-1])
    verdict = parent.get("verdict") if isinstance(parent, Mapping) else None
    return verdict if isinstance(verdict, Mapping) and verdict.get("applicable") is False else None


def _interval_at(record: Any, keys: tuple[str, ...]) -> list[float] | None:
    """[low, high] beside the number at `keys` (a fitted exponent's or slope's interval), or None."""
    bounds = [_number_at(record, (*keys[:-1], end)) for end in ("low", "high")]
    return None if None in bounds else bounds


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


# ---------------------------------------------------------------- comparison.json and the terminal


def document(plan: Mapping[str, Any], table: Table) -> dict[str, Any]:
    """comparison.json: the experiment, whether the run is reduced and why, both scales, and the rows."""
    return {"format": "memscan.comparison", "format_version": 2, "experiment": plan["experiment"]["name"],
            "reproduces": plan["experiment"]["reproduces"], "reduced": table.scale["reduced"],
            "scale_note": scale_note(table.scale), "scale": table.scale, "rows": list(table)}


def text(table: list[dict[str, Any]]) -> list[str]:
    """The rows as aligned plain-text lines for the terminal, after the scale note where `table` has one."""
    def shown(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    cells = [("quantity", "kind", "reference", "measured", "measured/reference")]
    cells += [(row["quantity"], row["kind"], shown(reference(row)),
               "not applicable" if "not_applicable" in row else shown(row["measured"]),
               "incomparable" if "incomparable" in row else shown(row["ratio"])) for row in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    notes = [f"{row['quantity']}: {note}" for row in table for note in _notes(row)]
    return ([scale_note(table.scale)] if isinstance(table, Table) else []) + lines + notes


def _notes(row: Mapping[str, Any]) -> list[str]:
    """What a row's cells cannot hold: why it is not applicable or incomparable, its interval."""
    notes = [f"not applicable: {row['not_applicable']}"] if "not_applicable" in row else []
    notes += [f"incomparable: {row['incomparable']}"] if "incomparable" in row else []
    if "interval" in row:
        low, high = row["interval"]
        inside = "inside" if row["reference_in_interval"] else "outside"
        whose = "the paper's" if row["kind"] == PAPER else "memscan's"
        notes.append(f"interval [{low:.4g}, {high:.4g}]; {whose} {reference(row):.4g} is {inside} it")
    return notes
