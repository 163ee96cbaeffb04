"""Two-level k-means for IVF indexes of many lists: as good a partition as one level, at a cost of nlist^1.5."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from conftest import clustered

from memscan.knn import kmeans


def objective(X: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance (float64) from each row of X to its nearest centroid: what k-means minimises."""
    X64, C64 = X.astype(np.float64), centroids.astype(np.float64)
    sq = (X64 * X64).sum(1)[:, None] - 2 * X64 @ C64.T + (C64 * C64).sum(1)[None]
    return float(np.maximum(sq.min(1), 0).mean())


@pytest.mark.parametrize("sizes, total", [([5, 3, 1, 0, 100], 20), ([7, 7, 7], 21), ([1000, 1, 1], 3), ([3, 3], 4)])
def test_apportion_splits_a_total_in_proportion(sizes, total):
    sizes = np.array(sizes)
    shares = kmeans.apportion(sizes, total)
    assert shares.sum() == total and (shares <= sizes).all() and (shares >= 0).all()
    assert (np.abs(shares - sizes * total / sizes.sum()) < 1).all()


def test_two_level_centroids_partition_as_well_as_one_level():
    X = clustered(1024 * 40, 8, 300, seed=1, spread=0.3)
    two = kmeans.two_level_centroids(X, 1024, seed=0)
    one = faiss.Kmeans(8, 1024, niter=kmeans.KMEANS_ITERATIONS, seed=0)
    one.train(X)
    assert two.shape == (1024, 8) and two.dtype == np.float32
    assert len(np.unique(two, axis=0)) == 1024
    assert objective(X, two) <= 1.25 * objective(X, one.centroids)
    assert objective(X, two) < 0.7 * objective(X, X[:1024])   # better than centroids picked at random
    np.testing.assert_array_equal(two, kmeans.two_level_centroids(X, 1024, seed=0))   # seeded


@pytest.mark.parametrize("factory", ["IVF1024,Flat", "IVF1024,SQ8"])
def test_many_lists_train_two_level_then_their_codes(factory):
    X = clustered(1024 * 40, 8, 300, seed=2, spread=0.3)
    index = faiss.index_factory(8, factory)
    kmeans.train(index, X, seed=3)
    ivf = faiss.downcast_index(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    np.testing.assert_array_equal(centroids, kmeans.two_level_centroids(X, 1024, seed=3))
    assert index.is_trained
    index.add(X)
    ivf.nprobe = 1024
    D, I = index.search(X[:50], 1)
    np.testing.assert_allclose(D[:, 0], 0, atol=1e-2)   # every vector finds itself (SQ8: within its rounding)


def test_few_lists_train_as_faiss_does():
    X = clustered(64 * 40, 8, 20, seed=4)
    ours, theirs = faiss.index_factory(8, "IVF64,Flat"), faiss.index_factory(8, "IVF64,Flat")
    kmeans.train(ours, X)
    theirs.train(X)
    np.testing.assert_array_equal(faiss.downcast_index(ours).quantizer.reconstruct_n(0, 64),
                                  faiss.downcast_index(theirs).quantizer.reconstruct_n(0, 64))
