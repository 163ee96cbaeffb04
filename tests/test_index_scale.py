"""The index at scale (issue 12): a memory budget picks compressed codes, a recall target picks nprobe/efSearch,
the engine is passed in (knn never imports engines)."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import clustered

import memscan
from memscan import store
from memscan.cli import main
from memscan.engines import knn as knn_engine
from memscan.errors import InputError
from memscan.knn import tuning
from memscan.knn.index import IndexSettings, KnnIndex, auto_factory, build


def brute_force(Q: np.ndarray, X: np.ndarray, k: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """numpy float64 squared distances (nq, k) and ids of the k nearest rows of X, a query's own row left out."""
    Q64, X64 = Q.astype(np.float64), X.astype(np.float64)
    D = np.maximum((Q64**2).sum(1)[:, None] + (X64**2).sum(1)[None] - 2 * Q64 @ X64.T, 0.0)   # (nq, m), float64
    if own is not None:
        D[np.arange(len(Q)), own] = np.inf
    I = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, I, axis=1), I


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """51,200 train + 200 test vectors of n=32 in 300 clusters, 100 exact duplicates: above FLAT_MAX, so IVF."""
    X = clustered(51_400, 32, 300, seed=0, spread=0.3)
    X[1000:1100] = X[2000:2100]
    directory = tmp_path_factory.mktemp("wide") / "data"
    store.write_vectors(directory, X, ["train"] * 51_200 + ["test"] * 200, model="synthetic", shard_rows=20_000)
    return directory


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> tuple[Path, np.ndarray]:
    X = clustered(12_000, 16, 150, seed=1, spread=1.0)   # overlapping clusters: nprobe 1 is not enough
    X[10:30] = X[40:60]   # exact duplicates: a twin at distance 0 is as good as the pattern's own nearest
    directory = tmp_path_factory.mktemp("medium") / "data"
    store.write_vectors(directory, X, ["train"] * 12_000, model="synthetic", shard_rows=5_000)
    return directory, X


# ---------------------------------------------------------------- the memory budget


def test_memory_sizes_parse_in_decimal_and_binary_units():
    assert [tuning.parse_memory(text) for text in ("2GB", "512MB", "2GiB", "1.5G", "4000000", " 3 gb", "64KiB")] == [
        2_000_000_000, 512_000_000, 2 * 2**30, 1_500_000_000, 4_000_000, 3_000_000_000, 64 * 1024]
    for bad in ("two", "0MB", "-1GB", "5XB", ""):
        with pytest.raises(InputError, match="--memory must be a size like 512MB, 2GiB or 1.5G"):
            tuning.parse_memory(bad)


