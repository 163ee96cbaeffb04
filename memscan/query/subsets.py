"""The paper's 25/50/75% subsets: nearest-other distances within a seeded random fraction of the patterns,
taken from the self-join's lists where they hold another member and searched for the rest."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from memscan.knn import exact, tuning
from memscan.knn.index import recall_at
from memscan.knn.mips import RECALL_QUERIES
from memscan.query.context import Layer
from memscan.query.distances import PatternMeta, SelfJoin
from memscan.query.summary import SubsetSummary

SUBSET_MISS = 1e-4       # the chance that a subset member's deeper neighbour list holds no other member


class SubsetNearest(NamedTuple):
    """A seeded subset's members (m,) in row order, their nearest-other distances within it (m,) float32,
    how many of those the self-join's lists gave (the rest were searched), and the searched ones'
    1-recall@1 against an exact search on a sample (None where the search was exact)."""

    fraction: float
    row_ids: np.ndarray
    values: np.ndarray
    from_lists: int
    recall: dict[str, Any] | None

    def summary(self) -> SubsetSummary:
        """The subset's entry of the layer's summary."""
        return SubsetSummary(self.fraction, len(self.values), self.from_lists, len(self.values) - self.from_lists,
                             self.recall)


def _filtered(blocks: Callable[[], Iterator[exact.Block]], keep: np.ndarray) -> Callable[[], Iterator[exact.Block]]:
    """The blocks' rows whose row ids are in `keep` (ascending), as a re-startable iterator."""
    def subset() -> Iterator[exact.Block]:
        for ids, X in blocks():
            mask = np.isin(ids, keep, assume_unique=True)
            if mask.any():
                yield ids[mask], X[mask]
    return subset


def rest_depth(fraction: float, d: int) -> int:
    """How many nearest patterns to search so that one is a member of a `fraction` subset but for a
    SUBSET_MISS chance: (1 - fraction)^depth <= SUBSET_MISS (33 for a quarter), at most d - 1."""
    return min(d - 1, math.ceil(math.log(SUBSET_MISS) / math.log1p(-fraction)))


def _first_members(I: np.ndarray, D: np.ndarray, member: np.ndarray, row_id: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per list (rows of I, sorted by distance): whether it holds a member, and that first member's D (else NaN)."""
    hits = (I >= 0) & member[np.searchsorted(row_id, np.maximum(I, 0))]
    listed = hits.any(axis=1)
    return listed, np.where(listed, D[np.arange(len(I)), hits.argmax(axis=1)], np.nan)


def _exact_within_subset(layer: Layer, ids: np.ndarray, members: np.ndarray) -> np.ndarray:
    """The squared distances (m,) from the patterns `ids` to their nearest other member, by an exact pass."""
    queries = exact.array_blocks(ids, layer.vectors(ids), layer.blocks.knn_rows)
    _, D, _ = layer.engine.knn(queries(), _filtered(layer.pattern_blocks, members), 1, exclude_self=True)
    return D[:, 0]


def _members_through_index(layer: Layer, member: np.ndarray, row_id: np.ndarray, ids: np.ndarray,
                           depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Whether each of the patterns `ids` has a member among its `depth` nearest through the index, and the
    first one's squared distance (NaN where none), in blocks that hold their candidates in the budget."""
    listed, sq = np.zeros(len(ids), bool), np.full(len(ids), np.nan)
    # the self-join's batches hold its candidates in the budget: these hold as many candidate vectors
    step = max(1, layer.blocks.join_rows * layer.index.candidates(layer.settings.k, True)
               // layer.index.candidates(depth, True))
    for start in range(0, len(ids), step):
        block = ids[start:start + step]
        D, I = layer.index.search(layer.vectors(block), depth, block)
        listed[start:start + step], sq[start:start + step] = _first_members(I, D, member, row_id)
    return listed, sq


def _searched_members(layer: Layer, patterns: PatternMeta, member: np.ndarray, ids: np.ndarray,
                      fraction: float) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Squared distances (m,) from the patterns `ids` to their nearest other member, and their recall.

    Exact layers (and a Flat index) search the members exactly. Approximate ones take the
    first member among each one's `rest_depth` nearest through the index, with its nprobe
    (efSearch) raised to the smallest value at which that reaches the index's target
    1-recall@1 on a seeded sample against an exact search (deeper neighbours are missed
    more often than the nearest the index was tuned for; an index with neither, a scan of
    compressed codes, searches once at its own settings); those still without one are
    searched exactly (in the sample: their exact values are at hand).
    """
    members = patterns.row_id[member]
    if not layer.approximate:
        return _exact_within_subset(layer, ids, members), None
    depth, knob = rest_depth(fraction, layer.d), layer.index.recall_knob()
    sample = np.sort(np.random.default_rng(layer.settings.seed).choice(
        len(ids), size=min(RECALL_QUERIES, len(ids)), replace=False))
    truth = _exact_within_subset(layer, ids[sample], members)

    def through_index(rows: np.ndarray, value: int | None) -> tuple[np.ndarray, np.ndarray]:
        with layer.index.searching_with(**({knob[0]: value} if knob else {})):
            return _members_through_index(layer, member, patterns.row_id, rows, depth)

    def measure(value: int | None) -> float:
        listed, sq = through_index(ids[sample], value)
        return recall_at(np.where(listed, sq, truth)[:, None], truth[:, None], "l2")[0]

    record: dict[str, Any] = {"queries": len(sample), "depth": depth}
    if knob is None:   # a scan of every (compressed) code: no parameter buys recall
        chosen, record["recall_1_at_1"] = None, measure(None)
    else:
        parameter, limit = knob
        start = layer.index.search_params[parameter]
        values = [start] + [value for value in tuning.search_values(parameter, limit) if value > start]
        swept = tuning.sweep(parameter, values, measure, layer.index.target_recall)
        chosen, curve = swept["chosen"], swept["curve"]
        record.update({parameter: chosen, "curve": curve,
                       "recall_1_at_1": curve["recall"][curve[parameter].index(chosen)]})
    listed, sq = through_index(ids, chosen)
    if not listed.all():
        sq[~listed] = _exact_within_subset(layer, ids[~listed], members)
    return sq, record


def subset(layer: Layer, patterns: PatternMeta, joined: SelfJoin, fraction: float) -> SubsetNearest:
    """The paper's 25/50/75%: nearest-other distances within a seeded random `fraction` of the patterns.

    A member whose self-join list holds another member takes the first such one: the
    list is sorted by distance, so that member is its nearest within the subset (exact
    where the list is). The members whose lists hold none are searched (`_searched_members`).
    """
    d = layer.d
    chosen = np.random.default_rng(layer.settings.seed).choice(d, size=max(2, int(fraction * d)), replace=False)
    member = np.zeros(d, bool)
    member[chosen] = True
    rows = np.flatnonzero(member)
    listed, sq = _first_members(joined.I[rows], joined.D[rows], member, patterns.row_id)
    recall = None
    if not listed.all():
        sq[~listed], recall = _searched_members(layer, patterns, member, patterns.row_id[rows[~listed]], fraction)
    return SubsetNearest(fraction, patterns.row_id[rows], np.sqrt(sq).astype(np.float32), int(listed.sum()), recall)
