"""Issue 12 on the query side: every statistic through an index, streamed in blocks, in one memory budget.

Approximate and exact runs agree within their recall on data with clusters, exact
duplicates and ties; the subsets come from the self-join's lists (exact) and a search for
the rest; the MCHN interval contains the exact energy; the streamed tables equal the
unblocked ones; retrieval over a block at once equals the per-query loop.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import clustered
from faiss.contrib.inspect_tools import get_invlist

import memscan
from memscan import analysis, query, store, theory
from memscan.query import checks, context, distances, largest, separation, subsets
from memscan.query import retrieval as query_retrieval
from memscan.cli import main
from memscan.engines import knn as knn_engine
from memscan.errors import InputError
from memscan.knn import exact, mips, tuning
from memscan.knn import index as knn_index
from memscan.knn.index import IndexSettings, KnnIndex, build, dataset_blocks
from memscan.knn.shards import Shard
from memscan.query import QuerySettings, run

TRAIN, TEST = 2000, 1200
K, BETA = 3, 0.5


def tied_clusters() -> np.ndarray:
    """3,200 vectors of n = 8: 12 clusters at varied norms, 40 exact duplicates, and a lattice
    of 64 points (in train and test) whose neighbours tie at equal distances."""
    X = clustered(TRAIN + TEST, 8, 12, seed=3) * np.random.default_rng(4).uniform(0.5, 2.0, (TRAIN + TEST, 1))
    X[100:140] = X[500:540]
    lattice = np.zeros((64, 8))
    lattice[:, :3] = np.stack(np.meshgrid(*[np.arange(4)] * 3), -1).reshape(-1, 3) * 0.5
    X[1000:1064] = lattice
    X[TRAIN + 10:TRAIN + 74] = lattice
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("scale") / "data"
    store.write_vectors(directory, tied_clusters(), ["train"] * TRAIN + ["test"] * TEST, model="synthetic",
                        shard_rows=700)
    return directory


@pytest.fixture(scope="module")
def ivf(data, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("scale") / "ivf"
    build(data, directory, IndexSettings(factory="IVF16,Flat", nprobe=4))
    return directory


@pytest.fixture(scope="module")
def arrays(data) -> dict[str, np.ndarray]:
    dataset = store.ActivationDataset(data)
    P = dataset.take(dataset.row_ids("train")).astype(np.float64)
    Q = dataset.take(dataset.row_ids("test")).astype(np.float64)
    return {"P": P, "Q": Q, "pp": ((P[:, None] - P[None]) ** 2).sum(-1), "qp": ((Q[:, None] - P[None]) ** 2).sum(-1)}


@pytest.fixture(scope="module")
def runs(data, ivf, tmp_path_factory) -> dict[str, memscan.RunTables]:
    """The same query approximate (an IVF inner-product index too) and exact, each also streamed in a few
    MiB: several blocks of queries (the exact MCHN pass's products make its blocks smaller)."""
    root = tmp_path_factory.mktemp("runs")
    patch = pytest.MonkeyPatch()
    patch.setattr(tuning, "auto_factory", lambda *args, **kwargs: ("IVF16,Flat", "a test's IVF"))
    settings = QuerySettings(k=K, beta=BETA, subsets=(0.25, 1.0))
    for name, extra in (("approximate", {}), ("approximate_small", {"memory": "1MiB"}), ("exact", {"exact": True}),
                        ("exact_small", {"exact": True, "memory": "4MiB"})):
        run(ivf, data, root / name, QuerySettings(**{**settings.__dict__, **extra}))
    patch.undo()
    return {name: memscan.load(root / name) for name in ("approximate", "approximate_small", "exact", "exact_small")}


def layer_summary(tables: memscan.RunTables) -> dict:
    return tables.summary["layers"][0]


# ---------------------------------------------------------------- retrieval: a block at once equals the loop


@pytest.mark.parametrize("spread", [0.05, 0.5, 3.0])
def test_vectorized_retrieval_equals_the_per_query_loop(spread):
    rng = np.random.default_rng(7)
    neighbours = rng.normal(size=(120, 5, 6)).astype(np.float32)
    neighbours[:10, 1] = neighbours[:10, 0]                       # duplicates among the k
    X = (neighbours[:, 0] + spread * rng.normal(size=(120, 6))).astype(np.float32)
    fixed, steps, converged = analysis.retrieve_batch(X, neighbours, 0.7, 1e-6, 30)
    loop = [theory.retrieve(x, P, 0.7, 1e-6, 30) for x, P in zip(X, neighbours)]
    np.testing.assert_allclose(fixed, np.stack([point for point, _, _ in loop]), rtol=1e-12, atol=1e-12)
    assert steps.tolist() == [step for _, step, _ in loop] and converged.tolist() == [done for _, _, done in loop]
    assert 0 < converged.sum() <= len(X) and len(set(steps.tolist())) > 1    # rows stop at different steps
    epsilon = 0.3
    _, _, retrieved = analysis.retrieval(X, neighbours, 0.7, epsilon, 1e-6, 30)
    expected = [done and np.linalg.norm(point - P[0]) <= epsilon for (point, _, done), P in zip(loop, neighbours)]
    assert retrieved.tolist() == expected


# ---------------------------------------------------------------- MIPS through an L2 index


def test_the_augmentation_turns_inner_products_into_distances():
    rng = np.random.default_rng(0)
    P, X = rng.normal(size=(50, 5)) * rng.uniform(0.1, 3, (50, 1)), rng.normal(size=(7, 5))
    M2 = float((P * P).sum(1).max())
    A, B = mips.augment_patterns(P, M2).astype(np.float64), mips.augment_queries(X).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(M2), rtol=1e-6)
    sq = ((B[:, None] - A[None]) ** 2).sum(-1)
    np.testing.assert_allclose(sq, (X * X).sum(1)[:, None] + M2 - 2 * X @ P.T, rtol=1e-5, atol=1e-5)