def test_auto_factory_compresses_only_what_the_budget_cannot_hold():
    gb = tuning.parse_memory("1GB")
    # a million 256-wide vectors: 1.02 GB of float32 (+16 MB of ids) fit 2 GB; SQ8 fits 0.5 GB; PQ64 (n/4) 0.1 GB
    assert auto_factory(1_000_000, 256, 2 * gb)[0] == "IVF4096,Flat"
    factory, reason = auto_factory(1_000_000, 256, gb // 2)
    assert factory == "IVF4096,SQ8" and "1.04 GB" in reason and "exceed --memory 0.5 GB" in reason
    assert auto_factory(1_000_000, 256, gb // 10)[0].endswith(",PQ64")
    # the largest m (n % m == 0, m <= n/4) whose codes and 16 bytes of ids fit: 20M x (32 + 16) B = 0.96 GB
    assert auto_factory(20_000_000, 256, gb)[0].endswith(",PQ32")
    assert auto_factory(10_000_000, 1024, 3 * gb // 2)[0].endswith(",PQ128")   # 10M x 144 B = 1.44 GB
    assert auto_factory(10_000_000, 1024, 3 * gb // 2, gpu=True)[0].endswith(",PQ64")   # faiss-gpu takes no m=128
    with pytest.raises(InputError, match=r"--memory 0.01 GB cannot hold an index of 20,000,000 vectors.*raise"):
        auto_factory(20_000_000, 256, gb // 100)
    assert auto_factory(1_000_000) == auto_factory(1_000_000, None, None)   # the one-argument form: float32 codes
    assert auto_factory(40_000, 64, 2 * gb)[0] == "Flat" and auto_factory(40_000, 64, 1_000_000)[0] == "PQ8"


def test_ivf_lists_keep_training_and_list_scans_bounded():
    for count, n in ((100_000, 256), (1_000_000, 256), (20_000_000, 1024)):
        lists, _ = tuning.nlist_for(count, n)
        flops = 2 * tuning.KMEANS_ITERATIONS * tuning.TRAIN_PER_LIST * lists * lists * n
        assert flops <= tuning.TRAIN_FLOPS[False] and count / lists >= tuning.MIN_TRAIN_PER_LIST
    assert tuning.nlist_for(100_000, 256)[0] == 512 and tuning.nlist_for(1_000_000, 256)[0] == 4096
    assert tuning.nlist_for(300_000, 256)[0] == 1024                 # ~256 vectors a list at every d
    assert tuning.train_rows(4096, 256, None) == 64 * 4096           # not 256 per list: 4x less k-means
    assert tuning.train_rows(4096, 256, 400_000_000) == 195_312      # half the budget as float32 rows
    assert tuning.train_rows(4096, 256, 1_000_000) == 39 * 4096      # never under FAISS's 39 per list


@pytest.mark.parametrize("memory,codes", [("3MB", "SQ8"), ("2MB", "PQ8")])
def test_a_compressed_index_still_returns_exact_distances(wide, tmp_path, memory, codes):
    info = build(wide, tmp_path / "index", IndexSettings(memory=memory))
    assert info["factory"].startswith("IVF") and info["factory"].endswith(f",{codes}")
    assert f"exceed --memory {tuning.parse_memory(memory) / 1e9:.3g} GB" in info["factory_reason"]
    index = KnnIndex.load(tmp_path / "index")
    data = store.ActivationDataset(wide)
    X, Q = data.take(np.arange(51_200)), data.take(np.arange(51_200, 51_400))
    D, I = index.search(Q, 5)
    true_D, _ = brute_force(Q, X, 5)
    chosen = ((Q[:, None, :].astype(np.float64) - X[I].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(D, chosen, rtol=1e-5, atol=1e-6)               # every distance exact, re-ranked
    assert (D[:, 0] <= true_D[:, 0] * (1 + 1e-5) + 1e-6).mean() >= 0.85         # mostly the true nearest
    own = np.random.default_rng(9).choice(51_200, 400, replace=False)           # held out from the tuning's sample
    D, _ = index.search(X[own], 10, own.astype(np.int64))
    found = D[:, 0] <= brute_force(X[own], X, 1, own)[0][:, 0] * (1 + 1e-5) + 1e-6
    assert info["tuning"]["reached"] and found.mean() >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / 400)
    if codes == "PQ8":   # PQ misorders near neighbours: more candidates than k are re-ranked
        assert info["search"]["k_factor"] > 1 and [s["parameter"] for s in info["tuning"]["sweeps"]] == [
            "nprobe", "k_factor"]
    assert (np.diff(D, axis=1) >= 0).all()


# ---------------------------------------------------------------- the recall target


def test_sweep_picks_the_smallest_value_reaching_the_target():
    seen = []

    def measure(value: int) -> float:
        seen.append(value)
        return min(1.0, value / 100)

    record = tuning.sweep("nprobe", tuning.search_values("nprobe", 1024), measure, 0.95)
    assert record["reached"] and record["chosen"] in range(95, 95 + 95 // tuning.RESOLUTION + 2)
    assert record["curve"] == {"nprobe": sorted(seen), "recall": [min(1, v / 100) for v in sorted(seen)]}
    assert tuning.sweep("nprobe", [1, 2, 4], lambda v: 0.5, 0.95)["chosen"] == 4      # never reached: the largest
    assert not tuning.sweep("nprobe", [1, 2, 4], lambda v: 0.5, 0.95)["reached"]
    assert tuning.search_values("nprobe", 48) == [1, 2, 4, 8, 16, 32, 48]
    assert tuning.search_values("efSearch", 100) == [16, 32, 64, 100]


def test_the_tuned_nprobe_reaches_the_target_on_a_held_out_sample(medium, tmp_path):
    directory, X = medium
    info = build(directory, tmp_path / "ivf", IndexSettings(factory="IVF128,Flat", target_recall=0.9, seed=2))
    tuned = info["tuning"]
    (sweep,) = tuned["sweeps"]
    values, recalls = sweep["curve"]["nprobe"], sweep["curve"]["recall"]
    assert tuned["reached"] and info["search"] == tuned["chosen"] == {"nprobe": sweep["chosen"]}
    assert tuned["queries"] == 1_000 and tuned["target_recall"] == 0.9
    assert values == sorted(values) and values[0] == 1 and len(values) > 2
    assert all(b >= a - 0.02 for a, b in itertools.pairwise(recalls))           # monotone up to sampling noise
    chosen = values.index(sweep["chosen"])
    assert recalls[chosen] >= 0.9 and all(r < 0.9 for r in recalls[:chosen])  # the smallest that reaches it
    on_disk = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert on_disk["tuning"] == info["tuning"]

    # an independent sample, against numpy float64 brute force, tie-tolerant by distance
    index = KnnIndex.load(tmp_path / "ivf")
    assert index.info["search"] == {"nprobe": sweep["chosen"]}
    own = np.random.default_rng(7).choice(12_000, 600, replace=False)
    D, _ = index.search(X[own], 10, own.astype(np.int64))
    true_D, _ = brute_force(X[own], X, 1, own)
    found = D[:, 0] <= true_D[:, 0] * (1 + 1e-6) + 1e-12
    assert found.mean() >= 0.9 - 3 * np.sqrt(0.9 * 0.1 / 600)

    given = build(directory, tmp_path / "given", IndexSettings(factory="IVF128,Flat", nprobe=3))
    assert given["tuning"] is None and given["search"] == {"nprobe": 3}      # an explicit --nprobe is kept
    assert build(directory, tmp_path / "flat", IndexSettings())["tuning"] is None   # exact: nothing to tune


def test_index_command_tunes_and_says_so(medium, tmp_path, capsys):
    directory, _ = medium
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(directory), "--out", str(tmp_path / "idx"), "--factory", "IVF64,Flat",
              "--target-recall", "0.8", "--memory", "1GiB"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "tuned     nprobe" in out and "reaches 1-recall@1 0.8" in out
    settings = json.loads((tmp_path / "idx" / "index.json").read_text())["build"]["settings"]
    assert settings["memory"] == "1GiB" and settings["target_recall"] == 0.8
    for flag, value, match in (("--memory", "lots", "--memory must be a size like 512MB"),
                               ("--target-recall", "0", "--target-recall must be in (0, 1]; got 0.0"),
                               ("--target-recall", "1.5", "--target-recall must be in (0, 1]; got 1.5")):
        with pytest.raises(SystemExit) as exit_info:
            main(["index", str(directory), "--out", str(tmp_path / "bad"), flag, value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and match in err.strip().splitlines()[-1], err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- one seam for where work runs


def test_knn_never_imports_engines():
    package = Path(memscan.__file__).parent / "knn"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.startswith("memscan.engines") for name in names), f"{path.name} imports {names}"
    script = ("import sys, numpy as np; from memscan.knn import exact, index, shards, tuning; "
              "print(sorted(m for m in sys.modules if m.startswith('memscan.engines')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_the_engine_is_passed_in(medium, tmp_path):
    """A caller's engine holds the shards and runs the exact searches; its name goes into index.json."""
    directory, _ = medium
    opened = []

    class Recording(knn_engine.LocalEngine):
        name = "recording"

        def open_shards(self, makers, metric, device):
            opened.append(len(makers))
            return super().open_shards(makers, metric, device)

    info = build(directory, tmp_path / "idx", IndexSettings(factory="IVF32,Flat", nprobe=4, shards=2,
                                                            eval_recall=50), engine=Recording())
    assert info["engine"] == "recording" and opened == [2]
    index = KnnIndex.load(tmp_path / "idx", engine=Recording())
    assert opened == [2, 2] and isinstance(index.engine, knn_engine.LocalEngine)


# ---------------------------------------------------------------- the coarse quantizer (issue 23)


def test_auto_factory_searches_many_centroids_by_a_graph_on_a_cpu():
    threshold = tuning.HNSW_QUANTIZER_MIN
    assert tuning.coarse_quantizer(threshold // 2) == "" and tuning.coarse_quantizer(threshold) == "_HNSW32"
    assert tuning.coarse_quantizer(threshold, gpu=True) == ""        # faiss-gpu scans its centroids flat
    # 10M vectors of n = 64: 8,192 lists (the k-means cap), past the threshold
    factory, reason = auto_factory(10_000_000, 64)
    assert factory == f"IVF{threshold}_HNSW32,Flat" and "HNSW32 graph" in reason
    assert auto_factory(10_000_000, 64, gpu=True)[0] == "IVF32768,Flat"
    assert auto_factory(10_000_000, 64, tuning.parse_memory("1GB"))[0] == f"IVF{threshold}_HNSW32,SQ8"
    assert auto_factory(1_000_000, 256)[0] == "IVF4096,Flat"           # below it: the flat scan
    lists = int(tuning.nlist_for(10_000_000, 64)[0])
    assert lists >= threshold and f"IVF{lists}_HNSW32" in auto_factory(10_000_000, 64)[0]


@pytest.mark.parametrize("which,factory", [("wide", "IVF1024_HNSW32,Flat"), ("medium", "IVF64_HNSW32,Flat")])
def test_an_index_over_a_graph_of_centroids_builds_loads_and_reaches_its_tuned_recall(
        wide, medium, tmp_path, which, factory):
    """Two-level k-means fills the graph (1,024 lists) or FAISS trains it (64): either way the index is
    tuned on nprobe alone, saved and loaded with its graph, and its search reaches the target."""
    import faiss
    directory = wide if which == "wide" else medium[0]
    data = store.ActivationDataset(directory)
    count = data.count("train", max(data.layers))
    X = data.take(np.arange(count))
    info = build(directory, tmp_path / "index", IndexSettings(factory=factory, target_recall=0.9, seed=3))
    assert info["factory"] == factory and info["tuning"]["reached"]
    assert [sweep["parameter"] for sweep in info["tuning"]["sweeps"]] == ["nprobe"]
    lists = int(factory[3:factory.index("_")])
    index = KnnIndex.load(tmp_path / "index")
    shard = index.shards.local_shard()
    assert index.shards.nlist == lists and index.recall_knob() == ("nprobe", lists)
    ivf = faiss.downcast_index(shard.index)
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat) and ivf.quantizer.ntotal == lists
    assert index.search_params["nprobe"] == info["tuning"]["chosen"]["nprobe"]
    own = np.random.default_rng(11).choice(count, 500, replace=False)   # not the tuning's sample
    D, I = index.search(X[own], 10, own.astype(np.int64))
    true_D, _ = brute_force(X[own], X, 1, own)
    found = D[:, 0] <= true_D[:, 0] * (1 + 1e-6) + 1e-12
    assert found.mean() >= 0.9 - 3 * np.sqrt(0.9 * 0.1 / 500)
    chosen = ((X[own][:, None, :].astype(np.float64) - X[I].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(D, chosen, rtol=1e-5, atol=1e-6)          # exact distances of what it found
    rows, D_join, _ = index.self_join(10)                                # grouped by list (big_batch_search)
    assert len(rows) == count and (D_join[own, 0] <= true_D[:, 0] * (1 + 1e-6) + 1e-12).mean() >= 0.85


def test_a_graph_quantizer_adds_deeply_and_never_claims_the_cells_bound(medium, tmp_path):
    """With an HNSW coarse quantizer a vector may sit outside its nearest centroid's list, so the cells' exact
    bound (`search_within`) is refused, not wrong; vectors are added with the graph searched QUANTIZER_EF_SEARCH
    deep, and no efSearch is recorded for an IVF (the graph index's own knob)."""
    import faiss

    from memscan.knn import shards

    info = build(medium[0], tmp_path / "index", IndexSettings(factory="IVF64_HNSW32,Flat", nprobe=4))
    assert "efSearch" not in info["search"]
    index = KnnIndex.load(tmp_path / "index")
    shard = index.shards.local_shard()
    quantizer = faiss.downcast_index(faiss.downcast_index(shard.index).quantizer)
    assert quantizer.hnsw.efSearch >= shards.QUANTIZER_EF_SEARCH and not shards.flat_quantizer(
        faiss.downcast_index(shard.index))
    X = index.vectors(index.row_ids[:20])
    assert shard.search_within(X, 3, np.full(20, np.inf)) is None and index.shards.search_within(
        X, 3, np.full(20, np.inf)) is None
