"""A3, well-separated patterns: balls of a radius disjoint (s_i > 2 r), and Ramsauer's separation Delta_i
through an exact inner-product join or an inner-product index (`Mips`), whose top k also serves E_mchn."""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np

from memscan import analysis, theory
from memscan.errors import DataError
from memscan.knn import exact
from memscan.knn.index import InnerMaxima, recall_at
from memscan.knn.mips import RECALL_QUERIES, MipsIndex
from memscan.query.context import Layer
from memscan.query.distances import PatternMeta, Radii, SelfJoin
from memscan.query.settings import mips_budget
from memscan.query.summary import Separated

log = logging.getLogger(__name__)


class Mips(NamedTuple):
    """The inner-product index of an approximate layer and its measured recall (`MipsIndex.tune`)."""

    index: MipsIndex
    recall: dict[str, Any]


def _query_sample(layer: Layer) -> exact.Request:
    """A seeded sample of the queries, each searched for its k largest inner products (the MCHN interval's)."""
    ids = layer.queries.row_ids(layer.settings.split, layer.layer)
    rng = np.random.default_rng(layer.settings.seed)
    ids = np.sort(rng.choice(ids, size=min(RECALL_QUERIES, len(ids)), replace=False))
    return exact.Request(ids, layer.queries.take(ids), layer.settings.k, "ip")


def mips_samples(layer: Layer, patterns: PatternMeta) -> tuple[MipsIndex, dict[str, exact.Request]] | None:
    """The inner-product index of an approximate layer and the samples its recall is measured on (the
    patterns' maxima for Delta, the queries' top k for E_mchn); None where the products are exact."""
    if layer.exact_products:
        return None
    blocks, max_sq_norm = layer.pattern_blocks, float(patterns.sq_norm.max())
    # an approximate layer is the index's own site and layer: its lists hold these patterns
    index = (MipsIndex.over_lists(layer.index.shards, layer.vectors, max_sq_norm, layer.index.factory)
             or MipsIndex.build(layer.patterns, blocks, layer.d, max_sq_norm, mips_budget(layer.blocks.memory_bytes),
                                layer.settings.seed, vectors=layer.vectors))
    return index, {"patterns": index.sample(seed=layer.settings.seed), "queries": _query_sample(layer)}


def tuned(layer: Layer, index: MipsIndex, samples: dict[str, exact.Request], truths: dict[str, np.ndarray]) -> Mips:
    """The inner-product index with nprobe tuned so that every sample reaches the index's target recall
    against its exact scores `truths`."""
    return Mips(index, index.tune(samples, truths, layer.index.target_recall))


class Separation(NamedTuple):
    """A3 by Ramsauer: Delta_i (d,) float64, the threshold, M, and how Delta's inner products were found."""

    delta: np.ndarray
    threshold: float
    max_norm: float
    search: dict[str, Any]


def _paired_products(layer: Layer, partners: np.ndarray) -> np.ndarray:
    """rho_i . rho_partner(i) in float64 for every pattern i (d,), streamed: the exact join's scores are
    float32, whose rounding at ||rho||^2 would swamp a small Delta_i."""
    parts, start = [], 0
    for _, X in layer.pattern_blocks():
        other = layer.vectors(partners[start:start + len(X)])
        parts.append(np.einsum("ij,ij->i", X.astype(np.float64), other.astype(np.float64)))
        start += len(X)
    return np.concatenate(parts)


def _approximate_search(mips: Mips) -> dict[str, Any]:
    """How Delta's maxima were found through the inner-product index: its settings, recall and the bound."""
    recall = mips.recall["samples"]["patterns"]["recall_1_at_1"]
    return {"search": f"approximate: {mips.index.factory} {mips.index.search_params}",
            "factory_reason": mips.index.reason, "recall_1_at_1": recall, "bound": _bound(recall), **mips.recall}


class ThroughJoin(NamedTuple):
    """Delta's maxima as the self-join's own scan found them (`SelfJoin.maxima`), and how well: its record."""

    maxima: InnerMaxima
    record: dict[str, Any]


