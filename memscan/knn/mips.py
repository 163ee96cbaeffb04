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

Where the nearest-neighbour index holds the patterns in IVF shards (Flat, SQ or PQ codes, any
coarse quantizer), no second index is built (`MipsIndex.over_lists`): each shard's own inverted
lists are decoded and scanned for inner products where the shard is held (this process, or its
Ray actor), a list once per batch of queries, probed by the lists' augmented means as the
augmented index would be (`ListsView`), tuned and re-ranked the same way; the shards' best are
merged on the driver.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

import memscan.store as store
from memscan.knn import exact, kmeans, scan, tuning
from memscan.knn.index import IndexSettings, nlist, recall_at
from memscan.knn.shards import LocalShards, Shard, Shards, grouped_search

log = logging.getLogger(__name__)

CANDIDATE_SLACK = 8     # candidates beyond k, re-ranked exactly
RECALL_QUERIES = 200
COARSE_FLOATS = 1 << 24   # centroid floats gathered at once for residual codes' x . c (64 MiB)

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


SCANNED_IVFS = (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)   # codes ListsView decodes


def inner_product_view(owner: Any) -> Any:
    """An IVF of metric inner product over the IVF `owner`'s own lists, quantizer and codec (shared, not copied),
    which keeps `owner` (the Python object that owns the L2 index) alive as long as it lives."""
    ivf = faiss.downcast_index(owner)
    if isinstance(ivf, faiss.IndexIVFFlat):
        view = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    elif isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        view = faiss.IndexIVFScalarQuantizer(ivf.quantizer, ivf.d, ivf.nlist, ivf.sq.qtype,
                                             faiss.METRIC_INNER_PRODUCT, ivf.by_residual)
        view.sq = ivf.sq
    else:
        view = faiss.IndexIVFPQ(ivf.quantizer, ivf.d, ivf.nlist, ivf.pq.M, ivf.pq.nbits, faiss.METRIC_INNER_PRODUCT)
        view.pq, view.by_residual, view.use_precomputed_table = ivf.pq, ivf.by_residual, 0
    view.replace_invlists(ivf.invlists, False)   # the L2 index keeps owning its lists
    view.ntotal, view.is_trained = ivf.ntotal, True
    view.referenced_objects.append(owner)        # FAISS's own way to keep the owner alive as long
    return view


