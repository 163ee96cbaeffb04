"""The saturation page: norm growth with its fits, cosines by layer and head spread of a `memscan saturation`
folder, in its report.html (listed in its report.json); the run page shows the same figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import memscan.store as store
from memscan.report.page import PAGE, Plot, Section, key_values, write_page
from memscan.report.plots import axes, embed, report_files
from memscan.saturation import GROWTH_LAWS, read_summary


def render_saturation(folder: str | Path, allow_other_files: bool = False,
                      examples: pd.DataFrame | None = None) -> list[str]:
    """report.html of a `memscan saturation` folder, listed in its report.json: norm growth with its fits,
    cosines by layer, head spread; returns the names written."""
    folder = Path(folder)
    with report_files(folder, (PAGE,), allow_other_files) as written:
        summary = read_summary(folder)  # its tables checked against their sha256
        numbers = key_values("key numbers", [
            ("target", summary.get("target")), ("scale c", summary.get("scale")),
            ("heads attending like argmax", summary.get("argmax_heads")), ("heads", summary.get("heads")),
            ("mean share of the prefix attended", summary.get("mean_heads_fraction"))])
        section = Section("Norm growth and saturation", (), (numbers,), _saturation_plots(folder, summary))
        written.append(write_page(folder, "folder.html", "memscan report: saturation", [section], examples,
                                  kind="saturation", command="memscan saturation"))
    return written


def saturation_section(folder: Path, href: str) -> Section:
    """The saturation folder's figures as a section of another page, linking to its own page at `href`."""
    return Section("Norm growth and saturation", (), (), _saturation_plots(folder, read_summary(folder)),
                   (("the saturation folder's page", href),))


def _saturation_plots(folder: Path, summary: dict[str, Any]) -> list[Plot]:
    """The folder's figures (norm growth only where the target was a training run)."""
    plots = []
    if summary["norm_growth"]:
        plots.append(Plot("norm growth", embed(_norm_growth_figure(summary["norm_growth"]))))
    plots.append(Plot("saturation by layer", embed(_cosines_figure(folder, summary["scale"]))))
    plots.append(Plot("saturated heads", embed(_heads_figure(folder))))
    return plots


def _norm_growth_figure(growth: dict[str, Any]) -> Any:
    """||theta_t|| against the step, with each growth law's least-squares fit."""
    steps, norms = np.array(growth["steps"], float), np.array(growth["norms"])
    fig, ax = axes(7, 4)
    ax.plot(steps, norms, "o", label="||theta_t||")
    grid = np.linspace(steps.min(), steps.max(), 200)
    for law, fit in growth["fits"].items():
        ax.plot(grid, fit["a"] + fit["b"] * GROWTH_LAWS[law](grid), label=f"{law}: R^2 {fit['r2']:.3f}")
    ax.set(xlabel="step t", ylabel="parameter norm", title="Norm growth")
    ax.legend()
    return fig


def _cosines_figure(folder: Path, scale: float) -> Any:
    """The per-layer cosine between the hidden states at theta and at c theta."""
    cos = store.read_table(folder / "saturation.parquet").to_pandas()
    fig, ax = axes(7, 4)
    ax.plot(cos.layer, cos.cosine, marker="o")
    ax.set(xlabel="layer", ylabel=f"cos(h(theta), h({scale:g} theta))", ylim=(-1.02, 1.02),
           title="Saturation by layer")
    return fig


def _heads_figure(folder: Path) -> Any:
    """The histogram of the heads' mean share of the causal prefix attended."""
    heads = store.read_table(folder / "heads.parquet").to_pandas()
    fig, ax = axes(7, 4)
    ax.hist(heads.mean_fraction, bins=20, range=(0, 1))
    ax.set(xlabel="mean share of the causal prefix attended (> 1e-5)", ylabel="heads",
           title="Saturated heads: argmax (left) to uniform (right)")
    return fig
