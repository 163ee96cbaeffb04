"""Exact kNN and self-join against a float64 numpy brute force: clusters, duplicates, ties, uneven blocks."""

from __future__ import annotations

import numpy as np
import pytest

from memscan.knn import exact


def tricky_vectors(seed: int = 0) -> np.ndarray:
    """Clusters, exact duplicates and integer lattice points (exact ties), float32 (m, 24)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 24)) * 4
    clustered = centers[rng.integers(0, 6, 220)] + rng.normal(size=(220, 24)) * 0.3
    lattice = rng.integers(-2, 3, size=(60, 24)).astype(np.float64)
    X = np.concatenate([clustered, lattice, clustered[:15], lattice[:5]])  # 20 exact duplicates
    return X[rng.permutation(len(X))].astype(np.float32)


def brute_force(xq, xb, metric: str, exclude: np.ndarray | None = None) -> np.ndarray:
    """Full (nq, nb) float64 score matrix; the excluded pairs get the worst score."""
    q, b = xq.astype(np.float64), xb.astype(np.float64)
    scores = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1) if metric == "l2" else q @ b.T
    if exclude is not None:
        scores[exclude] = np.inf if metric == "l2" else -np.inf
    return scores


def assert_matches(D, I, scores, k, metric):
    """Returned scores equal the true top-k scores, and every returned id truly has its score (ties free)."""
    order = np.sort(scores, axis=1) if metric == "l2" else -np.sort(-scores, axis=1)
    np.testing.assert_allclose(D, order[:, :k], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(scores, I, axis=1), D, rtol=1e-6, atol=1e-5)
    assert all(len(set(row)) == k for row in I)


BACKENDS = [exact.FaissBackend(), exact.TorchBackend("cpu", "float32")]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("query_rows,db_rows", [(37, 53), (1000, 1000), (7, 301)])
def test_self_join_equals_brute_force(backend, metric, query_rows, db_rows):
    X = tricky_vectors()
    ids = np.arange(len(X), dtype=np.int64) * 3 + 100  # global ids that are not positions
    k = 7
    qids, D, I = exact.knn(exact.array_blocks(ids, X, query_rows)(), exact.array_blocks(ids, X, db_rows), k,
                           metric=metric, exclude_self=True, backend=backend)
    assert np.array_equal(qids, ids)
    scores = brute_force(X, X, metric, exclude=np.eye(len(X), dtype=bool))
    positions = (I - 100) // 3
    assert not (positions == np.arange(len(X))[:, None]).any()  # never itself
    assert_matches(D, positions, scores, k, metric)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_requests_sharing_one_pass_each_equal_brute_force(backend):
    """knn_each: several searches in one pass over the database, one within a subset of it, each exactly as
    if searched alone (brute force in float64), the database read once."""
    X = tricky_vectors()
    ids = np.arange(len(X), dtype=np.int64) * 3 + 100
    members = np.sort(np.random.default_rng(1).choice(len(X), 90, replace=False))
    picks = [np.arange(0, 40), np.arange(5, 30), np.arange(60, 75), np.arange(0)]
    requests = [exact.Request(ids[picks[0]], X[picks[0]], 5, exclude_self=True),
                exact.Request(ids[picks[1]], X[picks[1]], 3, "ip"),
                exact.Request(ids[picks[2]], X[picks[2]], 2, exclude_self=True, among=ids[members]),
                exact.Request(ids[picks[3]], X[picks[3]], 4)]
    reads = []

    def database():
        reads.append(1)
        return exact.array_blocks(ids, X, 53)()

    found = exact.knn_each(requests, database, block_rows=16, backend=backend)
    assert len(reads) == 1 and found[3][0].shape == (0, 4)
    for request, pick, (D, I) in list(zip(requests, picks, found))[:3]:
        allowed = np.zeros(len(X), bool)
        allowed[members if request.among is not None else slice(None)] = True
        exclude = ~allowed[None, :] | ((pick[:, None] == np.arange(len(X))[None, :]) & request.exclude_self)
        scores = brute_force(X[pick], X, request.metric, exclude=np.broadcast_to(exclude, (len(pick), len(X))).copy())
        assert_matches(D, (I - 100) // 3, scores, request.k, request.metric)


def test_duplicates_are_neighbours_at_distance_zero():
    X = tricky_vectors()
    ids = np.arange(len(X), dtype=np.int64)
    _, D, I = exact.self_join(exact.array_blocks(ids, X, 50), 3)
    duplicated = [i for i in range(len(X)) if (np.abs(X - X[i]).sum(1) == 0).sum() > 1]
    assert len(duplicated) >= 40
    assert (D[duplicated, 0] == 0).all()
    for i in duplicated:
        assert I[i, 0] != i and np.array_equal(X[I[i, 0]], X[i])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_queries_against_another_set(backend):
    X = tricky_vectors(1)
    queries = tricky_vectors(2)[:90] + 0.01
    ids = np.arange(len(X), dtype=np.int64)
    qids = np.arange(len(queries), dtype=np.int64)
    _, D, I = exact.knn(exact.array_blocks(qids, queries, 40)(), exact.array_blocks(ids, X, 77), 5, backend=backend)
    assert_matches(D, I, brute_force(queries, X, "l2"), 5, "l2")


def test_k_larger_than_a_block_and_than_the_database():
    X = tricky_vectors()[:30]
    ids = np.arange(30, dtype=np.int64)
    _, D, I = exact.self_join(exact.array_blocks(ids, X, 4), 12)
    assert_matches(D, I, brute_force(X, X, "l2", exclude=np.eye(30, dtype=bool)), 12, "l2")
    _, D, I = exact.self_join(exact.array_blocks(ids, X, 4), 30)
    assert (I[:, -1] == -1).all() and np.isinf(D[:, -1]).all() and (I[:, :-1] >= 0).all()


def test_torch_half_precision_backend_agrees_after_exact_recomputation():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(40, 32)) * 5
    X = (centers[rng.integers(0, 40, 400)] + rng.normal(size=(400, 32)) * 0.5).astype(np.float32)
    ids = np.arange(400, dtype=np.int64)
    _, D32, I32 = exact.self_join(exact.array_blocks(ids, X, 128), 3)
    _, D16, I16 = exact.self_join(exact.array_blocks(ids, X, 128), 3, backend=exact.TorchBackend("cpu", "bfloat16"))
    assert (I16[:, 0] == I32[:, 0]).mean() > 0.95
    same = I16 == I32
    np.testing.assert_allclose(D16[same], D32[same], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + [exact.TorchBackend("cpu", "bfloat16")], ids=lambda b: b.name)
def test_large_norms_do_not_cancel_the_ranking(backend):
    X = tricky_vectors() + np.float32(4000.0)  # activations sit far from the origin; neighbours are close
    ids = np.arange(len(X), dtype=np.int64)
    _, D, I = exact.self_join(exact.array_blocks(ids, X, 100), 5, backend=backend)
    assert_matches(D, I, brute_force(X, X, "l2", exclude=np.eye(len(X), dtype=bool)), 5, "l2")


def test_gpu_asked_for_without_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception, match="--device gpu"):
        exact.choose_backend("gpu")
