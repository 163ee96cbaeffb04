"""Maximum inner-product search (MIPS) through an L2 index: Ramsauer's Delta_i and the MCHN energy's top k.

A pattern rho (n,) becomes [rho, sqrt(M^2 - ||rho||^2)] (n + 1,), M^2 the largest squared
norm, and a query x becomes [x, 0]: then ||x~ - rho~||^2 = ||x||^2 + M^2 - 2 x.rho, so
the nearest augmented patterns are those of largest inner product (Bachrach et al. 2014,
"Speeding up the Xbox recommender system using a Euclidean transformation for
inner-product spaces"). The L2 index is the one `tuning.auto_factory` picks for the
d augmented patterns within a memory budget (a trained IVF for large d, compressed codes
where float32 would not fit), filled block by block. Its candidates, with a few to spare
(float32 distances near ||x||^2 + M^2 misorder near-ties), are re-ranked by exact inner
products recomputed from the stored vectors, the query's own row excluded by id. `tune`
measures recall against exact MIPS on seeded samples (the patterns' own maxima, the
queries' top k) and picks the smallest nprobe at which each reaches the target
(`tuning.sweep`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from memscan import store
from memscan.errors import DataError
from memscan.knn import exact
from memscan.knn import tuning
from memscan.knn.index import nlist, recall_at
from memscan.knn.shards import Shard

log = logging.getLogger(__name__)

CANDIDATE_SLACK = 8     # candidates beyond k, re-ranked exactly
RECALL_QUERIES = 200
TARGET_RECALL = 0.95

Blocks = Callable[[], Iterable[exact.Block]]


def augment_patterns(X: np.ndarray, max_sq_norm: float) -> np.ndarray:
    """[rho, sqrt(M^2 - ||rho||^2)] for the rows of X (m, n): float32 (m, n + 1), every row of norm M."""
    X64 = np.asarray(X, np.float64)
    extra = np.sqrt(np.maximum(max_sq_norm - np.einsum("ij,ij->i", X64, X64), 0.0))
    return np.hstack([np.asarray(X, np.float32), extra[:, None].astype(np.float32)])


def augment_queries(X: np.ndarray) -> np.ndarray:
    """[x, 0] for the rows of X (m, n): float32 (m, n + 1)."""
    return np.hstack([np.asarray(X, np.float32), np.zeros((len(X), 1), np.float32)])


def _sample(blocks: Blocks, count: int, size: int, seed: int, max_sq_norm: float) -> np.ndarray:
    """A seeded uniform sample of `size` of the `count` augmented patterns, gathered in one streaming pass."""
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))
    parts, seen = [], 0
    for _, X in blocks():
        lo, hi = np.searchsorted(chosen, [seen, seen + len(X)])
        parts.append(augment_patterns(X[chosen[lo:hi] - seen], max_sq_norm))
        seen += len(X)
    return np.concatenate(parts)


def choose_factory(count: int, n: int, budget: int) -> tuple[str, str]:
    """The L2 index `tuning.auto_factory` picks for `count` augmented patterns of width n + 1 in
    `budget` bytes, and why: "Flat" (a scan of every pattern, no faster than an exact join) below
    `tuning.FLAT_MAX`."""
    return tuning.auto_factory(count, n + 1, budget)


class Sample(NamedTuple):
    """Queries the recall is measured on: row ids (m,), vectors X (m, n), the k searched, and whether
    each row's own id is excluded (patterns searched among themselves)."""

    ids: np.ndarray
    X: np.ndarray
    k: int
    exclude_self: bool


@dataclass(frozen=True)
class MipsResult:
    """The k largest inner products of each query: IP (nq, k) float64, descending; I (nq, k) row ids."""

    ip: np.ndarray
    ids: np.ndarray