class ListsView(Shard):
    """An IVF shard's own inverted lists (Flat, SQ or PQ codes, any coarse quantizer) searched for the largest
    inner products: an IVF of metric inner product sharing the lists, no second index and no copy.

    It probes the lists as the augmented L2 index would: those whose augmented means [mean rho,
    mean sqrt(M^2 - ||rho||^2)] lie nearest to [x, 0], which favours lists of large norm and
    wide spread, where large products live (the centroids' products alone miss those). Codes that
    hold residuals score x . (c + r) as FAISS does, from each probed list's x . c.
    """

    def __init__(self, shard: Shard, max_sq_norm: float):
        self.ivf = ivf = faiss.downcast_index(shard.index)
        self.list_vectors = scan.list_vectors(ivf)
        self.probe = faiss.IndexIDMap(faiss.IndexFlatL2(ivf.d + 1))
        for number in range(ivf.nlist):
            _, vectors = self.list_vectors(number)
            if len(vectors):
                mean = augment_patterns(vectors, max_sq_norm).mean(axis=0)
                self.probe.add_with_ids(mean[None], np.array([number]))
        residual = not isinstance(ivf, faiss.IndexIVFFlat) and ivf.by_residual
        self.centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist) if residual else None
        super().__init__(inner_product_view(shard.index), shard.row_ids, {})

    def set_parameter(self, name: str, value: int) -> None:
        """As `Shard.set_parameter`; nprobe probes at most the non-empty lists (the probe holds only those)."""
        super().set_parameter(name, min(value, self.probe.ntotal) if name == "nprobe" else value)
        self.params[name] = value

    def _coarse(self, X: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """x . c of each query and probed list (nq, p) float32, where residual codes' scores start (0 for Flat
        codes, which hold the vectors); gathered COARSE_FLOATS centroid floats at a time."""
        coarse = np.zeros(lists.shape, np.float32)
        if self.centroids is not None:
            rows = max(1, COARSE_FLOATS // (lists.shape[1] * X.shape[1]))
            for start in range(0, len(X), rows):
                part = slice(start, start + rows)
                coarse[part] = np.einsum("qd,qpd->qp", X[part], self.centroids[np.maximum(lists[part], 0)])
        return coarse

    def _search(self, X: np.ndarray, k: int, grouped: bool) -> tuple[np.ndarray, np.ndarray]:
        view = faiss.downcast_index(self.index)
        _, lists = self.probe.search(augment_queries(X), view.nprobe)
        found = None
        if grouped:   # each list read once for the batch: 6x FAISS's per-query scan at nprobe 4 (1M patterns)
            found = (grouped_search(view, X, k, lists.astype(np.int32)) if self.centroids is None
                     else scan.scan_lists(X, lists, k, self.list_vectors))   # big batch search drops residuals' x . c
        D, local = found if found is not None else view.search_preassigned(X, k, lists, self._coarse(X, lists))
        return D, self.row_ids_of(local)


def lists_view(shard: Shard, max_sq_norm: float) -> ListsView | None:
    """The inner-product view of `shard`'s own lists (`ListsView`), None unless it is an IVF of Flat, SQ or PQ
    codes of metric L2; runs where the shard is held (`Shards.views`)."""
    ivf = faiss.downcast_index(shard.index)
    if type(ivf) not in SCANNED_IVFS or ivf.metric_type != faiss.METRIC_L2:
        return None
    return ListsView(shard, max_sq_norm)


@dataclass(frozen=True)
class MipsResult:
    """The k largest inner products of each query: IP (nq, k) float64, descending; I (nq, k) row ids."""

    ip: np.ndarray
    ids: np.ndarray


class MipsIndex:
    """A FAISS index searched for the largest inner products (module docstring): an L2 index over augmented
    patterns (`build`), or an inner-product view of the nearest-neighbour index's own lists (`over_lists`)."""

    def __init__(self, shards: Shards, vectors: Callable[[np.ndarray], np.ndarray], max_sq_norm: float, factory: str,
                 reason: str, augmented: bool = True):
        self.shards, self.vectors, self.max_sq_norm = shards, vectors, max_sq_norm
        self.factory, self.reason, self.augmented = factory, reason, augmented
        self.params: dict[str, int] = {}

    @classmethod
    def over_lists(cls, shards: Shards, vectors: Callable[[np.ndarray], np.ndarray], max_sq_norm: float,
                   factory: str) -> MipsIndex | None:
        """The patterns of a nearest-neighbour index described by `factory`, searched through its own lists:
        a `ListsView` of every shard made where the shard is held (in this process or in its Ray actor), their
        best merged by the caller (`Shards.views`); None unless every shard is an IVF of Flat, SQ or PQ codes
        (metric L2), which each shard's holder tells."""
        views = shards.views(functools.partial(lists_view, max_sq_norm=max_sq_norm), "ip")
        if views is None:
            return None
        return cls(views, vectors, max_sq_norm, f"{factory} (its own lists, inner product)",
                   "the nearest-neighbour index's inverted lists scanned for inner products: no second index",
                   augmented=False)

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
        n = dataset.n + 1
        factory, reason = choose_factory(count, dataset.n, budget) if factory is None else (factory, "given")
        index = faiss.index_factory(n, factory, faiss.METRIC_L2)
        lists = nlist(index)
        if not index.is_trained:
            size = min(count, tuning.train_rows(lists, n, budget))
            log.info("training the inner-product index %s on %d augmented patterns", factory, size)
            kmeans.train(index, _sample(blocks, count, size, seed, max_sq_norm), seed)
        row_ids = []
        for ids, X in blocks():
            index.add(augment_patterns(X, max_sq_norm))
            row_ids.append(ids)
        return cls(LocalShards([Shard(index, np.concatenate(row_ids), {})], "l2"), vectors or dataset.take, max_sq_norm,
                   factory, reason)

    @property
    def ntotal(self) -> int:
        return self.shards.ntotal

    @functools.cached_property
    def exact_codes(self) -> bool:
        return self.shards.exact_codes

    @property
    def search_params(self) -> dict[str, int]:
        return dict(self.params)

    def search(self, X: np.ndarray, k: int, query_ids: np.ndarray | None = None,
               grouped: bool = False) -> MipsResult:
        """The k largest exact inner products rho . x of each query X (nq, n) among the candidates.

        With `query_ids` each query's own row is excluded; -inf and id -1 where fewer than k
        were found. `grouped` scans each inverted list once per block (for self-joins).
        Where the codes are the vectors as added, only the candidates whose FAISS distance could
        still place them among the k best (`_contenders`) are read and re-ranked; compressed codes
        misorder by more than rounding, so there every candidate is.
        """
        X = np.asarray(X, np.float32)
        wanted = min(self.ntotal, k + int(query_ids is not None) + CANDIDATE_SLACK)
        scores, ids = self.shards.search(augment_queries(X) if self.augmented else X, wanted, grouped)
        if query_ids is not None:
            ids = np.where(ids == query_ids[:, None], -1, ids)
        valid = ids >= 0
        contenders = self._contenders(X, scores, valid, k) if self.exact_codes else valid
        local = np.full(ids.shape, -1)
        local[contenders] = np.arange(int(contenders.sum()))
        ip = (exact.exact_scores(X, self.vectors(ids[contenders]), local, "ip") if contenders.any()
              else np.zeros(ids.shape))
        ip = np.where(contenders, ip, -np.inf)
        order = np.argsort(-ip, axis=1, kind="stable")[:, :k]
        return MipsResult(np.take_along_axis(ip, order, axis=1),
                          np.take_along_axis(np.where(valid, ids, -1), order, axis=1))

    def _contenders(self, X: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
        """(nq, c) bool: the valid candidates whose float32 inner product (FAISS's `scores`: augmented squared
        distances ||x||^2 + M^2 - 2 x.rho, or x.rho itself) is within rounding of the k-th best.

        In float32 either errs by at most 2 gamma_{n+1} (||x||^2 + M^2), gamma_m = m u / (1 - m u)
        with u = eps / 2 (a dot product's rounding bound), taken twice over here: a candidate
        further than two such errors below the k-th best has k candidates truly above it.
        """
        sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
        error = 2 * (X.shape[1] + 1) * np.finfo(np.float32).eps * (sq + self.max_sq_norm)
        approximate = (sq[:, None] + self.max_sq_norm - scores) / 2 if self.augmented else scores
        approximate = np.where(valid, approximate, -np.inf)
        kth = -np.partition(-approximate, min(k, scores.shape[1]) - 1, axis=1)[:, min(k, scores.shape[1]) - 1]
        return valid & (approximate >= (kth - 2 * error)[:, None])

    def set_parameter(self, name: str, value: int) -> None:
        """A search parameter of every shard (nprobe), recorded in `search_params`."""
        self.shards.set_parameter(name, value)
        self.params[name] = value

    def max_other(self, blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
        """For every pattern the largest inner product with another found: (row ids (d,), max_{j != i} rho_i . rho_j
        (d,), -inf where the probed lists held no other)."""
        parts = [(ids, self.search(X, 1, ids, grouped=True).ip[:, 0]) for ids, X in blocks()]
        row_ids, best = (np.concatenate(column) for column in zip(*parts))
        return row_ids, best   # -inf where none was found: memscan.query.separation refuses it, whatever searched

    def sample(self, size: int = RECALL_QUERIES, seed: int = 0) -> exact.Request:
        """A seeded sample of the indexed patterns, each searched for its largest product with another."""
        pick = np.sort(np.random.default_rng(seed).choice(self.ntotal, size=min(size, self.ntotal), replace=False))
        ids = self.shards.row_ids[pick]
        return exact.Request(ids, self.vectors(ids), 1, "ip", exclude_self=True)

    def tune(self, samples: dict[str, exact.Request], truths: dict[str, np.ndarray],
             target: float = IndexSettings.target_recall) -> dict[str, Any]:
        """Recall on every sample (its inner-product `exact.Request`) against its exact scores `truths[name]`
        (tie-tolerant, by inner-product value); an IVF takes the smallest nprobe at which each sample's
        1-recall@1 reaches `target` (`tuning.sweep`): the nearest-neighbour index's target recall, which a
        query passes.

        Returns {"target_recall", "samples": {name: {"queries", "k", "recall_1_at_1",
        "recall_k_at_k"}} at the chosen nprobe, "tuning": the sweep's record (None without lists)}.
        """
        def recalls() -> dict[str, tuple[float, float]]:
            return {name: recall_at(self.search(s.X, s.k, s.ids if s.exclude_self else None).ip, truths[name], "ip")
                    for name, s in samples.items()}

        def measure(nprobe: int) -> float:
            self.set_parameter("nprobe", nprobe)
            return min(at_1 for at_1, _ in recalls().values())

        lists = self.shards.nlist
        swept = tuning.sweep("nprobe", tuning.search_values("nprobe", lists), measure, target) if lists else None
        if swept is not None:
            self.set_parameter("nprobe", swept["chosen"])
        final = recalls()
        return {"target_recall": target, "tuning": swept,
                "samples": {name: {"queries": len(s.ids), "k": s.k, "recall_1_at_1": final[name][0],
                                   "recall_k_at_k": final[name][1]} for name, s in samples.items()}}
