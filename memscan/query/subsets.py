"""The paper's 25/50/75% subsets: nearest-other distances within a seeded random fraction of the patterns,
taken from the self-join's lists where they hold another member and searched for the rest."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from memscan.knn import exact, tuning
from memscan.knn.index import recall_at
from memscan.knn.mips import RECALL_QUERIES
from memscan.query.context import Layer
from memscan.query.distances import PatternMeta, SelfJoin
from memscan.query.summary import SubsetSummary

SUBSET_MISS = 1e-4       # the chance that a subset member's deeper neighbour list holds no other member
PLAN_ROWS = 1 << 18      # members whose self-join lists are looked through at once


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


def _request(layer: Layer, ids: np.ndarray, members: np.ndarray) -> exact.Request:
    """The exact search for the nearest other member (row ids `members`, ascending) of the patterns `ids`."""
    return exact.Request(ids, layer.vectors(ids), 1, exclude_self=True, among=members)


def _exact_pass(layer: Layer, requests: list[exact.Request]) -> list[np.ndarray]:
    """Every request's squared distance to its nearest other member (m,), from one pass over the patterns
    (none where no request has a query)."""
    if not any(len(request.ids) for request in requests):
        return [np.empty(0, np.float32) for _ in requests]
    found = layer.engine.knn_each(requests, layer.pattern_blocks, block_rows=layer.blocks.knn_rows)
    return [D[:, 0] for D, _ in found]


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


class _Plan(NamedTuple):
    """One subset before its searches: members (d,) bool, their rows, whether the self-join's list of each
    holds another member, that member's squared distance (NaN where none), and the rows to search."""

    fraction: float
    member: np.ndarray
    rows: np.ndarray
    listed: np.ndarray
    sq: np.ndarray

    def unlisted(self, patterns: PatternMeta) -> np.ndarray:
        """Row ids of the members whose self-join list holds no other member: they are searched."""
        return patterns.row_id[self.rows[~self.listed]]


def _plan(layer: Layer, patterns: PatternMeta, joined: SelfJoin, fraction: float) -> _Plan:
    """A seeded `fraction` of the patterns, each member with the first other member of its self-join list."""
    d = layer.d
    chosen = np.random.default_rng(layer.settings.seed).choice(d, size=max(2, int(fraction * d)), replace=False)
    member = np.zeros(d, bool)
    member[chosen] = True
    rows = np.flatnonzero(member)
    listed, sq = np.empty(len(rows), bool), np.empty(len(rows))
    for start in range(0, len(rows), PLAN_ROWS):   # the lists' copies held a block at a time
        part = slice(start, start + PLAN_ROWS)
        listed[part], sq[part] = _first_members(joined.I[rows[part]], joined.D[rows[part]], member, patterns.row_id)
    return _Plan(fraction, member, rows, listed, sq)


def _sample(layer: Layer, count: int) -> np.ndarray:
    """The seeded sample (positions, ascending) of `count` searched members that a recall is measured on."""
    return np.sort(np.random.default_rng(layer.settings.seed).choice(
        count, size=min(RECALL_QUERIES, count), replace=False))


def _through_index(layer: Layer, patterns: PatternMeta, plan: _Plan, ids: np.ndarray, truth: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Whether each searched member `ids` finds another member among its `rest_depth` nearest through the index,
    that one's squared distance, and the record of the recall on the sample (whose exact values are `truth`).

    Deeper neighbours are missed more often than the nearest the index was tuned for, so its nprobe
    (efSearch) is raised to the smallest value at which that reaches the index's target 1-recall@1 on
    the sample; an index with neither, a scan of compressed codes, searches once at its own settings.
    """
    depth, knob, sample = rest_depth(plan.fraction, layer.d), layer.index.recall_knob(), _sample(layer, len(ids))

    def search(rows: np.ndarray, value: int | None) -> tuple[np.ndarray, np.ndarray]:
        with layer.index.searching_with(**({knob[0]: value} if knob else {})):
            return _members_through_index(layer, plan.member, patterns.row_id, rows, depth)

    def measure(value: int | None) -> float:
        listed, sq = search(ids[sample], value)
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
    listed, sq = search(ids, chosen)
    return listed, sq, record


def nearest_within(layer: Layer, patterns: PatternMeta, joined: SelfJoin,
                   fractions: list[float]) -> list[SubsetNearest]:
    """The paper's 25/50/75%: nearest-other distances within a seeded random fraction of the patterns.

    A member whose self-join list holds another member takes the first such one: the list is
    sorted by distance, so that member is its nearest within the subset (exact where the list is).
    The others are searched: exactly in exact layers; in approximate ones through the index
    (`_through_index`, its recall measured on a sample) and exactly for those it leaves without one.
    The exact searches of every subset share two passes: the samples' (or exact layers' every search),
    then the rest.
    """
    plans = [_plan(layer, patterns, joined, fraction) for fraction in fractions]
    searched = [plan for plan in plans if not plan.listed.all()]
    members = {plan.fraction: patterns.row_id[plan.member] for plan in plans}
    ids = {plan.fraction: plan.unlisted(patterns) for plan in searched}
    first = [ids[plan.fraction] if not layer.approximate else ids[plan.fraction][_sample(layer, len(ids[plan.fraction]))]
             for plan in searched]
    truths = _exact_pass(layer, [_request(layer, rows, members[plan.fraction]) for plan, rows in zip(searched, first)])
    results, rests = {}, []
    for plan, truth in zip(searched, truths):
        if not layer.approximate:
            results[plan.fraction] = (truth, None)
            continue
        listed, sq, record = _through_index(layer, patterns, plan, ids[plan.fraction], truth)
        results[plan.fraction] = (sq, record)
        rests.append((plan, listed))
    found = _exact_pass(layer, [_request(layer, ids[plan.fraction][~listed], members[plan.fraction])
                                for plan, listed in rests])
    for (plan, listed), sq in zip(rests, found):
        results[plan.fraction][0][~listed] = sq
    return [_nearest(plan, patterns, *results.get(plan.fraction, (None, None))) for plan in plans]


def _nearest(plan: _Plan, patterns: PatternMeta, searched: np.ndarray | None,
             recall: dict[str, Any] | None) -> SubsetNearest:
    """A subset's nearest-other distances: from the self-join's lists, and `searched` for the rest."""
    sq = plan.sq.copy()
    if searched is not None:
        sq[~plan.listed] = searched
    return SubsetNearest(plan.fraction, patterns.row_id[plan.rows], np.sqrt(sq).astype(np.float32),
                         int(plan.listed.sum()), recall)


def subset(layer: Layer, patterns: PatternMeta, joined: SelfJoin, fraction: float) -> SubsetNearest:
    """One subset's `nearest_within`."""
    return nearest_within(layer, patterns, joined, [fraction])[0]
