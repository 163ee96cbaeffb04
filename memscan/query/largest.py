"""The largest nearest-other distances s_i of an approximate self-join, searched again exactly.

log Z_t is a log-sum dominated by the largest radii s_i / 2, and a missed neighbour only makes an s_i larger:
the largest 1%, at most VERIFY_MAX, are searched again exactly (each row a pass over the d patterns: the cap
keeps this linear in d; the terms beyond the largest thousand of a log-sum over radii^n hardly move it, and
the interval it certifies says how much).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from memscan.knn import exact
from memscan.knn.index import RECALL_RTOL
from memscan.query.context import Layer
from memscan.query.distances import PatternMeta, SelfJoin

log = logging.getLogger(__name__)

VERIFY_FRACTION = 0.01
VERIFY_MAX = 1_000
VERIFY_ROUNDS = 4        # ... and again while corrections bring unverified s_i among the largest;
VERIFY_MARGIN = 1.25     # the first round takes a quarter more, which those would come from (each round is a pass)


class Verified(NamedTuple):
    """Which s_i of an approximate self-join were searched again exactly (`verify_largest`)."""

    exact: np.ndarray     # (d,) bool: s_i (and the pattern's whole list) is exact
    largest: int          # how many of the largest s_i were to be exact (VERIFY_FRACTION of d, at most VERIFY_MAX)
    largest_exact: bool   # ... and are: no unverified s_i is among them
    corrected: int        # verified s_i the index had too large (a nearer pattern was missed)
    rounds: int


def exact_neighbours(layer: Layer, ids: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest other patterns (D squared, I) of the patterns `ids`, whose k-th nearest other lies
    within `radius`: through the lists of an IVF-Flat index that can hold one, else a blockwise exact search."""
    X = layer.vectors(ids)
    found = layer.index.exact_within(X, layer.settings.k, ids, radius) if layer.use_index else None
    if found is not None:
        return found
    queries = exact.array_blocks(ids, X, layer.blocks.knn_rows)
    _, D, I = layer.engine.knn(queries(), layer.pattern_blocks, layer.settings.k, exclude_self=True)
    return D, I


class FirstRound(NamedTuple):
    """The first round of `verify_largest`: the self-join's rows to search again (the VERIFY_MARGIN times
    VERIFY_FRACTION largest s_i) as an exact search, and their exact lists where the index's cells gave
    them (None: the search rides the layer's shared exact pass, memscan.query.checks)."""

    rows: np.ndarray
    request: exact.Request
    found: tuple[np.ndarray, np.ndarray] | None


def _largest_count(d: int) -> int:
    """How many of the largest s_i are to be exact: VERIFY_FRACTION of d, at most VERIFY_MAX."""
    return min(math.ceil(VERIFY_FRACTION * d), VERIFY_MAX)


def _unverified_largest(s: np.ndarray, wanted: int, exact_rows: np.ndarray) -> np.ndarray:
    """The rows (ascending) among the `wanted` largest s_i that are not exact yet."""
    top = np.argpartition(-s, wanted - 1)[:wanted]
    return np.sort(top[~exact_rows[top]])


def first_round(layer: Layer, patterns: PatternMeta, joined: SelfJoin) -> FirstRound | None:
    """The first round's rows and exact search, answered through the index's lists where they can hold it;
    None in exact layers."""
    if not layer.approximate:
        return None
    rows = _unverified_largest(joined.s, min(layer.d, math.ceil(VERIFY_MARGIN * _largest_count(layer.d))),
                               np.zeros(layer.d, bool))
    ids = patterns.row_id[rows]
    X = layer.vectors(ids)
    found = (layer.index.exact_within(X, layer.settings.k, ids, np.sqrt(joined.D[rows, -1])) if layer.use_index
             else None)
    return FirstRound(rows, exact.Request(ids, X, layer.settings.k, exclude_self=True), found)


def verify_largest(layer: Layer, patterns: PatternMeta, joined: SelfJoin, first: FirstRound | None,
                   answer: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[SelfJoin, Verified | None]:
    """An approximate layer's self-join with the lists of its largest s_i replaced by exact ones, in place.

    A missed neighbour only makes s_i larger, so the misses gather among the largest s_i,
    which also dominate log Z_t: the VERIFY_FRACTION largest (at most VERIFY_MAX; in the
    first round VERIFY_MARGIN times as many: `first`, found through the index or `answer`,
    its exact search) are searched exactly against every pattern (own row excluded), then the
    largest again, up to VERIFY_ROUNDS times, while corrected values let unverified ones in.
    (joined, None) in exact layers.
    """
    if first is None:
        return joined, None
    D, I, s = joined.D, joined.I, joined.s   # in place: at ten million patterns a copy would be 1.2 GB
    exact_rows = np.zeros(layer.d, bool)
    largest, corrected, rounds = _largest_count(layer.d), 0, 0
    todo, found = first.rows, first.found or answer
    while todo.size and rounds < VERIFY_ROUNDS:
        D_exact, I_exact = found if rounds == 0 else exact_neighbours(layer, patterns.row_id[todo],
                                                                      np.sqrt(D[todo, -1]))
        corrected += int((D_exact[:, 0] < D[todo, 0] * (1 - RECALL_RTOL)).sum())   # float rounding is no miss
        D[todo], I[todo], s[todo] = D_exact, I_exact, np.sqrt(D_exact[:, 0])
        exact_rows[todo] = True
        rounds += 1
        todo = _unverified_largest(s, largest, exact_rows)
    log.info("layer %d: the %d largest nearest-other distances searched exactly in %d rounds: %d corrected",
             layer.layer, int(exact_rows.sum()), rounds, corrected)
    return SelfJoin(D, I, s, joined.maxima), Verified(exact_rows, largest, not todo.size, corrected, rounds)
