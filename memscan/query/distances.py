"""The patterns' own statistics: their metadata and norms, their self-join (the spacing s_i), the radii that
follow from it, and the histograms of nearest-other distances."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from memscan import analysis, theory
from memscan.knn import exact
from memscan.knn.index import InnerMaxima
from memscan.query.context import Layer, refuse_missing
from memscan.query.summary import RadiusChoice


class PatternMeta(NamedTuple):
    """Per pattern, in row order (d,): row id, next token, loss and squared norm (float64)."""

    row_id: np.ndarray
    next_token_id: np.ndarray
    nll: np.ndarray
    sq_norm: np.ndarray


def pattern_meta(layer: Layer) -> PatternMeta:
    """Row id, next token, loss and squared norm of every pattern: the columns read without the vectors, the norms
    streamed from the layer's pattern blocks (the index's own codes where it holds them; vectors not kept)."""
    columns = layer.patterns.columns(layer.pattern_split, layer.layer, ("row_id", "next_token_id", "nll"))
    norms, row_ids = [], []
    for ids, X in layer.pattern_blocks():
        X64 = X.astype(np.float64)
        norms.append(np.einsum("ij,ij->i", X64, X64))
        row_ids.append(ids)
    assert np.array_equal(np.concatenate(row_ids), columns["row_id"])   # both read the split and layer in row order
    patterns = PatternMeta(columns["row_id"], columns["next_token_id"], columns["nll"], np.concatenate(norms))
    exact.check_rms(math.sqrt(float(patterns.sq_norm.mean())), f"split '{layer.pattern_split}' at layer {layer.layer}")
    return patterns


class SelfJoin(NamedTuple):
    """Every pattern's k nearest other patterns: D (d, k) squared distances, I (d, k) row ids, s (d,) nearest;
    and where the scan that found them could tell, each pattern's largest inner product with another among the
    vectors it read (`maxima`: a candidate for Delta's maximum, measured before it is used)."""

    D: np.ndarray
    I: np.ndarray
    s: np.ndarray
    maxima: InnerMaxima | None = None


def self_join(layer: Layer, patterns: PatternMeta) -> SelfJoin:
    """The patterns' self-join: through the index at its own layer (unless --exact), exactly elsewhere; where
    Delta's products go through an index, with the scan's own largest products (`KnnIndex.self_join_with_products`)."""
    k, maxima = layer.settings.k, None
    if layer.use_index and not layer.exact_products:
        pid, D, I, maxima = layer.index.self_join_with_products(k, batch_rows=layer.blocks.join_rows)
    elif layer.use_index:
        pid, D, I = layer.index.self_join(k, batch_rows=layer.blocks.join_rows)
    else:
        pid, D, I = layer.engine.self_join(layer.pattern_blocks, k)
    assert np.array_equal(pid, patterns.row_id)   # both stream the same split and layer in row order
    refuse_missing(I, k)
    return SelfJoin(D, I, np.sqrt(D[:, 0]), maxima)


class Radii(NamedTuple):
    """The radii of A2/A3 and the retrieval's tolerances, all from the spacing s."""

    r_star: float
    typical: float
    radius: float       # the --radius value
    scale: float        # median positive s: the spacing tolerances scale with
    epsilon: float      # retrieval: converged this close to the nearest pattern

    def choice(self, mode: str) -> RadiusChoice:
        """The summary's record of the --radius rule and its value."""
        return RadiusChoice(mode, self.radius)


def _radius(mode: str, r_star: float, typical: float) -> float:
    """The --radius value: r*, the typical radius (median s_i / 2), or the number given."""
    return r_star if mode == "r*" else typical if mode == "typical" else float(mode)


def radii(layer: Layer, joined: SelfJoin) -> Radii:
    """r* (unit-volume ball), the typical radius, the --radius value and the retrieval's tolerances."""
    s = joined.s
    r_star, typical = theory.unit_volume_radius(layer.patterns.n), float(np.median(s) / 2)
    scale = float(np.median(s[s > 0])) if (s > 0).any() else 1.0   # duplicates give s = 0
    return Radii(r_star, typical, _radius(layer.settings.radius, r_star, typical), scale,
                 layer.settings.epsilon or 0.01 * scale)


def histogram_rows(layer: Layer, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every sample's histogram over bins shared by all (subsets spread wider: bin them all)."""
    count = layer.settings.bins
    bins = analysis.shared_bins(*samples.values(), count=count)
    return {"layer": np.full(len(samples) * count, layer.layer, np.int16), "table": np.repeat(list(samples), count),
            "bin_left": np.tile(bins[:-1], len(samples)), "bin_right": np.tile(bins[1:], len(samples)),
            "count": np.concatenate([analysis.histogram(values, bins) for values in samples.values()])}
