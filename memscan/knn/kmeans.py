"""Training an index: IVF centroids by two-level k-means where one-level k-means would cost nlist^2.

One-level k-means on a sample of TRAIN_PER_LIST points a list compares every point with
every centroid: 64 nlist x nlist distances an iteration, so a million vectors (4,096
lists) spend 40 s of a 2-core CPU there against 0.6 s at 100,000 (512 lists). Two-level
k-means (as faiss.contrib.clustering.two_level_clustering) first splits the sample into
sqrt(nlist) clusters, then each cluster into its share of the lists, in proportion to
its size: each point meets about 2 sqrt(nlist) centroids an iteration, nlist^1.5 in all.
The centroids are a little less even than one level's; the search parameters are tuned
for a recall target afterwards either way.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from memscan.knn.tuning import KMEANS_ITERATIONS

TWO_LEVEL_MIN = 1024   # lists: below this one-level k-means takes a second or two at most


def apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """`total` (at most sizes.sum()) split over groups in proportion to `sizes`, largest remainders rounded up."""
    exact = sizes * (total / sizes.sum())
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(-(exact - shares), kind="stable")[:total - int(shares.sum())]] += 1
    return np.minimum(shares, sizes)


def _kmeans(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k centroids (k, n) float32 of the rows of X by FAISS's k-means (the rows themselves when k = len(X))."""
    if k == len(X):
        return np.array(X, np.float32)
    km = faiss.Kmeans(X.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(X, np.float32))
    return km.centroids


def two_level_centroids(sample: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """`nlist` centroids (nlist, n) float32 of `sample` (at least nlist rows): sqrt(nlist) clusters, each
    split into a share of the lists in proportion to its rows (module docstring)."""
    first = _kmeans(sample, max(2, round(math.sqrt(nlist))), seed)
    _, assign = faiss.knn(np.ascontiguousarray(sample, np.float32), first, 1)
    assign = assign[:, 0]
    shares = apportion(np.bincount(assign, minlength=len(first)), nlist)
    return np.vstack([_kmeans(sample[assign == group], int(share), seed + 1 + group)
                      for group, share in enumerate(shares) if share])


def train(index: Any, sample: np.ndarray, seed: int = 0) -> None:
    """Train `index` on `sample`. A CPU IVF index (metric L2) of TWO_LEVEL_MIN lists or more gets its
    coarse centroids by `two_level_centroids` first; the rest of its training (SQ or PQ codes) is FAISS's."""
    ivf = faiss.downcast_index(index)
    if isinstance(ivf, faiss.IndexIVF) and ivf.metric_type == faiss.METRIC_L2 and ivf.nlist >= TWO_LEVEL_MIN:
        centroids = two_level_centroids(sample, ivf.nlist, seed)
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)   # the quantizer now holds nlist centroids: FAISS trains only the codes
    index.train(sample)
