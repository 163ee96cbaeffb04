"""FAISS indexes over datasets: auto choice, recall, exact distances, save/load, provenance, bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import clustered

from memscan import store
from memscan.cli import main
from memscan.errors import MemscanError
from memscan.knn import exact
from memscan.knn.index import IndexSettings, KnnIndex, build


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """55,000 train + 500 test vectors of n=16 in 600 clusters: enough for auto to pick IVF."""
    X = clustered(55_500, 16, 600, seed=0)
    directory = tmp_path_factory.mktemp("big") / "data"
    store.write_vectors(directory, X, ["train"] * 55_000 + ["test"] * 500, model="synthetic", shard_rows=20_000)
    return directory


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    X = clustered(3_000, 8, 40, seed=1)
    X[100:110] = X[200:210]  # exact duplicates
    directory = tmp_path_factory.mktemp("small") / "data"
    store.write_vectors(directory, X, ["train"] * 2_600 + ["test"] * 400, model="synthetic", shard_rows=700)
    return directory


def vectors(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = list(store.ActivationDataset(directory).iter_batches(split=split))
    return np.concatenate([b[1]["row_id"] for b in blocks]), np.concatenate([b[0] for b in blocks])


def test_auto_picks_ivf_and_reaches_high_recall(big, tmp_path):
    info = build(big, tmp_path / "ivf", IndexSettings(eval_recall=300))
    assert info["factory"] == "IVF256,Flat" and "power of 2 near count / 256" in info["factory_reason"]
    assert info["build"]["train_size"] == 64 * 256   # 64 per list: k-means cost capped
    tuned = info["tuning"]
    assert [sweep["parameter"] for sweep in tuned["sweeps"]] == ["nprobe"] and tuned["reached"]
    assert info["search"] == tuned["chosen"] == {"nprobe": tuned["sweeps"][0]["chosen"]}
    assert info["recall"]["recall_1_at_1"] >= 0.95 and info["recall"]["recall_k_at_k"] >= 0.9


def test_hnsw_reaches_high_recall(big, tmp_path):
    info = build(big, tmp_path / "hnsw", IndexSettings(factory="HNSW32", eval_recall=300))
    assert info["search"] == info["tuning"]["chosen"] and list(info["search"]) == ["efSearch"]
    assert info["recall"]["recall_1_at_1"] >= 0.95


def test_flat_index_self_join_and_queries_are_exact(small, tmp_path):
    info = build(small, tmp_path / "flat")
    assert info["factory"] == "Flat" and info["ntotal"] == 2_600
    index = KnnIndex.load(tmp_path / "flat")
    ids, X = vectors(small, "train")
    expected_ids, D_exact, I_exact = exact.self_join(exact.array_blocks(ids, X, 1000), 5)
    row_ids, D, I = index.self_join(5, batch_rows=999)
    assert np.array_equal(row_ids, expected_ids)
    np.testing.assert_allclose(D, D_exact, rtol=1e-6, atol=1e-6)
    assert (I == I_exact).mean() > 0.99  # ids may differ only among exact ties
    assert (D[100:110, 0] == 0).all()

    qids, Q = vectors(small, "test")
    query_ids, Dq, Iq = index.search_dataset(small, 4, split="test")
    assert np.array_equal(query_ids, qids)
    true = ((Q[:, None, :].astype(np.float64) - X[Iq].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(Dq, true, rtol=1e-6)


def test_approximate_self_join_recomputes_exact_distances(big, tmp_path):
    build(big, tmp_path / "ivf", IndexSettings(factory="IVF256,Flat", nprobe=16))
    index = KnnIndex.load(tmp_path / "ivf")
    row_ids, D, I = index.self_join(3)
    assert len(row_ids) == 55_000 and not (I == row_ids[:, None]).any()
    sample = np.random.default_rng(0).choice(55_000, 200, replace=False)
    data = store.ActivationDataset(big)
    X, Y = data.take(row_ids[sample]), data.take(I[sample].ravel()).reshape(200, 3, -1)
    true = ((X[:, None, :].astype(np.float64) - Y) ** 2).sum(-1)
    np.testing.assert_allclose(D[sample], true, rtol=1e-6)
    assert (np.diff(D, axis=1) >= 0).all()


def test_save_and_load_give_the_same_results_and_provenance(small, tmp_path):
    info = build(small, tmp_path / "ivf", IndexSettings(factory="IVF16,Flat", nprobe=4, train_size=700, seed=3))
    on_disk = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert on_disk == info
    assert on_disk["dataset"]["manifest_sha256"] == store.sha256_of(small / store.MANIFEST)
    assert on_disk["build"]["train_size"] == 700 and on_disk["device"] == "cpu"
    assert on_disk["n"] == 8 and on_disk["ntotal"] == 2_600 and on_disk["metric"] == "l2"
    _, Q = vectors(small, "test")
    first = KnnIndex.load(tmp_path / "ivf").search(Q, 6)
    second = KnnIndex.load(tmp_path / "ivf").search(Q, 6)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_exact_entry_points_and_pq_distances_are_exact(small, tmp_path):
    build(small, tmp_path / "pq", IndexSettings(factory="IVF16,PQ4", nprobe=16, train_size=2_600))
    index = KnnIndex.load(tmp_path / "pq")
    ids, X = vectors(small, "train")
    _, D_exact, I_exact = exact.self_join(exact.array_blocks(ids, X, 500), 4)
    row_ids, D, I = index.exact_self_join(4, block_rows=777)
    assert np.array_equal(row_ids, ids)
    np.testing.assert_allclose(D, D_exact, rtol=1e-6, atol=1e-6)
    _, Dq, Iq = index.search_dataset(small, 4)                # approximate (PQ) candidates ...
    qids, Q = vectors(small, "test")
    true = ((Q[:, None, :].astype(np.float64) - X[Iq].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(Dq, true, rtol=1e-6)           # ... with exact distances
    _, De, _ = index.exact_search_dataset(small, 4)
    assert (De <= Dq + 1e-6).all() and (De[:, 0] == Dq[:, 0]).mean() > 0.5


def test_an_existing_index_is_kept_unless_overwrite(small, tmp_path):
    build(small, tmp_path / "idx")
    with pytest.raises(MemscanError, match="already holds an index"):
        build(small, tmp_path / "idx", IndexSettings(factory="HNSW16"))
    info = build(small, tmp_path / "idx", IndexSettings(factory="HNSW16"), overwrite=True)
    assert info["factory"] == "HNSW16"
    build_id = info["shards"][0]["index"]["name"].split(".")[1]   # beside the old files, never over them
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        ".memscan.lock", f"index.{build_id}.faiss", "index.json", f"row_ids.{build_id}.npy"]
    assert build(small, tmp_path / "idx", overwrite=True)["shards"][0]["index"]["name"] == "index.faiss"
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        ".memscan.lock", "index.faiss", "index.json", "row_ids.npy"]


def test_a_sharded_index_answers_as_one_index(small, tmp_path):
    settings = IndexSettings(factory="IVF16,Flat", nprobe=3, train_size=700, seed=3, eval_recall=100)
    whole = build(small, tmp_path / "whole", settings)
    sharded = build(small, tmp_path / "sharded", replace(settings, shards=3))
    assert [entry["index"]["name"] for entry in sharded["shards"]] == [
        "shard-000.faiss", "shard-001.faiss", "shard-002.faiss"]
    assert sum(entry["ntotal"] for entry in sharded["shards"]) == sharded["ntotal"] == 2_600
    assert [entry["ntotal"] for entry in sharded["shards"]] == [867, 866, 867]   # the split's rows, in thirds
    assert sharded["recall"] == whole["recall"]
    one, three = KnnIndex.load(tmp_path / "whole"), KnnIndex.load(tmp_path / "sharded")
    assert np.array_equal(one.row_ids, three.row_ids)
    _, Q = vectors(small, "test")
    for a, b in zip(one.search(Q, 6), three.search(Q, 6)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(one.self_join(4, batch_rows=500), three.self_join(4, batch_rows=500)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "sharded" / "mine.faiss").write_text("a user's file")
    with pytest.raises(MemscanError, match=r"holds files memscan did not write \(mine.faiss\)"):
        build(small, tmp_path / "sharded", settings, overwrite=True)
    build(small, tmp_path / "sharded", settings, overwrite=True, allow_other_files=True)   # fewer shards
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        ".memscan.lock", "index.faiss", "index.json", "mine.faiss", "row_ids.npy"]   # no stale shard files stay
    test_only = build(small, tmp_path / "test_split", IndexSettings(split="test", shards=2))   # rows 2600-2999
    assert [entry["ntotal"] for entry in test_only["shards"]] == [200, 200]
    with pytest.raises(MemscanError, match="--shards 401 is more than the 400 vectors of split 'test'"):
        build(small, tmp_path / "too_many", IndexSettings(split="test", shards=401))
    assert not (tmp_path / "too_many").exists()


def test_an_index_of_format_version_1_is_refused_with_a_rebuild_hint(small, tmp_path):
    build(small, tmp_path / "idx")
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    info["format_version"] = 1   # indexes before checksums: nothing they hold can be checked
    del info["self_sha256"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(info))
    with pytest.raises(MemscanError, match="has format version 1; this memscan reads version 2.*--overwrite"):
        KnnIndex.load(tmp_path / "idx")


def test_take_reads_rows_in_the_order_asked(small):
    data = store.ActivationDataset(small)
    ids, X = vectors(small, None)
    wanted = np.array([2999, 0, 700, 699, 1401, 5, 5])
    np.testing.assert_array_equal(data.take(wanted), X[wanted])


def fails(capsys, *args: str, match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert match in err.strip().splitlines()[-1], err


def test_index_command_and_bad_input(capsys, small, big, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(small), "--out", str(tmp_path / "ok"), "--eval-recall", "50"])
    assert exit_info.value.code == 0 and "1-recall@1 1.000" in capsys.readouterr().out
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--split", "gen", match="has no rows")
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--shards", "0", match="--shards must be at least 1")
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--address", "auto", match="--address auto needs --engine ray")
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--engine", "ray", "--num-workers", "0",
          match="must be at least 1")
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--layer", "3", match="--layer 3 is not in")
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--factory", "IVFbogus",
          match="not a FAISS factory string")
    fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--factory", "IVF4096,Flat",
          match="needs at least 159,744 training vectors")
    import torch

    if not torch.cuda.is_available():
        fails(capsys, "index", str(small), "--out", str(tmp_path / "x"), "--device", "gpu", match="--device gpu")

    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    (broken / "vectors" / "part-00001.parquet").write_bytes(b"garbage")
    fails(capsys, "index", str(broken), "--out", str(tmp_path / "x"), match="fails verification")

    nan = tmp_path / "nan"
    X = clustered(100, 8, 4, seed=2)
    X[17, 3] = np.nan
    store.write_vectors(nan, X, ["train"] * 100)
    fails(capsys, "index", str(nan), "--out", str(tmp_path / "x"), match="hold NaN or Inf")


def test_queries_must_match_the_index(small, big, tmp_path):
    build(small, tmp_path / "idx")
    index = KnnIndex.load(tmp_path / "idx")
    with pytest.raises(MemscanError, match="dimension 16"):
        index.search_dataset(big, 3)
    other = tmp_path / "other_model"
    store.write_vectors(other, clustered(50, 8, 3, seed=4), ["test"] * 50, model="another-model")
    with pytest.raises(MemscanError, match="another-model"):
        index.search_dataset(other, 3)
    other_layer = tmp_path / "other_layer"
    store.write_vectors(other_layer, clustered(50, 8, 3, seed=4), ["test"] * 50, model="synthetic", layer=5)
    with pytest.raises(MemscanError, match="layer"):
        index.search_dataset(other_layer, 3)
    with pytest.raises(MemscanError, match="between 1 and the 2,600"):
        index.search(clustered(2, 8, 1, seed=5), 2_601)
    with pytest.raises(MemscanError, match="no rows to query"):
        index.search_dataset(small, 3, split="gen")
    with pytest.raises(MemscanError, match="--nprobe must be at least 1"):
        index.set_search_params(nprobe=0)
