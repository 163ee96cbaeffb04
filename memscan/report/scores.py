"""The membership page: a `memscan score` folder's report.html (listed in its report.json) with the ROC curves on
a log FPR axis, the AUC and TPR at 1% FPR of every score with their bootstrap intervals, and the bridge plot.

Each figure is drawn on a matplotlib Figure of its own (no pyplot state) and embedded in the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from memscan import files, folders, membership, show
from memscan.report.page import PAGE, Plot, Section, Table, interval, write_page
from memscan.report.plots import embed, report_files
from memscan.score import SPLITS, ScoreResult, orientation


def render_scores(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                  ) -> list[str]:
    """report.html of a `memscan score` folder, listed in its report.json; returns the names written.

    Called after the score job (`memscan score`, an experiment's score stage); holds the folder's
    lock while it draws. `allow_other_files`: files memscan did not write may be in the folder.
    `examples`: the most member-like chunks with their text (memscan.show), shown as a table; None: `show.for_page`'s,
    an empty frame: none.
    """
    folder = Path(folder)
    examples = show.for_page(folder) if examples is None else examples
    with files.folder_lock(folder, "FOLDER"):
        table, metrics = _score_run(folder)
        with report_files(folder, (PAGE,), allow_other_files) as written:
            sections = [Section("Membership", _skipped(metrics), (metrics_table(metrics, table.column_names),),
                                (Plot("ROC per score (log false positive rate)", _roc(table, metrics)),)),
                        Section("Bridge", (), (), (Plot("the views on the same chunks", _bridge(table, metrics)),))]
            written.append(write_page(folder, "scores.html", "memscan report: membership", sections, examples))
    return written


def metrics_table(metrics: dict[str, Any], columns: list[str]) -> Table:
    """One row per rated score: which side is member-like, members and non-members, AUC and TPR at 1% and 0.1%
    FPR, each `value [low, high]` (the bootstrap interval metrics.json holds)."""
    sides = orientation(metrics, columns)
    rows = [(name, sides.get(name, "larger"), f"{row.get('members', 0):,}", f"{row.get('non_members', 0):,}",
             interval(row.get("auc")), interval(row.get("tpr@1%fpr")), interval(row.get("tpr@0.1%fpr")))
            for name, row in metrics["scores"].items()]
    return Table("Scores: value [95% bootstrap interval]", ("score", "member when", "members", "non-members",
                                                            "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR"), rows)


def _skipped(metrics: dict[str, Any]) -> list[str]:
    skipped = metrics.get("skipped") or {}
    return [f"Not rated: {'; '.join(f'{name} ({why})' for name, why in skipped.items())}."] if skipped else []


def _score_run(folder: Path) -> tuple[Any, dict[str, Any]]:
    """A `memscan score` folder's scores table (pyarrow; each column what its name says, a version-1 folder's
    turned back) and metrics, checked against its signed summary."""
    result = ScoreResult(folder, folders.read_record(folder, folders.SCORES))
    return result.scores, result.metrics


def _roc(table: Any, metrics: dict[str, Any]) -> str:
    """ROC curves of every rated score (each ranked by its side, metrics' `orientation`), FPR on a log axis as the
    field plots them, as a data URI."""
    labels = np.asarray(table.column("label"))
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    floor = 1.0 / max(1, int((labels == 0).sum()))   # the smallest non-zero FPR these chunks can show
    sides = orientation(metrics, table.column_names)
    for name, row in metrics["scores"].items():
        values = membership.oriented(np.asarray(table.column(name), np.float64), sides[name])
        keep = np.isfinite(values)
        fpr, tpr, _ = membership.roc_curve(values[keep], labels[keep])
        ax.step(np.maximum(fpr, floor / 2), tpr, where="post", label=f"{name} (AUC {row['auc']['value']:.3f})")
    grid = np.logspace(np.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set(xlabel="false positive rate (non-members called members)", ylabel="true positive rate",
           title="Membership: ROC per score", ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    return embed(fig)


def bridge_points(table: Any) -> dict[str, Any] | None:
    """What the bridge scatter draws, one entry (m,) per chunk of a scores table; None when it has no x.

    x is the geometry (the `nearest` column: distance to the nearest other pattern for
    members, to the nearest pattern for held-out chunks) where the score run had a query
    run, else the verbatim match fraction; y is the loss in nats (the `loss` column);
    `extractable` is True where the verbatim run found the whole suffix (False where it did
    not or did not sample the chunk).
    """
    names = set(table.column_names)

    def column(name: str) -> np.ndarray:
        return np.asarray(table.column(name), np.float64)

    if "nearest" in names:
        x, x_label = column("nearest"), "distance to the nearest (other) training pattern"
    elif "verbatim_match_fraction" in names:
        x, x_label = column("verbatim_match_fraction"), "verbatim match fraction (greedy suffix)"
    else:
        return None
    extractable = column("verbatim_extractable") == 1 if "verbatim_extractable" in names else np.zeros(len(x), bool)
    return {"x": x, "x_label": x_label, "y": column("loss"), "split": np.asarray(table.column("split")).astype(str),
            "extractable": extractable}


def _bridge_scatter(ax: Any, points: dict[str, Any]) -> None:
    """One view against another on the same chunks: colour = split, filled marker = verbatim-extractable."""
    for split, colour in zip(SPLITS, ("tab:red", "tab:blue")):
        for filled in (True, False):
            keep = (points["split"] == split) & (points["extractable"] == filled) & np.isfinite(points["x"])
            if keep.any():
                ax.scatter(points["x"][keep], points["y"][keep], s=14, alpha=0.7, edgecolors=colour,
                           facecolors=colour if filled else "none",
                           label=f"{split} ({'member' if split == 'train' else 'non-member'})"
                                 f"{', extractable' if filled else ''}: {int(keep.sum()):,}")
    ax.set(xlabel=points["x_label"], ylabel="loss (mean nll over the chunk, nats)",
           title="The views on the same chunks (filled: verbatim-extractable)")
    ax.legend(fontsize=7)


def _bridge_heatmap(fig: Any, ax: Any, spearman: dict[str, dict[str, float | None]], sides: dict[str, str]) -> None:
    """The Spearman matrix of metrics.json's bridge; blank where a pair has no rank correlation. A score whose
    members lie on the smaller side (`sides`) is marked with a down arrow."""
    names = list(spearman)
    matrix = np.array([[np.nan if spearman[a].get(b) is None else spearman[a][b] for b in names] for a in names])
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [f"{name} \N{DOWNWARDS ARROW}" if sides.get(name) == "smaller" else name for name in names]
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    if len(names) <= 14:    # beyond that the numbers no longer fit their cells
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("Spearman rank correlation of the columns (\N{DOWNWARDS ARROW}: smaller = member)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)


def _bridge(table: Any, metrics: dict[str, Any]) -> str:
    """The bridge plot as a data URI. Left, where the run has a geometric or verbatim column: loss against
    nearest-pattern distance (or the verbatim match fraction), coloured by split, filled where the chunk is
    verbatim-extractable. Right: the heatmap of metrics.json's Spearman matrix."""
    points = bridge_points(table)
    fig = Figure(figsize=(13, 6.4) if points else (7, 6.4))
    axes = fig.subplots(1, 2 if points else 1, squeeze=False)[0]
    if points:
        _bridge_scatter(axes[0], points)
    # a version-1 folder's correlations are of its columns as written then, every score larger = member
    _bridge_heatmap(fig, axes[-1], metrics["bridge"]["spearman"], metrics.get("orientation", {}))
    return embed(fig)