def _truths(samples: dict[str, exact.Request], blocks) -> dict[str, np.ndarray]:
    """Each sample's exact scores, from one shared pass (as memscan.query.checks gets them)."""
    found = knn_engine.LocalEngine().knn_each(list(samples.values()), blocks)
    return {name: D for name, (D, _) in zip(samples, found)}


def test_mips_finds_the_largest_inner_products_and_measures_its_recall(data, arrays):
    P = arrays["P"]
    dataset = store.ActivationDataset(data)
    blocks = dataset_blocks(dataset, "train", 0, 500)
    index = mips.MipsIndex.build(dataset, blocks, TRAIN, float((P * P).sum(1).max()), 1 << 30,
                                 factory="IVF16,Flat")
    X = arrays["Q"][:50].astype(np.float32)
    samples = {"patterns": index.sample(seed=1), "queries": exact.Request(np.arange(50), X, 4, "ip")}
    record = index.tune(samples, _truths(samples, blocks))
    swept, recall = record["tuning"], record["samples"]["patterns"]["recall_1_at_1"]
    assert record["samples"]["patterns"]["queries"] == 200 and record["samples"]["queries"]["k"] == 4
    assert swept["reached"] and min(r["recall_1_at_1"] for r in record["samples"].values()) >= 0.95
    assert index.search_params == {"nprobe": swept["chosen"]} and swept["chosen"] in swept["curve"]["nprobe"]

    gram = P @ P.T
    np.fill_diagonal(gram, -np.inf)
    row_ids, best = index.max_other(blocks)
    truth = gram.max(1)
    assert np.array_equal(row_ids, np.arange(TRAIN))
    assert (best <= truth + 1e-9 * np.abs(truth)).all()            # exact products of real patterns: never above
    found = np.isclose(best, truth, rtol=1e-9, atol=1e-9)
    assert found.mean() >= recall - 0.05

    result = index.search(X, 4)
    products = X.astype(np.float64) @ P.T
    np.testing.assert_allclose(result.ip, np.take_along_axis(products, result.ids, axis=1), rtol=1e-12)
    assert (np.diff(result.ip, axis=1) <= 0).all()
    assert np.isclose(result.ip[:, 0], products.max(1), rtol=1e-9).mean() >= 0.95


def test_mips_reranks_only_the_candidates_rounding_could_reorder(data, arrays, monkeypatch):
    """Exact products are recomputed only for candidates within float32 rounding of the k-th best: the same
    results as recomputing every candidate, from fewer vectors read, on data with duplicates and ties."""
    P = arrays["P"]
    dataset = store.ActivationDataset(data)
    blocks = dataset_blocks(dataset, "train", 0, 500)
    index = mips.MipsIndex.build(dataset, blocks, TRAIN, float((P * P).sum(1).max()), 1 << 30,
                                 factory="IVF16,Flat")
    index.set_parameter("nprobe", 4)
    read = []
    index.vectors = lambda rows, take=index.vectors: read.append(len(rows)) or take(rows)
    X, ids = arrays["P"].astype(np.float32), np.arange(TRAIN)
    filtered = [index.search(X, 1, ids, grouped=True), index.search(arrays["Q"], 4)]
    monkeypatch.setattr(index, "exact_codes", False)
    every = [index.search(X, 1, ids, grouped=True), index.search(arrays["Q"], 4)]
    for few, full in zip(filtered, every):
        np.testing.assert_array_equal(few.ip, full.ip)
        np.testing.assert_array_equal(few.ids, full.ids)
    assert read[0] < read[2] / 3 and read[1] < read[3]


def test_an_ivf_flat_index_is_searched_for_inner_products_through_its_own_lists(data, ivf, arrays):
    """The inner-product view shares the index's lists (no copy); probing every list it is exact MIPS."""
    P, Q = arrays["P"], arrays["Q"][:50].astype(np.float32)
    index = KnnIndex.load(ivf, device="cpu")
    searcher = mips.MipsIndex.over_lists(index.shards, index.vectors, float((P * P).sum(1).max()),
                                         index.info["factory"])
    view = searcher.shards.members[0]
    assert view.index.invlists.this == faiss.downcast_index(index.shards.members[0].index).invlists.this
    assert view.index.ntotal == TRAIN and view.probe.ntotal == 16 and not searcher.augmented
    searcher.set_parameter("nprobe", 16)
    result = searcher.search(Q, 4)
    products = Q.astype(np.float64) @ P.T
    np.testing.assert_allclose(result.ip, -np.sort(-products, axis=1)[:, :4], rtol=1e-12)
    row_ids, best = searcher.max_other(dataset_blocks(store.ActivationDataset(data), "train", 0, 500))
    gram = P @ P.T
    np.fill_diagonal(gram, -np.inf)
    np.testing.assert_allclose(best, gram.max(1), rtol=1e-12)
    assert index.info["search"] == {"nprobe": 4}   # the index searches as before


def lists_view_over(P: np.ndarray, filled: np.ndarray) -> mips.ListsView:
    """A ListsView over an IVF16 trained on all of P but filled with the rows `filled` only (empty lists),
    built inside this function so that only the view keeps the L2 index alive."""

    ivf = faiss.index_factory(P.shape[1], "IVF16,Flat")
    ivf.train(P.astype(np.float32))
    ivf.add(P[filled].astype(np.float32))
    return mips.ListsView(Shard(ivf, filled, {}), float((P[filled] ** 2).sum(1).max()))


