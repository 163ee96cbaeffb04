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


PRODUCT_ELEMENTS = 1 << 24   # one list's scores are computed for this many (query, vector) pairs at a time


def _pieces(subset: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """`subset` in pieces whose scores against `size` vectors hold at most PRODUCT_ELEMENTS: a list probed by
    many queries (a large cluster) never makes one product of all of them."""
    step = max(1, PRODUCT_ELEMENTS // max(1, size))
    return (subset[start:start + step] for start in range(0, len(subset), step))


def own_list_blocks(ivf: Any, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The IVF's stored vectors as self-join queries, whole lists at a time (at least `block_rows` vectors a
    block, but for the last): (local ids (m,), vectors (m, d), the lists each probes (m, nprobe)). At nprobe 1
    that is the list each vector was added to, its nearest centroid: no coarse search, and each list is read
    by one block only; else the quantizer's nprobe nearest."""
    read = list_vectors(ivf)
    parts: list[tuple[int, np.ndarray, np.ndarray]] = []
    held = 0
    for number in range(ivf.nlist):
        ids, vectors = read(number)
        if len(ids):
            parts.append((number, ids, vectors))
            held += len(ids)
        if parts and (number == ivf.nlist - 1 or held >= block_rows):
            local, X = np.concatenate([ids for _, ids, _ in parts]), np.concatenate([v for _, _, v in parts])
            if ivf.nprobe == 1:
                lists = np.repeat([number for number, _, _ in parts], [len(ids) for _, ids, _ in parts])[:, None]
            else:
                lists = ivf.quantizer.search(X, ivf.nprobe)[1]
            parts, held = [], 0
            yield local, X, lists


def scan_lists(X: np.ndarray, lists: np.ndarray, k: int, vectors_of: ListVectors) -> tuple[np.ndarray, np.ndarray]:
    """For each query X (nq, n) the k largest inner products over the vectors of its probed `lists` (nq, p):
    (scores (nq, k) float32, descending; local ids (nq, k), -1 where fewer)."""
    heap = faiss.ResultHeap(len(X), k, keep_max=True)
    for number, subset in _groups(lists):
        ids, vectors = vectors_of(number)
        for piece in _pieces(subset, len(ids)):
            heap.add_result_subset(piece, X[piece] @ vectors.T, ids)
    heap.finalize()
    return heap.D, heap.I


class BothScans(NamedTuple):
    """One scan's two answers: the k nearest (D squared L2 (nq, k) ascending, local ids) and the `products`
    largest inner products (P (nq, products) descending, local ids), -1 where a query's lists held fewer."""

    D: np.ndarray
    I: np.ndarray
    P: np.ndarray
    J: np.ndarray


def _largest_of_rows(P: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `count` largest values of P (r, m), overwritten, and their columns: (r, min(count, m)) each.
    A few passes of argmax cost less than a heap over every element when `count` is a handful."""
    rows, taken = np.arange(len(P)), min(count, P.shape[1])
    top, columns = np.empty((len(P), taken), np.float32), np.empty((len(P), taken), np.int64)
    for rank in range(taken):
        columns[:, rank] = column = P.argmax(axis=1)
        top[:, rank] = P[rows, column]
        P[rows, column] = -np.inf
    return top, columns


def scan_both(X: np.ndarray, lists: np.ndarray, k: int, products: int, vectors_of: ListVectors) -> BothScans:
    """The k nearest and the `products` largest inner products of each query X (nq, n) over the vectors of its
    probed `lists` (nq, p) (none where `products` is 0), both from one product per list. The product is of
    residuals from the list's mean, so float32's rounding of ||x - y||^2 = ||x - c||^2 + ||y - c||^2 -
    2 (x - c).(y - c) scales with the cluster's spread, not the patterns' norms; x.y adds back the centre's
    terms. Callers still recompute their candidates' scores exactly."""
    nearest = faiss.ResultHeap(len(X), k, keep_max=False)
    largest = faiss.ResultHeap(len(X), products, keep_max=True) if products else None
    for number, subset in _groups(lists):
        ids, vectors = vectors_of(number)
        if not len(ids):   # an empty list: nothing to score, and no mean to take
            continue
        center = vectors.mean(axis=0)
        residuals = vectors - center
        residual_squares = np.einsum("ij,ij->i", residuals, residuals)[None, :]
        center64 = center.astype(np.float64)   # x.y = (x - c).(y - c) + x.c + y.c - c.c: the centre's terms in float64
        center_terms = (vectors @ center64 - center64 @ center64)[None, :].astype(np.float32)
        for piece in _pieces(subset, len(ids)):
            queries = X[piece]
            query_residuals = queries - center
            G = query_residuals @ residuals.T
            if largest is not None:
                row_terms = (queries @ center64).astype(np.float32)[:, None]
                top, columns = _largest_of_rows(G + row_terms + center_terms, products)
                largest.add_result_subset(piece, top, ids[columns])
            G *= -2
            G += np.einsum("ij,ij->i", query_residuals, query_residuals)[:, None]
            G += residual_squares
            nearest.add_result_subset(piece, G, ids)
    nearest.finalize()
    if largest is None:
        return BothScans(nearest.D, nearest.I, np.empty((len(X), 0), np.float32), np.empty((len(X), 0), np.int64))
    largest.finalize()
    return BothScans(nearest.D, nearest.I, largest.D, largest.I)
