"""The exact search through an IVF-Flat index's lists (memscan.knn.cells) against brute force in float64."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from memscan.knn import cells
from tests.conftest import clustered


def ivf_flat(X: np.ndarray, lists: int) -> faiss.IndexIVFFlat:
    index = faiss.index_factory(X.shape[1], f"IVF{lists},Flat")
    index.train(X)
    index.add(X)
    return index


def brute(X: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((Q.astype(np.float64)[:, None] - X.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, order, 1), order


def test_the_bound_never_exceeds_the_distance_to_any_point_of_a_cell():
    data = clustered(3050, 16, 20, seed=1)
    X, Q = data[:3000], data[3000:]
    index = ivf_flat(X, 32)
    centroids = index.quantizer.reconstruct_n(0, 32)
    bound, _ = cells.list_bounds(Q, centroids)
    _, cell_of = index.quantizer.search(X, 1)
    distance = np.sqrt(((Q.astype(np.float64)[:, None] - X.astype(np.float64)[None]) ** 2).sum(-1))   # (q, m)
    for c in range(32):
        members = cell_of[:, 0] == c
        if members.any():
            assert (bound[:, c] <= distance[:, members].min(1) + 1e-6).all()


@pytest.mark.parametrize("slack", [1.0, 1.5])
def test_search_within_the_kth_distance_is_exact_and_scans_few_lists(slack):
    data = clustered(6300, 24, 30, seed=3)
    X = data[:6000]
    X[100:110] = X[0]                                   # exact duplicates: ties at distance 0
    index = ivf_flat(X, 64)
    Q = np.concatenate([data[6000:], X[:5]])            # queries from the same clusters, and patterns themselves
    k = 6
    truth_d2, truth_i = brute(X, Q, k)
    radius = np.sqrt(truth_d2[:, -1]) * slack
    D, I, scanned = cells.search_within(index, Q, k, radius)
    np.testing.assert_allclose(D, truth_d2, rtol=1e-4, atol=1e-4)
    found_d2 = ((Q.astype(np.float64)[:, None] - X[I].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(found_d2, truth_d2, rtol=1e-5, atol=1e-5)   # any twin of a tie will do
    assert scanned < 0.25 * len(Q) * 64                # clustered data: a few lists per query, not all
    assert index.nprobe == 1                           # left as it was


def test_a_radius_that_prunes_too_little_declines(monkeypatch):
    data = clustered(2040, 8, 10, seed=5)
    X, Q = data[:2000], data[2000:]
    index = ivf_flat(X, 16)
    assert cells.search_within(index, Q, 3, np.full(len(Q), np.inf)) is None
    monkeypatch.setattr(cells, "SCAN_LIMIT", 1.0)      # allowed to scan everything: still exact
    D, I, scanned = cells.search_within(index, Q, 3, np.full(len(Q), np.inf))
    np.testing.assert_allclose(D, brute(X, Q, 3)[0], rtol=1e-4, atol=1e-4)
    assert scanned == 40 * 16