def test_a_lists_view_survives_empty_lists_small_batches_and_its_owner_going(arrays):
    import gc

    P = arrays["P"]
    filled = np.sort(np.argsort(arrays["pp"][0])[:150])   # one compact region: most of the 16 lists stay empty
    view = lists_view_over(P, filled)
    gc.collect()                                  # the index it was made from is gone but for the view
    assert 0 < view.probe.ntotal < 16
    view.set_parameter("nprobe", 16)              # more than the non-empty lists: all of them
    assert view.params["nprobe"] == 16 and faiss.downcast_index(view.index).nprobe == view.probe.ntotal
    Q = arrays["Q"][:5].astype(np.float32)
    truth = -np.sort(-(Q.astype(np.float64) @ P[filled].T), axis=1)[:, :3]
    for grouped in (False, True):                 # 5 queries: too few for a grouped scan, searched plainly
        scores, ids = view.search(Q, 3, grouped=grouped)
        np.testing.assert_allclose(scores, truth, rtol=1e-5)
        assert np.isin(ids, filled).all()


def test_a_small_batch_of_a_grouped_search_is_searched_plainly(ivf):
    index = KnnIndex.load(ivf, device="cpu")
    X = index.vectors(index.row_ids[:3])
    plain, grouped = index.shards.search(X, 4), index.shards.search(X, 4, grouped=True)
    np.testing.assert_array_equal(plain[1], grouped[1])


def test_subsets_through_an_index_without_nprobe_are_searched_once(data, arrays, tmp_path):
    build(data, tmp_path / "sq8", IndexSettings(factory="SQ8"))
    index = KnnIndex.load(tmp_path / "sq8", device="cpu")
    layer = context.open_layer(index, store.ActivationDataset(data), 0, QuerySettings(k=2), leave_one_out=False)
    assert layer.approximate and index.recall_knob() is None
    patterns = distances.pattern_meta(layer)
    subset = subsets.subset(layer, patterns, distances.self_join(layer, patterns), 0.25)
    assert set(subset.recall) == {"queries", "depth", "recall_1_at_1"} and subset.recall["recall_1_at_1"] >= 0.9
    assert (subset.values >= brute_subset_nearest(arrays["P"], subset.row_ids) * (1 - 1e-6)).all()


@pytest.mark.parametrize("factory,shards", [("IVF16,Flat", 2), ("IVF16,SQ8", 1), ("IVF16,SQ8", 2), ("IVF16,PQ4x4", 1)])
def test_compressed_and_sharded_indexes_are_searched_for_inner_products_through_their_own_lists(
        data, arrays, tmp_path, factory, shards):
    """No second index: each shard's lists decoded and scanned. Probing every list, a compressed index finds the
    true largest products among its candidates (SQ8) or a recall its tuning measures exactly as brute force does;
    a maximum found is never above the true one."""
    build(data, tmp_path / "index", IndexSettings(factory=factory, nprobe=4, shards=shards))
    index = KnnIndex.load(tmp_path / "index", device="cpu")
    P, Q = arrays["P"], arrays["Q"][:60].astype(np.float32)
    searcher = mips.MipsIndex.over_lists(index.shards, index.vectors, float((P * P).sum(1).max()), index.factory)
    assert searcher is not None and not searcher.augmented and searcher.shards.ntotal == TRAIN
    assert [faiss.downcast_index(view.index).invlists.this for view in searcher.shards.members] == [
        faiss.downcast_index(shard.index).invlists.this for shard in index.shards.members]   # shared, not copied
    truth = -np.sort(-(Q.astype(np.float64) @ P.T), axis=1)[:, :K]
    searcher.set_parameter("nprobe", 16)
    found = searcher.search(Q, K)
    assert (found.ip <= truth[:, :1] + 1e-9).all()
    if "PQ" not in factory:
        np.testing.assert_allclose(found.ip, truth, rtol=1e-12)
    blocks = dataset_blocks(store.ActivationDataset(data), "train", 0, 500)
    sample = searcher.sample(size=300, seed=1)
    tuned = searcher.tune({"patterns": sample}, _truths({"patterns": sample}, blocks), target=0.9)
    gram = P @ P.T
    np.fill_diagonal(gram, -np.inf)
    position = np.searchsorted(searcher.shards.row_ids, sample.ids)
    brute = gram.max(1)[position]
    again = searcher.search(sample.X, 1, sample.ids).ip[:, 0]
    assert tuned["samples"]["patterns"]["recall_1_at_1"] == pytest.approx(np.mean(np.isclose(again, brute,
                                                                                            rtol=1e-9)))
    row_ids, best = searcher.max_other(blocks)     # a grouped scan: each list decoded once for a block
    assert (best <= gram.max(1) * (1 + 1e-12) + 1e-12).all()
    if "PQ" not in factory:                        # every list probed: the exact maxima, residual codes included
        searcher.set_parameter("nprobe", 16)
        np.testing.assert_allclose(searcher.max_other(blocks)[1], gram.max(1), rtol=1e-12)


def test_an_index_without_lists_gets_an_inner_product_index_of_its_own(data, tmp_path):
    build(data, tmp_path / "hnsw", IndexSettings(factory="HNSW16"))
    index = KnnIndex.load(tmp_path / "hnsw", device="cpu")
    assert mips.MipsIndex.over_lists(index.shards, index.vectors, 1.0, index.factory) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning, "auto_factory", lambda *args, **kwargs: ("IVF16,Flat", "a test's IVF"))
        layer = context.open_layer(index, store.ActivationDataset(data), 0, QuerySettings(k=K), leave_one_out=False)
        found, _ = separation.mips_samples(layer, distances.pattern_meta(layer))
    assert found.augmented and found.reason == "a test's IVF"


# ---------------------------------------------------------------- approximate and exact runs agree


