"""`memscan show FOLDER`: the top examples of a query run, a scores folder or a verbatim folder, with their text."""

from __future__ import annotations

import json
from typing import Any

import click
import pandas as pd

from memscan import show as examples
from memscan.cli.options import Command

WIDTH = 160   # a text is cut to this many characters in the terminal layout
NESTED = ("neighbours", "tokens")   # columns holding a list per example: JSON text in a CSV cell


@click.command(cls=Command)
@click.argument("folder", type=click.Path())
@click.option("--by", default=None, help="Column to rank by (default: a run's nearest_dist, a scores folder's loss, "
                                         "a verbatim folder's match_fraction).")
@click.option("--top", "n", default=examples.DEFAULT_TOP, show_default=True, type=int, help="Examples to show.")
@click.option("--ascending/--descending", default=None,
              help="Smallest or largest first (default: a score's member side; a run's nearest first).")
@click.option("--format", "output", type=click.Choice(["text", "json", "csv"]), default="text", show_default=True,
              help="text for reading; json (one record a line) or csv for scripts.")
def show(folder: str, by: str | None, n: int, ascending: bool | None, output: str) -> None:
    """The top examples of a folder by one column, each with its text: a query run's queries with their nearest
    training chunks, a scores folder's most member-like chunks, a verbatim folder's suffixes token by token."""
    kind, frame = examples.top(folder, by, n, ascending)
    if output == "json":
        click.echo(frame.to_json(orient="records", lines=True), nl=False)
    elif output == "csv":
        nested = {name: frame[name].map(json.dumps) for name in NESTED if name in frame}
        click.echo(frame.assign(**nested).to_csv(index=False), nl=False)
    else:
        click.echo("\n".join(_text(kind, frame, by or examples.default_by(kind))))


def _cut(text: Any) -> str:
    """A text on one line, cut to WIDTH characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


def _text(kind: str, frame: pd.DataFrame, by: str) -> list[str]:
    """The terminal layout: each example's heading, its value of `by`, its texts indented below."""
    lines = []
    for number, row in enumerate(frame.itertuples(index=False), 1):
        values = row._asdict()
        label = f", label {values['label']}" if "label" in values else ""
        key = values.get("doc_key")
        document = f"document {key}" if isinstance(key, str) else f"doc {values['doc_id']}"
        where = f"{document} chunk {values['chunk_id']} ({values['split']}{label})"
        lines.append(f"#{number} {where}  {by}={values[by]:.4g}" if isinstance(values[by], float)
                     else f"#{number} {where}  {by}={values[by]}")
        lines += _body(kind, values)
        lines.append("")
    return lines


def _body(kind: str, values: dict[str, Any]) -> list[str]:
    if kind == "query run":
        return [f"    query   {_cut(values['text'])}"] + [
            f"    {n['rank']:>2}. {n['dist']:.4g}  {_cut(n['text'])}" for n in values["neighbours"]]
    if kind == "verbatim":
        marked = examples.marked(values["tokens"])
        return [f"    prompt  {_cut(values['prompt'])}", f"    true    {_cut(values['true_suffix'])}",
                f"    model   {_cut(marked)}   ([...]: tokens equal to the true suffix)"]
    return [f"    {_cut(values['text'])}"]