class MipsIndex:
    """An L2 FAISS index over augmented patterns, searched for the largest inner products (module docstring)."""

    def __init__(self, shard: Shard, vectors: Callable[[np.ndarray], np.ndarray], factory: str, reason: str):
        self.shard, self.vectors, self.factory, self.reason = shard, vectors, factory, reason

    @classmethod
    def build(cls, dataset: store.ActivationDataset, blocks: Blocks, count: int, max_sq_norm: float,
              budget: int, seed: int = 0, factory: str | None = None,
              vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> MipsIndex:
        """Train (IVF, PQ) and fill the index over `count` patterns of `dataset` streamed as `blocks`.

        `max_sq_norm` is M^2 over all of them; `budget` the bytes the index and its training
        sample may hold; `factory` (None: `tuning.auto_factory`'s choice) any FAISS factory
        string of an L2 index. Its search parameters are FAISS's defaults until `tune`.
        `vectors` (None: `dataset.take`) gives the patterns' vectors by row id for exact re-ranking.
        """
        import faiss

        n = dataset.n + 1
        factory, reason = choose_factory(count, dataset.n, budget) if factory is None else (factory, "given")
        index = faiss.index_factory(n, factory, faiss.METRIC_L2)
        lists = nlist(index)
        if not index.is_trained:
            size = min(count, tuning.train_rows(lists, n, budget))
            log.info("training the inner-product index %s on %d augmented patterns", factory, size)
            index.train(_sample(blocks, count, size, seed, max_sq_norm))
        row_ids = []
        for ids, X in blocks():
            index.add(augment_patterns(X, max_sq_norm))
            row_ids.append(ids)
        return cls(Shard(index, np.concatenate(row_ids), {}), vectors or dataset.take, factory, reason)

    @property
    def ntotal(self) -> int:
        return len(self.shard.row_ids)

    @property
    def search_params(self) -> dict[str, int]:
        return dict(self.shard.params)

    def search(self, X: np.ndarray, k: int, query_ids: np.ndarray | None = None,
               grouped: bool = False) -> MipsResult:
        """The k largest exact inner products rho . x of each query X (nq, n) among the candidates.

        With `query_ids` each query's own row is excluded; -inf and id -1 where fewer than k
        were found. `grouped` scans each inverted list once per block (for self-joins).
        """
        wanted = min(self.ntotal, k + int(query_ids is not None) + CANDIDATE_SLACK)
        _, ids = self.shard.search(augment_queries(X), wanted, grouped)
        if query_ids is not None:
            ids = np.where(ids == query_ids[:, None], -1, ids)
        valid = ids >= 0
        vectors = self.vectors(np.where(valid, ids, self.shard.row_ids[0]).ravel())       # (nq * c, n)
        ip = exact.exact_scores(np.asarray(X, np.float32), vectors, np.arange(ids.size).reshape(ids.shape), "ip")
        ip = np.where(valid, ip, -np.inf)
        order = np.argsort(-ip, axis=1, kind="stable")[:, :k]
        return MipsResult(np.take_along_axis(ip, order, axis=1),
                          np.take_along_axis(np.where(valid, ids, -1), order, axis=1))

    def max_other(self, blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
        """For every pattern the largest inner product with another: (row ids (d,), max_{j != i} rho_i . rho_j (d,))."""
        parts = [(ids, self.search(X, 1, ids, grouped=True).ip[:, 0]) for ids, X in blocks()]
        row_ids, best = (np.concatenate(column) for column in zip(*parts))
        missing = int(np.isinf(best).sum())
        if missing:
            raise DataError(f"the inner-product index ({self.factory}, {self.search_params}) found no other "
                            f"pattern for {missing:,} patterns; pass --exact")
        return row_ids, best

    def sample(self, size: int = RECALL_QUERIES, seed: int = 0) -> Sample:
        """A seeded sample of the indexed patterns, each searched for its largest product with another."""
        pick = np.sort(np.random.default_rng(seed).choice(self.ntotal, size=min(size, self.ntotal), replace=False))
        ids = self.shard.row_ids[pick]
        return Sample(ids, self.vectors(ids), 1, exclude_self=True)

    def tune(self, engine: exact.Engine, blocks: Blocks, samples: dict[str, Sample],
             target: float = TARGET_RECALL) -> dict[str, Any]:
        """Recall on every sample against exact MIPS (`engine.knn`, metric ip; tie-tolerant, by
        inner-product value); an IVF takes the smallest nprobe at which each sample's 1-recall@1
        reaches `target` (`tuning.sweep`).

        Returns {"target_recall", "samples": {name: {"queries", "k", "recall_1_at_1",
        "recall_k_at_k"}} at the chosen nprobe, "tuning": the sweep's record (None without lists)}.
        """
        truths = {name: engine.knn(iter([(s.ids, s.X)]), blocks, s.k, metric="ip", exclude_self=s.exclude_self)[1]
                  for name, s in samples.items()}

        def recalls() -> dict[str, tuple[float, float]]:
            return {name: recall_at(self.search(s.X, s.k, s.ids if s.exclude_self else None).ip, truths[name], "ip")
                    for name, s in samples.items()}

        def measure(nprobe: int) -> float:
            self.shard.set_parameter("nprobe", nprobe)
            return min(at_1 for at_1, _ in recalls().values())

        lists = nlist(self.shard.index)
        swept = tuning.sweep("nprobe", tuning.search_values("nprobe", lists), measure, target) if lists else None
        if swept is not None:
            self.shard.set_parameter("nprobe", swept["chosen"])
        final = recalls()
        return {"target_recall": target, "tuning": swept,
                "samples": {name: {"queries": len(s.ids), "k": s.k, "recall_1_at_1": final[name][0],
                                   "recall_k_at_k": final[name][1]} for name, s in samples.items()}}
