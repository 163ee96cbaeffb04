"""A2, coverage: the share of held-out activations inside a pattern's ball of a given radius."""

from __future__ import annotations

import numpy as np

from memscan import analysis
from memscan.query.context import Layer
from memscan.query.distances import Radii
from memscan.query.summary import Coverage


def coverage_rows(layer: Layer, nearest: np.ndarray, radius: float) -> dict[str, np.ndarray]:
    """The layer's rows of the coverage table: the share of queries covered at 101 radii up to past the largest."""
    radii = np.linspace(0, float(max(nearest.max(), 2 * radius)) * 1.05, 101)
    return {"layer": np.full(len(radii), layer.layer, np.int16), "radius": radii,
            "coverage": analysis.coverage(nearest, radii)}


def covered(nearest: np.ndarray, radii: Radii) -> Coverage:
    """The summary's A2: the share of queries within r*, the typical radius and the --radius value."""
    return Coverage(*(float(analysis.coverage(nearest, [value])[0])
                      for value in (radii.r_star, radii.typical, radii.radius)))
