"""One self-contained HTML page per folder: the jinja2 templates (memscan/report/templates, autoescaped), the
page's parts as small records, and writing report.html.

Every string on a page comes from a file a user may have written (split names, paths, texts),
so the templates escape every value (jinja2 autoescape); figures are PNG data URIs, the style
is inline, and nothing is fetched: the page opens from anywhere, offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import numpy as np
import pandas as pd

from memscan import files, wording

PAGE = "report.html"
TEXT_COLUMN_CHARS = 40   # an examples column holding a longer value is running text
EXAMPLE_TEXT_CHARS = 2_000   # an example's text past this is cut (with an ellipsis): a page stays readable

_ENVIRONMENT = jinja2.Environment(loader=jinja2.PackageLoader("memscan.report", "templates"),
                                  autoescape=True, undefined=jinja2.StrictUndefined,
                                  trim_blocks=True, lstrip_blocks=True)


class Table(NamedTuple):
    """A table of text cells: its caption, column names and rows (each a list as long as `header`)."""
    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


class Plot(NamedTuple):
    """One embedded figure: its caption and its `data:image/png;base64,...` URI."""
    caption: str
    uri: str


@dataclass(frozen=True)
class Section:
    """A titled part of a page: paragraphs, tables, figures and links ((text, relative href)), in that order."""

    title: str
    notes: Sequence[str] = ()
    tables: Sequence[Table] = ()
    plots: Sequence[Plot] = ()
    links: Sequence[tuple[str, str]] = field(default_factory=tuple)


def cell(value: Any) -> str:
    """A value as table text: floats to 4 significant digits, integers with thousands separators, None as n/a, a
    floor with its verdict (wording.floor_text), anything else as its string."""
    if isinstance(value, dict) and "predicted_floor" in value:
        return wording.floor_text(value)
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def interval(entry: dict[str, Any] | None, spec: str = ".3f") -> str:
    """A {value, low, high} estimate as `value [low, high]`; n/a where it is missing, with its reason where the
    record gives one (a TPR at an FPR too low for the non-members rated)."""
    if not isinstance(entry, dict) or entry.get("value") is None:
        reason = entry.get("reason") if isinstance(entry, dict) else None
        return f"n/a ({reason})" if reason else "n/a"
    low, high = entry.get("low"), entry.get("high")
    bounds = f" [{wording.number(low, spec)}, {wording.number(high, spec)}]" if low is not None else ""
    return format(entry["value"], spec) + bounds


def key_values(caption: str, pairs: Sequence[tuple[str, Any]]) -> Table:
    """A two-column table of named values (each formatted by `cell`)."""
    return Table(caption, ("quantity", "value"), [(name, cell(value)) for name, value in pairs])


def examples_table(examples: pd.DataFrame | None) -> Table | None:
    """The examples a caller chose (memscan.show's frames) as a table, every column as text and long texts cut;
    None where there are none (the page then has no examples section)."""
    if examples is None or examples.empty:
        return None
    rows = [[_example_text(value) for value in row] for row in examples.itertuples(index=False, name=None)]
    return Table(f"{len(examples):,} examples", [str(name) for name in examples.columns], rows)


def _text_columns(table: Table | None) -> list[str]:
    """The examples' columns of running text (some value longer than TEXT_COLUMN_CHARS): set as wrapped
    monospace; the others (ids, splits, numbers) stay on one line."""
    if table is None:
        return []
    return [name for column, name in enumerate(table.header)
            if any(len(row[column]) > TEXT_COLUMN_CHARS for row in table.rows)]


def _example_text(value: Any) -> str:
    text = cell(value)
    return text if len(text) <= EXAMPLE_TEXT_CHARS else text[:EXAMPLE_TEXT_CHARS] + "\N{HORIZONTAL ELLIPSIS}"


def write_page(folder: Path, template: str, title: str, sections: Sequence[Section],
               examples: pd.DataFrame | None = None, **context: Any) -> str:
    """Render `template` (extending base.html) into the folder's report.html, atomically; returns its name."""
    table = examples_table(examples)
    text = _ENVIRONMENT.get_template(template).render(title=title, sections=sections, folder=str(folder),
                                                      examples=table, example_texts=_text_columns(table), **context)
    files.write_text_atomic(Path(folder) / PAGE, text)
    return PAGE


def fragment(template: str, **context: Any) -> str:
    """A template rendered alone (a part of a page, escaped as the pages are)."""
    return _ENVIRONMENT.get_template(template).render(**context)