def through_self_join(layer: Layer, patterns: PatternMeta, joined: SelfJoin, sample: exact.Request,
                      truth: np.ndarray) -> ThroughJoin | None:
    """The self-join scan's largest products as Delta's maxima, where on the patterns' sample they reach the
    index's target 1-recall@1 against exact MIPS (`truth`); None where the scan kept none, or they fall short
    (the inner-product index then searches its own lists)."""
    if joined.maxima is None:
        return None
    found = joined.maxima.value[np.searchsorted(patterns.row_id, sample.ids)][:, None]
    at_1, at_k = recall_at(found, truth, "ip")
    target = layer.index.target_recall
    log.info("layer %d: the self-join's lists hold each pattern's largest product for %.3f of the sample "
             "(target %.2f)%s", layer.layer, at_1, target, "" if at_1 >= target else ": searching its own lists")
    if at_1 < target:
        return None
    index = layer.index
    return ThroughJoin(joined.maxima, {
        "search": f"approximate: the self-join's own lists ({index.factory} {index.search_params})",
        "factory_reason": "the vectors the nearest-neighbour scan read, their products from the same matrix product",
        "recall_1_at_1": at_1, "bound": _bound(at_1), "target_recall": target, "tuning": None,
        "samples": {"patterns": {"queries": len(sample.ids), "k": 1, "recall_1_at_1": at_1, "recall_k_at_k": at_k}}})


def _bound(recall: float) -> str:
    return (f"upper: ramsauer_delta and ramsauer_well_separated are upper bounds (a maximum inner product found "
            f"is never above the true one); the maxima's 1-recall@1 is {recall:.3f}")


def separation(layer: Layer, patterns: PatternMeta, mips: Mips | None, joined: ThroughJoin | None = None,
               ) -> Separation:
    """Delta_i = rho_i.rho_i - max_{j != i} rho_i.rho_j: from the self-join's scan (`joined`), through the
    inner-product index, or an exact join.

    Through an index Delta_i is an upper bound: a maximum found is never above the true one.
    """
    if joined is not None:
        pid, best, search = patterns.row_id, joined.maxima.value, joined.record
    elif mips is None:
        pid, _, partner = layer.engine.self_join(layer.pattern_blocks, 1, metric="ip")
        best = _paired_products(layer, partner[:, 0])
        search: dict[str, Any] = {"search": "exact", "recall_1_at_1": None}
    else:
        pid, best = mips.index.max_other(layer.pattern_blocks)
        search = _approximate_search(mips)
    assert np.array_equal(pid, patterns.row_id)
    missing = int(np.isinf(best).sum())
    if missing:
        raise DataError(f"Delta's search ({search['search']}) found no other pattern for {missing:,} patterns; "
                        "pass --exact")
    M = math.sqrt(float(patterns.sq_norm.max()))
    return Separation(theory.ramsauer_separation(patterns.sq_norm, best),
                      theory.ramsauer_threshold(layer.d, layer.settings.beta, M), M, search)


def pattern_rows(layer: Layer, patterns: PatternMeta, joined: SelfJoin, radii: Radii,
                 separation: Separation) -> dict[str, np.ndarray]:
    """The layer's rows of the patterns table: each pattern's spacing, Delta and both separation tests."""
    s, delta = joined.s, separation.delta
    return {"layer": np.full(layer.d, layer.layer, np.int16), "row_id": patterns.row_id, "nearest_other_dist": s,
            "disjoint_radius": s / 2, "ramsauer_delta": delta,
            "well_separated_r_star": analysis.disjoint(s, radii.r_star),
            "well_separated_ramsauer": delta >= separation.threshold}


def separated(joined: SelfJoin, radii: Radii, separation: Separation) -> Separated:
    """The summary's A3: the shares of disjoint balls at the radius and at r*, and of Ramsauer-separated patterns."""
    s, delta = joined.s, separation.delta
    return Separated(disjoint_at_radius=float(analysis.disjoint(s, radii.radius).mean()),
                     disjoint_at_r_star=float(analysis.disjoint(s, radii.r_star).mean()),
                     ramsauer_well_separated=float((delta >= separation.threshold).mean()),
                     ramsauer_threshold=separation.threshold, max_norm=separation.max_norm,
                     ramsauer_delta=analysis.describe(delta), inner_products=separation.search)