def test_exact_run_keeps_every_exact_statistic(runs, arrays):
    """--exact: MCHN over all patterns (as theory.mchn_energy on the full arrays), Delta from an exact join."""
    P, Q, qp, pp = arrays["P"], arrays["Q"], arrays["qp"], arrays["pp"]
    tables = runs["exact"]
    summary = layer_summary(tables)
    assert summary["search"] == "exact" and summary["A3"]["inner_products"] == {"search": "exact",
                                                                                 "recall_1_at_1": None}
    exact_mchn = theory.mchn_energy(Q, P, BETA)
    q = tables.queries
    np.testing.assert_allclose(q.mchn_energy, exact_mchn, rtol=1e-9)
    assert (q.mchn_energy_lower <= exact_mchn + 1e-9).all() and (exact_mchn <= q.mchn_energy_upper + 1e-9).all()
    assert summary["energy"]["mean_mchn_lower"] == pytest.approx(q.mchn_energy_lower.mean(), rel=1e-12)
    assert summary["energy"]["mean_mchn"] == pytest.approx(exact_mchn.mean(), rel=1e-9)
    gram = P @ P.T
    delta = np.diag(gram) - np.where(np.eye(TRAIN, dtype=bool), -np.inf, gram).max(1)
    np.testing.assert_allclose(tables.patterns.ramsauer_delta, delta, rtol=1e-6, atol=1e-6)
    np.fill_diagonal(pp, np.inf)
    np.testing.assert_allclose(tables.patterns.nearest_other_dist, np.sqrt(pp.min(1)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q.nearest_dist, np.sqrt(qp.min(1)), rtol=1e-6)


def test_approximate_and_exact_runs_agree_within_their_recall(runs, arrays):
    P, Q = arrays["P"], arrays["Q"]
    approx, exact_run = runs["approximate"], runs["exact"]
    summary = layer_summary(approx)
    recall = summary["recall"]["recall_1_at_1"]
    products = summary["A3"]["inner_products"]
    assert summary["search"].startswith("approximate: IVF16,Flat") and recall >= 0.9
    # norms spread by 4x: a pattern's own nearest lists rarely hold its largest product (test_deltas_maxima_...)
    assert products["search"].startswith("approximate: IVF16,Flat") and products["tuning"]["reached"]
    assert products["search"].startswith("approximate: IVF16,Flat (its own lists, inner product)")
    assert products["factory_reason"].startswith("the nearest-neighbour index's inverted lists")
    assert products["samples"]["patterns"]["queries"] == 200
    top_k = summary["energy"]["mchn_top_k_recall"]
    assert top_k == products["samples"]["queries"] and top_k["k"] == K and top_k["queries"] == 200
    slack = 0.05   # the recalls are measured on 200 of the 2,000 patterns

    for table, column in (("queries", "nearest_dist"), ("patterns", "nearest_other_dist")):
        a, e = getattr(approx, table)[column].to_numpy(), getattr(exact_run, table)[column].to_numpy()
        assert (a >= e * (1 - 1e-6)).all()                          # real neighbours: never nearer than the nearest
        assert np.isclose(a, e, rtol=1e-6).mean() >= recall - slack

    a, e = approx.patterns.ramsauer_delta.to_numpy(), exact_run.patterns.ramsauer_delta.to_numpy()
    assert (a >= e - 1e-6 * np.abs(e) - 1e-6).all()                # a maximum found is at most the true one
    assert np.isclose(a, e, rtol=1e-6, atol=1e-6).mean() >= products["recall_1_at_1"] - slack

    exact_mchn = theory.mchn_energy(Q, P, BETA)                     # the interval, through the inner-product index
    q = approx.queries
    assert q.mchn_energy.isna().all() and summary["energy"]["mean_mchn"] is None
    assert (exact_mchn <= q.mchn_energy_upper + 1e-9).all()         # certified whatever the index found
    complete = 1 - K * (1 - top_k["recall_k_at_k"])   # rows whose top k were all found: at least this many
    assert (q.mchn_energy_lower <= exact_mchn + 1e-9).mean() >= complete - slack
    exact_E = -np.logaddexp.reduce(-BETA * arrays["qp"], axis=1) / BETA
    assert (exact_E <= q.energy_upper + 1e-9).all()

    for key in ("retrieval_rate", "next_token_agreement"):
        assert summary["A1"][key] == pytest.approx(layer_summary(exact_run)["A1"][key], abs=1 - recall + slack)
    assert summary["A2"]["coverage_at_r_star"] == pytest.approx(
        layer_summary(exact_run)["A2"]["coverage_at_r_star"], abs=1 - recall + slack)


def exact_nearest_other(arrays: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Brute-force float64 distances (d, k) from every pattern to its k nearest OTHER patterns."""
    pp = arrays["pp"].copy()
    np.fill_diagonal(pp, np.inf)
    return np.sqrt(np.sort(pp, axis=1)[:, :k])


def brute_delta(P: np.ndarray) -> np.ndarray:
    gram = P @ P.T
    return np.diag(gram) - np.where(np.eye(len(P), dtype=bool), -np.inf, gram).max(1)


def test_a_flat_inner_product_index_is_exact(data, ivf, arrays, tmp_path):
    """Below tuning.FLAT_MAX patterns the inner-product index would be Flat, a scan of every pattern:
    Delta and E_mchn are then exact (an exact join costs as much) and labelled so, beside an IVF L2 index."""
    P, Q = arrays["P"], arrays["Q"]
    assert mips.choose_factory(TRAIN, 8, 2 * 10**9)[0] == "Flat"
    run(ivf, data, tmp_path / "run", QuerySettings(k=K, beta=BETA, subsets=(1.0,)))
    tables = memscan.load(tmp_path / "run")
    summary = layer_summary(tables)
    assert summary["search"].startswith("approximate: IVF16,Flat")                  # the L2 searches: the index
    assert summary["A3"]["inner_products"] == {"search": "exact", "recall_1_at_1": None}
    np.testing.assert_allclose(tables.patterns.ramsauer_delta, brute_delta(P), rtol=1e-6, atol=1e-6)
    exact_mchn = theory.mchn_energy(Q, P, BETA)
    np.testing.assert_allclose(tables.queries.mchn_energy, exact_mchn, rtol=1e-9)
    assert summary["energy"]["mean_mchn"] == pytest.approx(exact_mchn.mean(), rel=1e-9)
    assert summary["energy"]["mchn_top_k_recall"] is None
    assert summary["blocks"]["query_rows"] == query.block_sizes(2 * 10**9, 8, K, TRAIN, full_pass=True).query_rows


@pytest.mark.parametrize("kind", ["even", "clustered"])
def test_the_largest_nearest_other_distances_are_searched_again_exactly(kind, tmp_path):
    """An approximate s_i is never below the true one, so misses gather among the largest s_i, which
    dominate log Z: those are replaced by an exact search, and log Z moves down towards the exact one.

    Evenly spread points (misses reach the top) are searched blockwise; well-separated clusters through
    the few IVF lists that can hold a nearer point (memscan.knn.cells), with the same exact answer."""
    if kind == "even":
        X = np.random.default_rng(5).normal(size=(2100, 16)).astype(np.float32)
    else:
        X = clustered(2100, 16, 24, seed=5, spread=0.05)
    store.write_vectors(tmp_path / "data", X, ["train"] * 2000 + ["test"] * 100, model="synthetic", shard_rows=700)
    build(tmp_path / "data", tmp_path / "ivf", IndexSettings(factory="IVF32,Flat", nprobe=4, train_size=2000))
    index = KnnIndex.load(tmp_path / "ivf", device="cpu")
    data = store.ActivationDataset(tmp_path / "data")
    layer = context.open_layer(index, data, 0, QuerySettings(k=2), leave_one_out=False)
    patterns = distances.pattern_meta(layer)
    approx = distances.self_join(layer, patterns)

    def fresh() -> distances.SelfJoin:   # the verification replaces rows in place: each check gets its own copy
        return distances.SelfJoin(approx.D.copy(), approx.I.copy(), approx.s.copy(), approx.maxima)

    found = checks.checked(layer, patterns, fresh())
    joined, verified = found.joined, found.verified
    top = patterns.row_id[np.argsort(-approx.s)[:20]]
    through_lists = index.exact_within(index.vectors(top), 2, top, np.full(20, np.sqrt(approx.D[:, -1].max())))
    assert (through_lists is not None) == (kind == "clustered")

    P = X[:2000].astype(np.float64)
    pp = ((P[:, None] - P[None]) ** 2).sum(-1)
    np.fill_diagonal(pp, np.inf)
    truth = np.sqrt(np.sort(pp, axis=1)[:, :2])
    s_true, checked = truth[:, 0], verified.exact
    assert verified.largest == 20 and verified.largest_exact and checked.sum() >= verified.largest
    assert checked[np.argsort(-joined.s)[:verified.largest]].all()      # the largest s_i now are all exact
    np.testing.assert_allclose(np.sqrt(joined.D[checked]), truth[checked], rtol=1e-5)   # their whole lists
    np.testing.assert_allclose(joined.s[checked], s_true[checked], rtol=1e-5)
    assert np.array_equal(joined.s[~checked], approx.s[~checked])
    assert np.array_equal(joined.I[~checked], approx.I[~checked])
    assert (joined.s >= s_true * (1 - 1e-6)).all()
    missed = approx.s[checked] > s_true[checked] * (1 + 1e-5)
    assert verified.corrected == missed.sum()
    exact_log_z, before, after = (theory.log_partition(16, s / 2) for s in (s_true, approx.s, joined.s))
    assert exact_log_z <= after + 1e-9 <= before + 2e-9                  # closer, still an upper bound
    if kind == "even":
        assert missed.sum() > 0 and after < before
        assert verified.rounds == 1   # the first round's margin held every s_i that corrections let in
        with pytest.MonkeyPatch.context() as patch:   # without it, corrections bring them in round by round
            patch.setattr(largest, "VERIFY_MARGIN", 1.0)
            rerun = checks.checked(layer, patterns, fresh())
            again, round_by_round = rerun.joined, rerun.verified
        assert round_by_round.rounds > 1 and round_by_round.largest_exact
        top = np.argsort(-again.s)[:20]
        np.testing.assert_allclose(again.s[top], s_true[top], rtol=1e-5)
    exact_layer = context.open_layer(index, data, 0, QuerySettings(k=2, exact=True), leave_one_out=False)
    assert checks.checked(exact_layer, patterns, approx)[:2] == (approx, None)


def within(value: float, low: float, high: float) -> bool:
    """low <= value <= high up to float rounding (the exact and the verified s_i come from two exact searches)."""
    return low - 1e-9 * abs(low) <= value <= high + 1e-9 * abs(high)


def test_an_approximate_floor_and_delta_say_they_are_upper_bounds(runs, arrays):
    approx, exact_summary = layer_summary(runs["approximate"]), layer_summary(runs["exact"])
    exact_floor, floor = exact_summary["floor"], approx["floor"]
    assert exact_floor["approximate"] is None
    bounds = floor["approximate"]
    assert bounds["log_z"].startswith("upper bound") and bounds["largest"] == TRAIN // 100
    assert bounds["largest_exact"] and bounds["verified_exact"] >= bounds["largest"] and bounds["rounds"] >= 1
    assert bounds["log_z_interval"][1] == floor["log_z"]
    assert within(exact_floor["log_z"], *bounds["log_z_interval"])
    assert exact_floor["log_z"] == pytest.approx(theory.log_partition(8, exact_nearest_other(arrays, 1)[:, 0] / 2),
                                                 rel=1e-6)
    assert within(exact_floor["predicted_floor"], *bounds["predicted_floor_interval"])
    assert within(floor["predicted_floor"], *bounds["predicted_floor_interval"])
    products = approx["A3"]["inner_products"]
    assert products["bound"].startswith("upper") and f"{products['recall_1_at_1']:.3f}" in products["bound"]
    assert "bound" not in exact_summary["A3"]["inner_products"]
    delta = runs["approximate"].patterns.ramsauer_delta.to_numpy()
    truth = brute_delta(arrays["P"])
    assert (delta >= truth - 1e-6 * np.abs(truth) - 1e-6).all()        # the bound holds row by row


class CountingEngine(knn_engine.LocalEngine):
    """The local engine, counting the shards it opens and the exact searches it runs."""

    calls: list[str] = []

    def open_shards(self, *args, **kwargs):
        self.calls.append("open_shards")
        return super().open_shards(*args, **kwargs)


def test_the_engine_is_passed_in_and_never_built_from_ray_options(data, ivf, tmp_path):
    for function in (build, KnnIndex.load, run):
        assert "ray_options" not in inspect.signature(function).parameters
    assert not hasattr(knn_index, "engine_of")
    CountingEngine.calls.clear()
    run(ivf, data, tmp_path / "run", QuerySettings(k=K, subsets=(1.0,), exact=True), engine=CountingEngine())
    assert CountingEngine.calls == ["open_shards"]


# ---------------------------------------------------------------- subsets from the self-join's lists


def brute_subset_nearest(P: np.ndarray, members: np.ndarray) -> np.ndarray:
    sub = P[members]
    sq = ((sub[:, None] - sub[None]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    return np.sqrt(sq.min(1))


@pytest.mark.parametrize("exact_search", [True, False])
def test_subsets_equal_an_exact_subset_self_join(data, ivf, arrays, exact_search):
    settings = QuerySettings(k=2, exact=exact_search, subsets=(0.25, 0.5, 0.75, 1.0))
    index = KnnIndex.load(ivf, device="cpu")
    layer = context.open_layer(index, store.ActivationDataset(data), 0, settings, leave_one_out=False)
    patterns = distances.pattern_meta(layer)
    joined = distances.self_join(layer, patterns)
    P, lists_exact = arrays["P"], exact_search
    together = subsets.nearest_within(layer, patterns, joined, [0.25, 0.5, 0.75])   # sharing their passes
    for fraction, shared in zip((0.25, 0.5, 0.75), together):
        subset = subsets.subset(layer, patterns, joined, fraction)
        assert shared.fraction == fraction and shared.recall == subset.recall
        np.testing.assert_array_equal(shared.values, subset.values)
        assert len(subset.row_ids) == int(fraction * TRAIN) and 0 < subset.from_lists < len(subset.row_ids)
        truth = brute_subset_nearest(P, subset.row_ids)
        if lists_exact:   # every member, from the lists or searched, is its exact nearest within the subset
            np.testing.assert_allclose(subset.values, truth, rtol=1e-6, atol=1e-6)
        else:             # the lists are approximate: real members, never nearer, mostly the nearest
            assert (subset.values >= truth * (1 - 1e-6)).all()
            assert np.isclose(subset.values, truth, rtol=1e-6).mean() >= 0.9
        listed = np.isin(joined.I[subset.row_ids], subset.row_ids).any(axis=1)
        assert listed.sum() == subset.from_lists
        searched = ~listed   # those the lists missed: exactly against the subset, or deeper through the index
        found_nearest = np.isclose(subset.values[searched], truth[searched], rtol=1e-6, atol=1e-6)
        if exact_search:
            assert found_nearest.all() and subset.recall is None
        else:
            recall = subset.recall   # nprobe raised from the index's until the sample reaches its target
            assert recall["depth"] == query.rest_depth(fraction, TRAIN)
            assert recall["queries"] == min(query.RECALL_QUERIES, searched.sum())
            assert recall["nprobe"] >= 4 and recall["curve"]["nprobe"][0] == 4 and recall["recall_1_at_1"] >= 0.95
            assert index.info["search"]["nprobe"] == 4   # the index's own value is back
            if recall["queries"] == searched.sum():   # the sample is every searched member
                assert recall["recall_1_at_1"] == pytest.approx(found_nearest.mean())
            assert found_nearest.mean() >= 0.9


def test_a_subset_search_raises_nprobe_until_its_sample_reaches_the_target(data, arrays, tmp_path):
    """At nprobe 1 a 32-list index misses the deeper neighbours the subsets' rest needs: the search
    takes the smallest larger nprobe whose sample reaches 0.95, and says so."""
    build(data, tmp_path / "ivf", IndexSettings(factory="IVF32,Flat", nprobe=1))
    index = KnnIndex.load(tmp_path / "ivf", device="cpu")
    layer = context.open_layer(index, store.ActivationDataset(data), 0, QuerySettings(k=2), leave_one_out=False)
    patterns = distances.pattern_meta(layer)
    joined = distances.self_join(layer, patterns)
    for fraction in (0.25, 0.5, 0.75):
        subset = subsets.subset(layer, patterns, joined, fraction)
        curve = subset.recall["curve"]
        assert curve["nprobe"][0] == 1 and curve["recall"][0] < 0.95 <= subset.recall["recall_1_at_1"]
        assert subset.recall["nprobe"] == next(value for value, recall in zip(curve["nprobe"], curve["recall"])
                                               if recall >= 0.95)
        truth = brute_subset_nearest(arrays["P"], subset.row_ids)
        assert (subset.values >= truth * (1 - 1e-6)).all()
    assert index.info["search"]["nprobe"] == 1


def test_a_subset_search_goes_deep_enough_to_find_a_member():
    assert query.rest_depth(0.25, 10**6) == 33 and 0.75 ** 33 <= query.SUBSET_MISS < 0.75 ** 32
    assert query.rest_depth(0.5, 10**6) == 14 and query.rest_depth(0.01, 500) == 499


def test_the_summary_records_the_subsets_and_the_blocks(runs):
    summary = layer_summary(runs["exact"])
    entry, = summary["subsets"]
    assert entry["fraction"] == 0.25 and entry["patterns"] == TRAIN // 4
    assert entry["from_lists"] + entry["searched"] == entry["patterns"] and entry["searched"] > 0
    hist = runs["exact"].histograms
    assert hist[hist.table == "pattern_nearest_25"]["count"].sum() == TRAIN // 4
    blocks = summary["blocks"]
    assert blocks["memory"] == "2GB" and blocks["memory_bytes"] == 2 * 10**9 and blocks["query_blocks"] == 1
    expected = query.block_sizes(2 * 10**9, 8, K, TRAIN, full_pass=True)
    assert (blocks["pattern_rows"], blocks["query_rows"], blocks["join_rows"]) == (
        expected.pattern_rows, expected.query_rows, expected.join_rows)


# ---------------------------------------------------------------- streamed in blocks


@pytest.mark.parametrize("mode", ["approximate", "exact"])
def test_streamed_tables_equal_the_unblocked_ones(runs, mode):
    large, small = runs[mode], runs[f"{mode}_small"]
    assert layer_summary(large)["blocks"]["query_blocks"] == 1 and layer_summary(small)["blocks"]["query_blocks"] > 1
    assert layer_summary(small)["blocks"]["query_rows"] < TEST
    for name in query.TABLES:
        pd.testing.assert_frame_equal(getattr(large, name), getattr(small, name))
    a, b = layer_summary(large), layer_summary(small)
    for key in ("A1", "A2", "A3", "energy", "floor", "query_nearest_dist", "pattern_nearest_dist", "subsets"):
        assert_same(a[key], b[key])


def assert_same(a: object, b: object) -> None:
    """Equal JSON documents, floats to 1e-12 (the means are sums over blocks, rounded in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12)
    else:
        assert a == b


def test_block_sizes_follow_the_budget():
    small, large = (query.block_sizes(budget, 256, 10, 10**6, full_pass=False) for budget in (64 << 20, 2 << 30))
    assert small.query_rows < large.query_rows and small.join_rows < large.join_rows
    assert large.pattern_rows <= query.MAX_BLOCK_ROWS and small.query_rows >= 1
    gather = small.query_rows * 10 * 256 * 4 * 6   # retrieval: float32 neighbours and float64 copies
    assert gather <= 64 << 20
    exact_blocks = query.block_sizes(64 << 20, 256, 10, 10**6, full_pass=True)
    assert exact_blocks.query_rows < small.query_rows   # the MCHN pass's products take their share
    # compressed codes re-rank k_factor (k + 1) candidates (16 x 11): the blocks shrink to hold them
    compressed = query.block_sizes(64 << 20, 256, 10, 10**6, full_pass=False, candidates=176)
    assert compressed.join_rows * 176 * 8 * 256 <= 32 << 20 < (compressed.join_rows + 1) * 176 * 8 * 256
    assert compressed.query_rows * 8 * 256 * (30 + 8 + 165) <= 32 << 20


@pytest.mark.parametrize("given,expected", [("512MB", 512 * 10**6), ("2GiB", 2 << 30), ("1.5G", 1.5e9),
                                            ("1MiB", 1 << 20)])
def test_memory_sizes_are_parsed(given, expected):
    assert query.memory_bytes(given) == int(expected)
    QuerySettings(memory=given).check()


@pytest.mark.parametrize("given,match", [("100KB", "--memory must be at least 1MiB; got '100KB'"),
                                         ("lots", "--memory must be a size like 512MB"),
                                         ("0", "--memory must be a size like 512MB")])
def test_a_memory_budget_out_of_range_names_the_flag(capsys, data, ivf, tmp_path, given, match):
    with pytest.raises(InputError, match=match):
        QuerySettings(memory=given).check()
    with pytest.raises(SystemExit) as exit_info:
        main(["query", str(ivf), "--queries", str(data), "--out", str(tmp_path / "run"), "--memory", given])
    assert exit_info.value.code == 1 and match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class Killed(BaseException):
    """What a kill or a full disk does to the job: it stops where it is."""


def test_a_run_that_dies_mid_analysis_leaves_the_previous_run_whole(data, ivf, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run(ivf, data, run_dir, QuerySettings(k=K, subsets=(1.0,), memory="1MiB"))
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    calls = []

    def dies_on_the_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed()
        return retrieval(*args, **kwargs)

    retrieval = query_retrieval.retrieval
    monkeypatch.setattr(query_retrieval, "retrieval", dies_on_the_second_block)
    with pytest.raises(Killed):
        run(ivf, data, run_dir, QuerySettings(k=K + 1, subsets=(1.0,), memory="1MiB"), overwrite=True)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before   # no temporary file left
    assert query.verify(run_dir) == [] and memscan.load(run_dir).summary["settings"]["k"] == K


def test_deltas_maxima_come_from_the_self_joins_own_scan_where_its_lists_hold_them(tmp_path):
    """Norms alike (clusters of one scale): a pattern's largest product is with a near neighbour, in the lists the
    self-join scans anyway. On the sample the scan's maxima reach the target, so Delta takes them (no second
    search), the inner-product index is tuned on the queries alone, and where the scan found the maximum Delta
    equals brute force; elsewhere it is an upper bound. When they fall short (norms spread: the run fixture's
    data, test_approximate_and_exact_runs_agree_...) the inner-product index searches its own lists."""
    X = clustered(2300, 16, 16, seed=3, spread=0.2).astype(np.float32)
    store.write_vectors(tmp_path / "data", X, ["train"] * 2000 + ["test"] * 300, model="synthetic", shard_rows=700)
    build(tmp_path / "data", tmp_path / "ivf", IndexSettings(factory="IVF16,Flat", nprobe=2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning, "auto_factory", lambda *args, **kwargs: ("IVF16,Flat", "a test's IVF"))
        run(tmp_path / "ivf", tmp_path / "data", tmp_path / "run", QuerySettings(k=3, subsets=(1.0,)))
    loaded = memscan.load(tmp_path / "run")
    summary = layer_summary(loaded)
    products = summary["A3"]["inner_products"]
    assert products["search"] == "approximate: the self-join's own lists (IVF16,Flat {'nprobe': 2})"
    assert products["tuning"] is None and list(products["samples"]) == ["patterns"]
    assert products["recall_1_at_1"] >= products["target_recall"] == 0.95
    assert summary["energy"]["mchn_top_k_recall"]["queries"] == 200    # the index serves the queries' top k
    P = X[:2000].astype(np.float64)
    gram = P @ P.T
    delta = np.diag(gram) - np.where(np.eye(2000, dtype=bool), -np.inf, gram).max(1)
    found = loaded.patterns.ramsauer_delta.to_numpy()
    assert (found >= delta - 1e-6 * np.abs(delta) - 1e-6).all()
    assert np.isclose(found, delta, rtol=1e-6, atol=1e-6).mean() >= products["recall_1_at_1"] - 0.05


def test_one_scan_gives_the_nearest_and_the_largest_products_of_the_probed_lists():
    """Shard.search_with_products: the k nearest equal the shard's own search, and the largest products are
    those of brute force over exactly the lists each query probes (one matrix product gave both)."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(3000, 16)) * rng.uniform(0.5, 2, (3000, 1))).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 20)
    ivf.train(X)
    ivf.add(X)
    shard = Shard(ivf, np.arange(3000) * 2, {"nprobe": 3})
    both = shard.search_with_products(X[:300], 6, 10)
    D, I = shard.search(X[:300], 6)
    assert np.array_equal(both.I, I) and np.allclose(both.D, D, rtol=1e-4, atol=1e-3)
    _, lists = ivf.quantizer.search(X[:300], 3)
    for row, probed in enumerate(lists):
        members = np.flatnonzero(np.isin(ivf.quantizer.search(X, 1)[1][:, 0], probed))
        products = X[members].astype(np.float64) @ X[row].astype(np.float64)
        np.testing.assert_allclose(both.P[row], -np.sort(-products)[:10], rtol=1e-5)
        assert set(both.J[row]) == set(2 * members[np.argsort(-products)[:10]])
    hnsw = Shard(faiss.IndexHNSWFlat(16, 8), np.arange(0), {})
    assert hnsw.search_with_products(X[:5], 3, 4) is None     # only an IVF-Flat's lists hold the vectors


def test_the_self_join_scans_each_list_whole_and_matches_brute_force_over_it():
    """Shard.self_join_scans at nprobe 1: every stored vector once, searched over the list it was added to, its
    k nearest and largest products those of brute force (float64) over that list. The patterns sit far from the
    origin (||x||^2 ~ 1e5, neighbours ~ 1 apart), where float32's x.x + y.y - 2 x.y would misorder them: the
    scan's products of residuals from the list's mean must not. At nprobe 2 it equals the shard's own scan."""
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(2000, 16)) + 80).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 12)
    ivf.train(X)
    ivf.add(X)
    shard = Shard(ivf, np.arange(2000) * 2, {"nprobe": 1})
    blocks = list(shard.self_join_scans(6, 10, block_rows=500))
    rows = np.concatenate([rows for rows, _, _ in blocks])
    assert np.array_equal(np.sort(rows), np.arange(2000) * 2) and len(blocks) < 12   # whole lists, some together
    own_list = np.empty(2000, np.int64)
    for number in range(ivf.nlist):
        own_list[get_invlist(ivf.invlists, number)[0]] = number
    for block_rows, block_X, found in blocks:
        assert np.array_equal(block_X, X[block_rows // 2])
        for row, D, I, P in zip(block_rows // 2, found.D, found.I, found.P):
            members = np.flatnonzero(own_list == own_list[row])
            distances = ((X[members].astype(np.float64) - X[row]) ** 2).sum(1)
            products = X[members].astype(np.float64) @ X[row].astype(np.float64)
            assert set(I) == set(2 * members[np.argsort(distances)[:6]])
            np.testing.assert_allclose(D, np.sort(distances)[:6], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(P, -np.sort(-products)[:10], rtol=1e-6)
    shard.set_parameter("nprobe", 2)
    for block_rows, block_X, found in shard.self_join_scans(6, 10, block_rows=500):
        assert np.array_equal(found.I, shard.search_with_products(block_X, 6, 10).I)


def test_an_indexs_own_patterns_are_read_from_its_codes_as_the_dataset_holds_them(data, ivf, tmp_path):
    """KnnIndex.pattern_blocks: an IVF-Flat's codes give the same blocks, bytes and row order, as the dataset;
    an index whose codes are not the vectors (SQ8) reads the dataset."""
    flat, blocks = KnnIndex.load(ivf), dataset_blocks(store.ActivationDataset(data), "train", 0, 700)
    expected = list(blocks())
    build(data, tmp_path / "sq8", IndexSettings(factory="IVF16,SQ8", nprobe=4))
    for index in (flat, KnnIndex.load(tmp_path / "sq8")):
        found = list(index.pattern_blocks(700)())
        assert len(found) == len(expected)
        for (rows, X), (want_rows, want_X) in zip(found, expected):
            assert np.array_equal(rows, want_rows) and np.array_equal(X, want_X) and X.dtype == np.float32
