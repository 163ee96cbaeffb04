"""The assoc page: error against d and against T with docs/theory.md's rates, and SGD's q against q_gamma, of
an assoc sweep folder, listed in its report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import memscan.store as store
from memscan.assoc import Q_TABLE, SWEEP_TABLE, THEORY_SLOPES, read_settings
from memscan.report.plots import axes, report_files, save

ERROR_D_IMAGE, ERROR_T_IMAGE, SGD_Q_IMAGE = IMAGES = ("error_vs_d.png", "error_vs_T.png", "sgd_q.png")


def render_assoc(folder: str | Path, allow_other_files: bool = False) -> list[str]:
    """Plots of an assoc sweep folder, listed in its report.json: error against d and against T with
    docs/theory.md's rates, and SGD's q against q_gamma."""
    folder = Path(folder)
    with report_files(folder, IMAGES, allow_other_files) as written:
        written += _assoc_plots(folder)
    return written


def _assoc_plots(folder: Path) -> list[str]:
    """The sweep's figures (SGD's q only where the sweep trained SGD); their names."""
    settings = read_settings(folder)["settings"]
    table = store.read_table(folder / SWEEP_TABLE).to_pandas()
    names = [save(_error_vs_d_figure(table, settings), folder / ERROR_D_IMAGE),
             save(_error_vs_T_figure(table, settings), folder / ERROR_T_IMAGE)]
    q = store.read_table(folder / Q_TABLE).to_pandas()
    if not q.empty:
        names.append(save(_sgd_q_figure(q), folder / SGD_Q_IMAGE))
    return names


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
