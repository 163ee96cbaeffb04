"""The exact searches an approximate layer is checked against, made in one pass over the patterns.

Three statistics of an approximate layer each need a few hundred exact searches: the first round of
the largest s_i searched again (`largest`), the self-join's recall on a sample, and the recall of the
inner-product index on its samples (`separation`). None depends on another's answer, so they share one
pass (`Engine.knn_each`): at a million patterns reading the patterns costs more than these searches.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from memscan.knn import exact
from memscan.knn.mips import RECALL_QUERIES
from memscan.query import largest, separation
from memscan.query.context import Layer
from memscan.query.distances import PatternMeta, SelfJoin

log = logging.getLogger(__name__)


class Checked(NamedTuple):
    """An approximate layer's self-join after `largest.verify_largest`, the self-join's recall, the tuned
    inner-product index, and Delta's maxima from the self-join's scan where they reach the target recall (each
    None where the layer is exact, its products are, or the scan's maxima fall short)."""

    joined: SelfJoin
    verified: largest.Verified | None
    recall: dict[str, Any] | None
    mips: separation.Mips | None
    through_join: separation.ThroughJoin | None = None


def checked(layer: Layer, patterns: PatternMeta, joined: SelfJoin) -> Checked:
    """The layer's exact checks, their searches made in one shared pass, and what each measures from them."""
    first = largest.first_round(layer, patterns, joined)
    inner = separation.mips_samples(layer, patterns)
    requests: dict[str, exact.Request] = {}
    if first is not None and first.found is None:
        requests["largest"] = first.request
    if layer.approximate:   # measured on the join made, which need not be the index's search (its own lists)
        requests["recall"] = layer.index.recall_request(RECALL_QUERIES, layer.settings.k, layer.settings.seed)
    if inner is not None:
        requests.update({f"inner products: {name}": sample for name, sample in inner[1].items()})
    answers = dict(zip(requests, layer.engine.knn_each(list(requests.values()), layer.pattern_blocks,
                                                       block_rows=layer.blocks.knn_rows)))
    log.debug("layer %d: one exact pass for %s", layer.layer, ", ".join(requests) or "nothing")
    recall = None
    if "recall" in requests:
        sample = requests["recall"]
        found = joined.D[np.searchsorted(patterns.row_id, sample.ids), :sample.k]
        recall = layer.index.recall_of(sample, answers["recall"][0], found)
    joined, verified = largest.verify_largest(layer, patterns, joined, first, answers.get("largest"))
    mips, through_join = None, None
    if inner is not None:
        index, samples = inner
        truths = {name: answers[f"inner products: {name}"][0] for name in samples}
        through_join = separation.through_self_join(layer, patterns, joined, samples["patterns"], truths["patterns"])
        if through_join is not None:   # Delta's maxima are found: the index serves the queries' top k alone
            samples = {"queries": samples["queries"]}
        mips = separation.tuned(layer, index, samples, {name: truths[name] for name in samples})
    return Checked(joined, verified, recall, mips, through_join)
