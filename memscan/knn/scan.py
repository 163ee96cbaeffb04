"""One pass over an IVF's inverted lists for many queries: each list read (and decoded) once for all the
queries that probe it, its scores one matrix product, as faiss.contrib's big batch search does; here where
that cannot go (residual codes' centroids added back, both metrics from one product).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

ListVectors = Callable[[int], tuple[np.ndarray, np.ndarray]]   # list number -> (local ids (m,), vectors (m, n))


def list_decoder(ivf: Any) -> Callable[[int, np.ndarray], np.ndarray]:
    """(list number, the list's codes) -> its vectors (m, d) float32 as the IVF stores them: Flat codes as they
    are, SQ and PQ codes decoded, the list's centroid added back where the codes hold residuals."""
    if isinstance(ivf, faiss.IndexIVFFlat):
        return lambda number, codes: codes.view(np.float32).reshape(-1, ivf.d)
    coder = ivf.sq if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else ivf.pq

    def decode(number: int, codes: np.ndarray) -> np.ndarray:
        vectors = coder.decode(codes)
        return vectors + ivf.quantizer.reconstruct(number) if ivf.by_residual else vectors
    return decode


def list_vectors(ivf: Any) -> ListVectors:
    """The IVF's lists read by number: each one's local ids and its vectors, decoded (`list_decoder`)."""
    decode = list_decoder(ivf)

    def read(number: int) -> tuple[np.ndarray, np.ndarray]:
        ids, codes = get_invlist(ivf.invlists, number)
        return ids, decode(number, codes)
    return read


def _groups(lists: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(list number, the queries (ascending) that probe it) for every probed list of `lists` (nq, p)."""
    probes, queries = lists.ravel(), np.repeat(np.arange(len(lists)), lists.shape[1])
    order = np.argsort(probes, kind="stable")
    probes, queries = probes[order], queries[order]
    starts = np.flatnonzero(np.r_[True, probes[1:] != probes[:-1]]) if len(probes) else np.empty(0, np.int64)
    for start, stop in zip(starts, np.r_[starts[1:], len(probes)]):
        if probes[start] >= 0:
            yield int(probes[start]), queries[start:stop]


def scan_lists(X: np.ndarray, lists: np.ndarray, k: int, vectors_of: ListVectors) -> tuple[np.ndarray, np.ndarray]:
    """For each query X (nq, n) the k largest inner products over the vectors of its probed `lists` (nq, p):
    (scores (nq, k) float32, descending; local ids (nq, k), -1 where fewer)."""
    heap = faiss.ResultHeap(len(X), k, keep_max=True)
    for number, subset in _groups(lists):
        ids, vectors = vectors_of(number)
        if len(ids):
            heap.add_result_subset(subset, X[subset] @ vectors.T, ids)
    heap.finalize()
    return heap.D, heap.I


class BothScans(NamedTuple):
    """One scan's two answers: the k nearest (D squared L2 (nq, k) ascending, local ids) and the `products`
    largest inner products (P (nq, products) descending, local ids), -1 where a query's lists held fewer."""

    D: np.ndarray
    I: np.ndarray
    P: np.ndarray
    J: np.ndarray


def scan_both(X: np.ndarray, lists: np.ndarray, k: int, products: int, vectors_of: ListVectors) -> BothScans:
    """The k nearest and the `products` largest inner products of each query X (nq, n) over the vectors of its
    probed `lists` (nq, p), both from one product per list: ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y (float32,
    as FAISS's own scan; callers recompute their candidates' scores exactly)."""
    nearest = faiss.ResultHeap(len(X), k, keep_max=False)
    largest = faiss.ResultHeap(len(X), products, keep_max=True)
    squares = np.einsum("ij,ij->i", X, X)
    for number, subset in _groups(lists):
        ids, vectors = vectors_of(number)
        if not len(ids):
            continue
        G = X[subset] @ vectors.T
        largest.add_result_subset(subset, G, ids)
        G *= -2
        G += squares[subset, None]
        G += np.einsum("ij,ij->i", vectors, vectors)[None, :]
        nearest.add_result_subset(subset, G, ids)
    nearest.finalize()
    largest.finalize()
    return BothScans(nearest.D, nearest.I, largest.D, largest.I)
