"""The saturation page: norm growth with its fits, cosines by layer and head spread of a `memscan saturation`
folder, listed in its report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import memscan.store as store
from memscan.report.plots import axes, report_files, save
from memscan.saturation import GROWTH_LAWS, read_summary

NORM_GROWTH_IMAGE, SATURATION_IMAGE, HEADS_IMAGE = IMAGES = ("norm_growth.png", "saturation.png", "heads.png")


def render_saturation(folder: str | Path, allow_other_files: bool = False) -> list[str]:
    """Plots of a `memscan saturation` folder, listed in its report.json: norm growth with its fits, cosines by
    layer, head spread."""
    folder = Path(folder)
    with report_files(folder, IMAGES, allow_other_files) as written:
        written += _saturation_plots(folder)
    return written


def _saturation_plots(folder: Path) -> list[str]:
    """The folder's figures (norm growth only where the target was a training run); their names."""
    summary = read_summary(folder)  # its tables checked against their sha256
    names = []
    if summary["norm_growth"]:
        names.append(save(_norm_growth_figure(summary["norm_growth"]), folder / NORM_GROWTH_IMAGE))
    names.append(save(_cosines_figure(folder, summary["scale"]), folder / SATURATION_IMAGE))
    names.append(save(_heads_figure(folder), folder / HEADS_IMAGE))
    return names


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
