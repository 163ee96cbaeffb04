"""The verbatim page: a `memscan verbatim` folder's report.html (listed in its report.json) with each split's
match fraction and extractable rate (bootstrap intervals) and the distribution of the match fraction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import memscan.store as store
from memscan import files, folders, show
from memscan.report.page import PAGE, Plot, Section, Table, interval, key_values, write_page
from memscan.report.plots import axes, embed, report_files
from memscan.verbatim import VERBATIM, VerbatimResult


def render_verbatim(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                    ) -> list[str]:
    """report.html of a `memscan verbatim` folder, listed in its report.json; returns the names written.
    `examples`: prompts with their true and generated suffixes (memscan.show), shown as a table; None:
    `show.for_page`'s, an empty frame: none."""
    folder = Path(folder)
    examples = show.for_page(folder) if examples is None else examples
    result = VerbatimResult(folder, folders.read_record(folder, folders.VERBATIM))
    entries = {entry["name"]: entry for entry in result.record["tables"]}
    table = store.read_table(files.check_file(folder, entries[VERBATIM], "table")).to_pandas()
    settings = result.record["settings"]
    with report_files(folder, (PAGE,), allow_other_files) as written:
        numbers = key_values("settings", [(key, settings.get(key)) for key in
                                          ("num_chunks", "prompt_tokens", "suffix_tokens", "resamples", "seed")])
        section = Section("Verbatim extraction", (), (splits_table(result.splits), numbers),
                          (Plot("match fraction per split", embed(_match_figure(table, settings))),))
        written.append(write_page(folder, "verbatim.html", "memscan report: verbatim", [section], examples))
    return written


def splits_table(splits: dict[str, dict[str, Any]]) -> Table:
    """Per split: chunks decoded, the mean match fraction and the extractable rate, each `value [low, high]`."""
    rows = [(split, f"{entry.get('chunks', 0):,}", interval(entry.get("match_fraction")),
             interval(entry.get("extractable_rate"))) for split, entry in splits.items()]
    return Table("Per split: value [95% bootstrap interval]", ("split", "chunks", "match fraction",
                                                               "extractable rate"), rows)


def _match_figure(table: pd.DataFrame, settings: dict[str, Any]) -> Figure:
    """The CDF of the greedy suffix's match fraction, one curve per split (splits of different sizes compare)."""
    fig, ax = axes(7, 4)
    for split, rows in table.groupby("split", sort=True):
        values = np.sort(rows.match_fraction.to_numpy(np.float64))
        ax.step(np.append(0.0, values), np.arange(len(values) + 1) / len(values), where="post",
                label=f"{split}: {len(values):,} chunks")
    ax.set(xlabel=f"share of the {settings.get('suffix_tokens')} suffix tokens reproduced", xlim=(-0.02, 1.02),
           ylabel="share of chunks at or below", ylim=(0, 1.02), title="Greedy suffix match fraction")
    ax.legend(fontsize=8, loc="lower right")
    return fig
