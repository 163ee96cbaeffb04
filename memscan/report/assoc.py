"""The assoc page: error against d and against T with docs/theory.md's rates, SGD's q against q_gamma, and the
fitted slopes where `memscan assoc fit` ran, in an assoc sweep folder's report.html (listed in its report.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import memscan.store as store
from memscan import folders
from memscan.assoc import Q_TABLE, SWEEP_TABLE, THEORY_SLOPES, read_settings
from memscan.report.page import PAGE, Plot, Section, Table, cell, key_values, write_page
from memscan.report.plots import axes, embed, report_files


def render_assoc(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                 ) -> list[str]:
    """report.html of an assoc sweep folder, listed in its report.json: error against d and against T with
    docs/theory.md's rates, SGD's q against q_gamma, the fitted slopes; returns the names written."""
    folder = Path(folder)
    with report_files(folder, (PAGE,), allow_other_files) as written:
        settings = read_settings(folder)["settings"]
        tables = [key_values("the sweep", list(settings.items()))]
        fit = folders.records(folder).get(folders.FIT)   # a sound fit.json only (`memscan assoc fit`)
        if fit is not None:
            tables.insert(0, _slopes_table(fit))
        section = Section("Associative-memory scaling", (), tables, _assoc_plots(folder, settings))
        written.append(write_page(folder, "folder.html", "memscan report: assoc sweep", [section], examples,
                                  kind="assoc sweep", command="memscan assoc sweep"))
    return written


def _slopes_table(fit: dict[str, Any]) -> Table:
    """Each scheme's fitted log-log slope with its interval against the theory's rate (or why it has none)."""
    rows = []
    for scheme, slope in fit.get("slopes", {}).items():
        measured = (f"{slope['slope']:.3f} [{slope['low']:.3f}, {slope['high']:.3f}]" if "slope" in slope
                    else f"not fitted: {slope.get('missing', 'no slope')}")
        rows.append((scheme, cell(slope.get("axis")), cell(slope.get("theory")), measured))
    return Table(f"Fitted slopes (alpha = {cell(fit.get('alpha'))})", ("scheme", "against", "theory", "measured"),
                 rows)


def _assoc_plots(folder: Path, settings: dict[str, Any]) -> list[Plot]:
    """The sweep's figures (SGD's q only where the sweep trained SGD)."""
    table = store.read_table(folder / SWEEP_TABLE).to_pandas()
    plots = [Plot("error against d", embed(_error_vs_d_figure(table, settings))),
             Plot("error against T", embed(_error_vs_T_figure(table, settings)))]
    q = store.read_table(folder / Q_TABLE).to_pandas()
    if not q.empty:
        plots.append(Plot("SGD's q against q_gamma", embed(_sgd_q_figure(q))))
    return plots


def _error_vs_d_figure(table: Any, settings: dict[str, Any]) -> Any:
    """Each scheme's mean error against d at the largest T, dotted: the theory's rate in d."""
    alpha, largest_T = settings["alpha"], max(settings["samples"])
    fig, ax = axes(7, 4.5)
    for scheme in ("p", "p_hat", "threshold", "top_seen", "seen"):
        rows = table[(table.scheme == scheme) & ((table["T"] == 0) | (table["T"] == largest_T))]
        if rows.empty:
            continue
        curve = rows.groupby("d").error.mean()
        line, = ax.loglog(curve.index, curve.values, marker="o", label=scheme)
        if scheme in THEORY_SLOPES and THEORY_SLOPES[scheme][0] == "d":
            rate = THEORY_SLOPES[scheme][1](alpha)
            ax.loglog(curve.index, curve.values[0] * (curve.index / curve.index[0]) ** rate, ":", color=line.get_color())
    ax.set(xlabel="memory dimension d", ylabel="population error", title=f"Error against d (T = {largest_T:,}; dotted: theory)")
    ax.legend()
    return fig


def _error_vs_T_figure(table: Any, settings: dict[str, Any]) -> Any:
    """The learned schemes' mean error against T at the largest and smallest d, with the rate T^(-1 + 1/alpha)."""
    alpha, largest_d = settings["alpha"], max(settings["dims"])
    fig, ax = axes(7, 4.5)
    for d_value, style in ((largest_d, "-"), (min(settings["dims"]), "--")):
        for scheme in ("seen", "p_hat", "top_seen"):
            rows = table[(table.scheme == scheme) & (table.d == d_value)]
            if not rows.empty:
                curve = rows.groupby("T").error.mean()
                ax.loglog(curve.index, curve.values, style, marker="o", label=f"{scheme}, d={d_value}")
    T = np.array(sorted(settings["samples"]), float)
    ax.loglog(T, 0.5 * T ** (-1 + 1 / alpha), "k:", label=f"T^({-1 + 1 / alpha:.2f})")
    ax.set(xlabel="samples T", ylabel="population error", title="Error against T (dashed: overflow at small d)")
    ax.legend(fontsize=8)
    return fig


def _sgd_q_figure(q: Any) -> Any:
    """SGD's measured q(x) against the q_gamma approximation, by how often each token was seen."""
    fig, ax = axes(7, 4.5)
    for scheme, marker in (("sgd_small", "o"), ("sgd_large", "x")):
        rows = q[(q.scheme == scheme) & (q["T"] == q["T"].max()) & (q.d == q.d.max())]
        ax.scatter(rows["count"], rows.q_measured, s=10, marker=marker, label=f"{scheme}: measured")
        ax.scatter(rows["count"], rows.q_gamma, s=10, marker="_", label=f"{scheme}: q_gamma")
    ax.set(xscale="log", yscale="symlog", xlabel="times the token was seen", ylabel="q(x)",
           title="SGD's learned q against the q_gamma approximation")
    ax.legend(fontsize=8)
    return fig
