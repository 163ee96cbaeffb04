"""Exact search through an IVF-Flat index: scan only the inverted lists that can hold a close enough point.

An IVF list holds the points of one Voronoi cell: those nearer to its centroid c than to
any other. Every point of cell c lies in the half-space {y : ||y - c|| <= ||y - a||}, for
a the query's nearest centroid, so its distance to the query x is at least the distance
from x to that half-space's boundary,

    bound_c(x) = (||x - c||^2 - ||x - a||^2) / (2 ||a - c||)      (0 for c = a).

A search that scans every list with bound_c(x) <= r finds every point within r of x, so
its k nearest are exact whenever the true k-th nearest is within r: for a self-join's
verification, r is the approximate search's k-th distance, never below the true one.
On well-separated clusters this scans a handful of lists instead of all of them; where
the bound prunes little (noise as wide as the clusters' spacing, in high dimension) a
scan of most lists is slower than a blockwise exact search, so past SCAN_LIMIT of the
lists the search declines and the caller searches exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK_QUERIES = 1024   # queries whose (queries x lists) bounds are held at once, in float64
SCAN_LIMIT = 0.25      # the fraction of all lists above which an exact blockwise search is faster
# Margins on the radius (relative, and relative to the largest centroid norm): the lists were filled
# by float32 distances, so a point within rounding of a cell's boundary may sit in either cell.
RELATIVE_SLACK, NORM_SLACK = 1e-3, 1e-5


def list_bounds(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bound (q, L) float64 as in the module docstring, squared distance to every centroid (q, L))."""
    X, C = X.astype(np.float64), centroids.astype(np.float64)
    c2 = (C * C).sum(1)
    to_centroid = np.maximum((X * X).sum(1)[:, None] + c2[None] - 2 * X @ C.T, 0)
    nearest = to_centroid.argmin(1)
    apart = np.sqrt(np.maximum(c2[nearest][:, None] + c2[None] - 2 * C[nearest] @ C.T, 0))
    gap = to_centroid - to_centroid[np.arange(len(X)), nearest][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(apart > 0, gap / (2 * apart), 0.0)
    return np.maximum(bound, 0), to_centroid


def search_within(ivf: Any, X: np.ndarray, k: int, radius: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(D (q, k) squared distances, I (q, k) FAISS ids, lists scanned in all) of a CPU IndexIVFFlat (L2):
    exact for every query whose k-th nearest lies within radius[i]; None where it would scan more than
    SCAN_LIMIT of the lists."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    margin = NORM_SLACK * float(np.sqrt((centroids.astype(np.float64) ** 2).sum(1).max()))
    blocks = [slice(start, start + BLOCK_QUERIES) for start in range(0, len(X), BLOCK_QUERIES)]

    def lists_needed(block: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bound, to_centroid = list_bounds(X[block], centroids)
        return bound, to_centroid, (bound <= radius[block, None] * (1 + RELATIVE_SLACK) + margin).sum(1)

    if sum(int(lists_needed(block)[2].sum()) for block in blocks) > SCAN_LIMIT * ivf.nlist * len(X):
        return None
    D, I = np.empty((len(X), k), np.float32), np.empty((len(X), k), np.int64)
    kept, scanned = ivf.nprobe, 0
    try:
        for block in blocks:
            bound, to_centroid, needed = lists_needed(block)
            order = np.argsort(bound, axis=1, kind="stable")
            width = int(needed.max())
            lists = np.where(np.arange(width)[None] < needed[:, None], order[:, :width], -1)
            ivf.nprobe = width
            D[block], I[block] = ivf.search_preassigned(
                np.ascontiguousarray(X[block], np.float32), k, lists,
                np.take_along_axis(to_centroid, order[:, :width], 1).astype(np.float32))
            scanned += int(needed.sum())
    finally:
        ivf.nprobe = kept
    return D, I, scanned
