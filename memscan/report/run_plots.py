"""The run page's figures: per (site, layer) the nearest-distance CDFs, the loss against distance, and the radius
through depth; each a matplotlib Figure embedded in the page.

Distances are drawn as empirical CDFs (the share of a group at or below each distance), not
counts, so groups of different sizes (d' queries, d patterns, subsets of the patterns) compare.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from memscan.report.plots import axes


def cdf(h: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One histogram table's rows (bin_left, bin_right, count) as its CDF's steps: x (the bins' edges) and the
    share of the group at or below each edge (0 at the first); empty arrays where the group is empty."""
    rows = h.sort_values("bin_left")
    counts = rows["count"].to_numpy(np.float64)
    if counts.sum() <= 0:
        return np.array([]), np.array([])
    x = np.append(rows.bin_left.to_numpy(np.float64)[:1], rows.bin_right.to_numpy(np.float64))
    return x, np.append(0.0, np.cumsum(counts) / counts.sum())


def _marks(ax: Axes, layer: dict[str, Any]) -> None:
    ax.axvline(layer["r_star"], color="k", linestyle=":", linewidth=1, label="r*")
    ax.axvline(2 * layer["r_star"], color="grey", linestyle=":", linewidth=1, label="2r*")
    if layer.get("typical_radius") is not None:
        ax.axvline(layer["typical_radius"], color="r", linestyle="--", linewidth=1, label="typical radius")


def distances_figure(h: pd.DataFrame, layer: dict[str, Any], title: str) -> Figure:
    """Left: CDFs of the queries' nearest-pattern distance (A2's coverage at each radius) and the patterns'
    nearest-other distance s_i. Right: s_i's CDF over the growing subsets of the patterns (the paper's 25-100%)."""
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    for table, label, style in (("query_nearest", "queries: nearest pattern (A2 coverage)", "-"),
                                ("pattern_nearest_100", "patterns: nearest other s_i", "--")):
        x, y = cdf(h[h.table == table])
        if len(x):
            left.step(x, y, where="post", linestyle=style, label=f"{label}, {int(h[h.table == table]['count'].sum()):,}")
    _marks(left, layer)
    left.set(xlabel="nearest-neighbour distance", ylabel="share at or below", ylim=(0, 1.02),
             title=f"Nearest distances, {title}")
    left.legend(fontsize=7, loc="lower right")
    for table in sorted((t for t in h.table.unique() if t.startswith("pattern_nearest_")),
                        key=lambda t: int(t.rsplit("_", 1)[1])):
        x, y = cdf(h[h.table == table])
        if len(x):
            right.step(x, y, where="post", label=f"{table.rsplit('_', 1)[1]}% of the patterns")
    right.axvline(2 * layer["r_star"], color="grey", linestyle=":", linewidth=1, label="2r*")
    right.set(xlabel="nearest-other distance s_i", ylabel="share at or below", ylim=(0, 1.02),
              title="Pattern spacing over subsets")
    right.legend(fontsize=7, loc="lower right")
    return fig


def loss_figure(q: pd.DataFrame, title: str) -> Figure:
    """Each query's next-token loss against its distance to the nearest pattern."""
    fig, ax = axes(7, 4)
    ax.scatter(q.nearest_dist, q.nll, s=6, alpha=0.5)
    ax.set(xlabel="distance to nearest pattern", ylabel="next-token loss (nats)", title=f"Distance against loss, {title}")
    return fig


def depth_figure(by_site: dict[str, list[dict[str, Any]]]) -> Figure:
    """The typical radius and r* through depth, one pair of lines per site."""
    fig, ax = axes(7, 4)
    for site, entries in by_site.items():
        layers = [s["layer"] for s in entries]
        typical = np.array([s["typical_radius"] for s in entries], np.float64)   # null (undefined): a gap
        line, = ax.plot(layers, typical, marker="o", label=f"typical radius, {site}")
        ax.plot(layers, [s["r_star"] for s in entries], linestyle=":", color=line.get_color(), label=f"r*, {site}")
    ax.set(xlabel="layer (hidden) or block (other sites)", ylabel="radius", title="Radius through depth, per site")
    ax.legend(fontsize="small")
    return fig
