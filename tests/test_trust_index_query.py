"""Issue 11 on the index and query side: every file checked, nothing a user owns deleted, no silently wrong number.

Indexes and run folders carry checksums of every file and a signed record; replacing an
index never leaves neither; one job per folder; data at scales float32 cannot hold is
refused with the numbers; queries from the indexed split leave their own row out; recall
compares distances, not ids; flags are checked at the boundary; the report escapes what it reads.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import clustered

import memscan
from memscan import files, query, store
from memscan.cli import main
from memscan.errors import DataError, InputError, MemscanError
from memscan.knn import exact
from memscan.knn import index as knn_index
from memscan.knn import shards as knn_shards
from memscan.knn.index import IndexSettings, KnnIndex, build, recall_at
from memscan.query import QuerySettings, run
from memscan.report import render


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """600 train + 100 test vectors of n=8 in 20 clusters, with 10 exact duplicates among the train rows."""
    X = clustered(700, 8, 20, seed=1)
    X[100:110] = X[200:210]
    directory = tmp_path_factory.mktemp("trust") / "data"
    store.write_vectors(directory, X, ["train"] * 600 + ["test"] * 100, model="synthetic", shard_rows=300)
    return directory


@pytest.fixture(scope="module")
def built(data, tmp_path_factory) -> Path:
    """A Flat index over `data` and a run folder of it; tests copy them before damaging anything."""
    root = tmp_path_factory.mktemp("built")
    build(data, root / "index")
    run(root / "index", data, root / "run", QuerySettings(k=3, subsets=(0.5, 1.0)))
    return root


@pytest.fixture
def index_dir(built, tmp_path) -> Path:
    shutil.copytree(built / "index", tmp_path / "index")
    return tmp_path / "index"


@pytest.fixture
def run_dir(built, tmp_path) -> Path:
    shutil.copytree(built / "run", tmp_path / "run")
    return tmp_path / "run"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def fails(capsys, *args: str, match: str) -> str:
    """The command exits 1 with one line naming `match` (after any problem lines verify prints), no traceback."""
    code, _, err = cli(capsys, *args)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err and last.startswith("memscan: error: "), err
    assert match in err, err
    return err


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def resign(record: Path, change) -> None:
    """Apply `change` to a record and sign it again, its file entries refreshed: what a tool that
    knows the format could write, so that the checks behind the checksums are reached."""
    document = json.loads(record.read_text())
    change(document)
    for entry in document.get("shards") or []:
        for key in ("index", "row_ids"):
            path = record.parent / entry[key]["name"]
            if path.is_file():
                entry[key] = files.file_entry(path)
    record.write_text(json.dumps(files.signed(document)))


def query_args(index: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["query", str(index), "--queries", str(data), "--out", str(out), "--k", "3", *extra]


# ---------------------------------------------------------------- A: checksums everywhere


def test_a_flipped_bit_in_the_row_id_map_is_caught(capsys, data, index_dir, tmp_path):
    row_ids = np.load(index_dir / "row_ids.npy")
    header = (index_dir / "row_ids.npy").stat().st_size - row_ids.nbytes
    flip_bit(index_dir / "row_ids.npy", header + 8 * 344)   # id 344 becomes 345: a plausible, wrong table
    assert np.load(index_dir / "row_ids.npy")[344] == 345
    with pytest.raises(DataError, match="row-id file row_ids.npy fails its sha256 checksum"):
        KnnIndex.load(index_dir)
    assert knn_index.verify(index_dir) == ["row-id file row_ids.npy fails its sha256 checksum (corrupted or replaced)"]
    fails(capsys, *query_args(index_dir, data, tmp_path / "run"), match="row_ids.npy fails its sha256 checksum")
    assert not (tmp_path / "run").exists()
    fails(capsys, "verify", index_dir, match="row_ids.npy fails its sha256")


def test_an_edited_index_record_is_caught(capsys, data, index_dir, tmp_path):
    record = index_dir / "index.json"
    record.write_text(record.read_text().replace('"metric": "l2"', '"metric": "ip"'))
    with pytest.raises(DataError, match="index.json fails its self_sha256 checksum"):
        KnnIndex.load(index_dir)
    fails(capsys, *query_args(index_dir, data, tmp_path / "run"), match="fails its self_sha256 checksum")
    fails(capsys, "verify", index_dir, match="fails its self_sha256 checksum")


def pickled(path: Path) -> None:
    np.save(path, np.array([{"evil": 1}] * 3, dtype=object), allow_pickle=True)


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "index.faiss").unlink(), "index file index.faiss is missing"),
    (lambda d: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:100]), "bytes; its record says"),
    (lambda d: resign_after(d, lambda: (d / "index.faiss").write_bytes(b"not a faiss index")),
     "index.faiss is not an index file FAISS can read"),
    (lambda d: resign_after(d, lambda: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:100])),
     "index.faiss is not an index file FAISS can read"),
    (lambda d: resign_after(d, lambda: pickled(d / "row_ids.npy")), "row_ids.npy is not a row-id file memscan wrote"),
    (lambda d: resign_after(d, lambda: np.save(d / "row_ids.npy", np.arange(600, dtype=np.float64))),
     "row_ids.npy holds float64"),
    (lambda d: resign_after(d, lambda: np.save(d / "row_ids.npy", np.arange(599, dtype=np.int64))),
     "row_ids.npy maps 599 ids"),
    (lambda d: resign(d / "index.json", lambda i: i.update(metric="ip")), "metric l2; index.json says dimension 8 and metric ip"),
    (lambda d: (d / "index.json").write_text('{"format": "memscan.index", '), "index.json is not valid JSON"),
    (lambda d: (d / "index.json").write_text("[1, 2]"), "a JSON object was expected"),
    (lambda d: resign(d / "index.json", lambda i: i.update(metric="cosine")), "'metric' must be l2 or ip"),
    (lambda d: resign(d / "index.json", lambda i: i.update(n=0)), "'n' must be at least 1"),
    (lambda d: resign(d / "index.json", lambda i: i.pop("dataset")), "has no 'dataset'"),
    (lambda d: resign(d / "index.json", lambda i: i.update(shards=[])), "lists no shards"),
    (lambda d: resign(d / "index.json", lambda i: i["shards"][0]["index"].update(name="../index.faiss")),
     "only plain file names"),
    (lambda d: resign(d / "index.json", lambda i: i.update(search={"nprobe": 0})), "search parameter 'nprobe'"),
    (lambda d: resign(d / "index.json", lambda i: i.update(ntotal=601)), "'ntotal' says 601"),
])
def test_damaged_index_files_and_records_are_one_line(capsys, data, index_dir, tmp_path, damage, match):
    damage(index_dir)
    with pytest.raises(DataError, match=match.replace("(", r"\(")):
        KnnIndex.load(index_dir)
    fails(capsys, *query_args(index_dir, data, tmp_path / "run"), match=match)


def resign_after(index: Path, write) -> None:
    write()
    resign(index / "index.json", lambda info: None)


def test_index_shard_files_are_fsynced_before_the_record(data, tmp_path, monkeypatch):
    order = []
    commit = files.commit_file
    monkeypatch.setattr(files, "commit_file", lambda tmp, final: (order.append(Path(final).name), commit(tmp, final)))
    build(data, tmp_path / "index", IndexSettings(shards=2))
    assert order == ["build.json",   # the record of the names the build writes, before any of them
                     "shard-000.faiss", "shard-000.row_ids.npy", "shard-001.faiss", "shard-001.row_ids.npy",
                     "index.json"]
    assert not (tmp_path / "index" / "build.json").exists()   # gone once index.json lists what it held


def test_a_flipped_bit_in_a_run_table_is_caught(capsys, run_dir):
    size = (run_dir / "queries.parquet").stat().st_size
    flip_bit(run_dir / "queries.parquet", size // 2)
    with pytest.raises(DataError, match="table queries.parquet fails its sha256 checksum"):
        memscan.load(run_dir).queries
    with pytest.raises(DataError, match="table queries.parquet fails its sha256 checksum"):
        render(run_dir)
    assert query.verify(run_dir) == ["table queries.parquet fails its sha256 checksum (corrupted or replaced)"]
    fails(capsys, "report", run_dir, match="queries.parquet fails its sha256 checksum")
    fails(capsys, "verify", run_dir, match="queries.parquet fails its sha256 checksum")


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_text(p.read_text().replace('"k": 3', '"k": 4')), "fails its self_sha256 checksum"),
    (lambda p: p.write_text("{not json"), "is not valid JSON"),
    (lambda p: resign(p, lambda s: s.pop("tables")), "has no 'tables'"),
    (lambda p: resign(p, lambda s: s["tables"].pop()), "a run has"),
    (lambda p: resign(p, lambda s: s["settings"].update(k="<script>alert(1)</script>")), "'k' must be int"),
    (lambda p: resign(p, lambda s: s["layers"][0].update(layer=None)), "'layer' must be int"),
])
def test_damaged_run_summaries_are_one_line(capsys, run_dir, damage, match):
    damage(run_dir / "summary.json")
    with pytest.raises(DataError, match=match):
        memscan.load(run_dir)
    fails(capsys, "report", run_dir, match=match)
    assert not (run_dir / "report.html").exists()


class Killed(BaseException):
    """What a kill -9 or a full disk does to the job: it stops where it is."""


def killed(*args, **kwargs):
    raise Killed()


def test_a_query_rerun_that_dies_while_writing_leaves_an_incomplete_run_not_a_mixed_one(
        capsys, data, built, run_dir, monkeypatch):
    written = []
    commit = store.TableWriter.commit

    def dies_after_two(self):
        if len(written) == 2:
            killed()
        written.append(self.path)
        return commit(self)

    monkeypatch.setattr(store.TableWriter, "commit", dies_after_two)
    with pytest.raises(Killed):
        run(built / "index", data, run_dir, QuerySettings(k=5, subsets=(1.0,)), overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in written] == ["neighbours.parquet", "queries.parquet"]
    assert "pending" in json.loads((run_dir / "summary.json").read_text())   # vouches for nothing, owns the tables
    with pytest.raises(DataError, match="incomplete run .*rerun `memscan query`"):
        memscan.load(run_dir)
    fails(capsys, "report", run_dir, match="incomplete run")
    fails(capsys, "verify", run_dir, match="incomplete run")
    run(built / "index", data, run_dir, QuerySettings(k=5, subsets=(1.0,)))
    assert memscan.load(run_dir).summary["settings"]["k"] == 5 and query.verify(run_dir) == []


def test_verify_checks_dataset_index_and_run_folders(capsys, data, built, tmp_path):
    code, out, _ = cli(capsys, "verify", data)
    assert code == 0 and "700 rows in 3 shards, checksums match" in out
    code, out, _ = cli(capsys, "verify", built / "index")
    assert code == 0 and "index of 600 vectors (Flat, 1 shard), checksums match" in out
    code, out, _ = cli(capsys, "verify", built / "run")
    assert code == 0 and "run of 1 layer and 5 tables, checksums match" in out
    shutil.copytree(data, tmp_path / "data")
    flip_bit(tmp_path / "data" / "vectors" / "part-00001.parquet", 1000)
    fails(capsys, "verify", tmp_path / "data", match="part-00001.parquet fails its sha256")
    fails(capsys, "verify", tmp_path, match="is not a memscan folder of any kind")


def test_an_index_whose_dataset_changed_or_vanished_is_refused(data, tmp_path):
    shutil.copytree(data, tmp_path / "data")
    build(tmp_path / "data", tmp_path / "index")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    manifest["seed"] = 1
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert ["changed since index" in p for p in knn_index.verify(tmp_path / "index")] == [True]
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(DataError, match="that index .* was built from is missing"):
        KnnIndex.load(tmp_path / "index")


# ---------------------------------------------------------------- B: safe replacement, one job per folder


def search_result(index_dir: Path, data: Path) -> tuple[str, np.ndarray]:
    index = KnnIndex.load(index_dir)
    X = store.ActivationDataset(data).take(np.arange(600, 700))
    return index.info["factory"], index.search(X, 4)[1]


@pytest.mark.parametrize("kill_at", ["second shard file", "index.json", "removing the old files"])
def test_an_overwrite_killed_at_any_point_leaves_the_old_or_the_new_index(data, index_dir, monkeypatch, kill_at):
    old = search_result(index_dir, data)
    settings = IndexSettings(factory="IVF8,Flat", nprobe=2, train_size=600, shards=2)
    new = build(data, index_dir.parent / "reference", settings)
    if kill_at == "second shard file":
        save = knn_shards.Shard.save

        def first_only(shard, directory, index_file, ids_file):
            return save(shard, directory, index_file, ids_file) if index_file.startswith("shard-000") else killed()
        monkeypatch.setattr(knn_shards.Shard, "save", first_only)
    elif kill_at == "index.json":
        monkeypatch.setattr(files, "write_json_atomic", killed)
    else:
        monkeypatch.setattr(files, "remove_owned", killed)
    with pytest.raises(Killed):
        build(data, index_dir, settings, overwrite=True)
    monkeypatch.undo()
    assert knn_index.verify(index_dir) == []
    factory, ids = search_result(index_dir, data)
    if kill_at == "removing the old files":
        assert factory == "IVF8,Flat"
        np.testing.assert_array_equal(ids, search_result(index_dir.parent / "reference", data)[1])
        assert KnnIndex.load(index_dir).info["shards"][0]["index"]["sha256"] == new["shards"][0]["index"]["sha256"]
    else:
        assert factory == old[0] == "Flat"
        np.testing.assert_array_equal(ids, old[1])
    build(data, index_dir, settings, overwrite=True)   # the rerun finishes
    listed = {name for entry in knn_index.read_info(index_dir)["shards"] for name in knn_shards.entry_names(entry)}
    left = {p.name for p in index_dir.iterdir()} - {".memscan.lock", "index.json", *listed}
    # Files of the replaced index whose removal was killed: build.json, the record of the build's pending
    # names, lists them still, so the rerun removes them; its temporaries and half-written shards are replaced.
    assert left == set()


def test_one_job_at_a_time_holds_an_output_folder(capsys, data, built, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(built / "index", out)
    before = (out / "index.json").read_text()
    with files.folder_lock(out):
        fails(capsys, "index", data, "--out", out, "--overwrite", "--factory", "HNSW8",
              match="is in use by another memscan job (pid")
        fails(capsys, *query_args(built / "index", data, out), match="is in use by another memscan job")
    assert (out / "index.json").read_text() == before
    fails(capsys, "index", data, "--out", tmp_path / "new", "--factory", "IVFbogus", match="not a FAISS factory")
    assert not (tmp_path / "new").exists()   # a failed job removes the folder it created


def test_files_memscan_did_not_write_are_refused_and_never_removed(capsys, data, built, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(capsys, "index", data, "--out", out, match="holds files memscan did not write (notes.txt)")
    fails(capsys, *query_args(built / "index", data, out), match="holds files memscan did not write (notes.txt)")
    for extra in ([], ["--overwrite", "--factory", "HNSW8"]):
        assert cli(capsys, "index", data, "--out", out, "--allow-other-files", *extra)[0] == 0
    assert cli(capsys, *query_args(built / "index", data, tmp_path / "run"))[0] == 0
    (tmp_path / "run" / "draft.md").write_text("mine too")
    fails(capsys, *query_args(built / "index", data, tmp_path / "run"), match="(draft.md)")
    assert cli(capsys, *query_args(built / "index", data, tmp_path / "run", "--allow-other-files"))[0] == 0
    fails(capsys, "report", tmp_path / "run", match="(draft.md)")   # the report writes there too: the same rule
    assert cli(capsys, "report", tmp_path / "run", "--allow-other-files")[0] == 0
    assert cli(capsys, *query_args(built / "index", data, tmp_path / "run", "--allow-other-files"))[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "run" / "draft.md").read_text() == "mine too"


# ---------------------------------------------------------------- C: never a silently wrong number


@pytest.mark.parametrize("scale", [1e-30, 1e20])
def test_vectors_at_scales_float32_cannot_hold_are_refused_with_the_numbers(capsys, data, built, tmp_path, scale):
    X = clustered(300, 8, 5, seed=3) * np.float32(scale)
    store.write_vectors(tmp_path / "scaled", X, ["train"] * 250 + ["test"] * 50, model="synthetic")
    rms = float(np.sqrt((X[:250].astype(np.float64) ** 2).sum(1).mean()))   # the train split's
    message = f"RMS norm {rms:.3g}; memscan computes distances in float32 and needs it in [1e-12, 1e+12]"
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("+", r"\+")):
        build(tmp_path / "scaled", tmp_path / "index")
    fails(capsys, "index", tmp_path / "scaled", "--out", tmp_path / "index", match=f"multiply them by about {1 / rms:.0e}")
    fails(capsys, "index", tmp_path / "scaled", "--out", tmp_path / "index", "--factory", "IVF4,Flat",
          match=message)
    queries = tmp_path / "scaled_queries"
    store.write_vectors(queries, clustered(50, 8, 5, seed=4) * np.float32(scale), ["test"] * 50, model="synthetic")
    fails(capsys, *query_args(built / "index", queries, tmp_path / "run"), match="the vectors of the queries")
    with pytest.raises(DataError, match="the vectors of the queries"):
        KnnIndex.load(built / "index").search(store.ActivationDataset(queries).take(np.arange(5)), 2)


def brute_nearest_other(data: Path, split: str) -> np.ndarray:
    X = store.ActivationDataset(data).take(store.ActivationDataset(data).row_ids(split)).astype(np.float64)
    sq = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    return np.sqrt(sq.min(1))


@pytest.mark.parametrize("exact_search", [False, True])
def test_queries_from_the_indexed_split_leave_their_own_row_out(capsys, data, built, tmp_path, exact_search):
    extra = ["--exact"] if exact_search else []
    code, out, _ = cli(capsys, *query_args(built / "index", data, tmp_path / "run", "--split", "train", *extra))
    assert code == 0 and "each query leaves its own row out (leave-one-out)" in out
    tables = memscan.load(tmp_path / "run")
    assert tables.summary["queries_are_patterns"] is True
    s = brute_nearest_other(data, "train")
    assert (s == 0).sum() == 20   # the duplicates: each finds its twin, never itself
    np.testing.assert_allclose(tables.queries.nearest_dist, s, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tables.queries.nearest_dist, tables.patterns.nearest_other_dist)
    assert not (tables.neighbours.query_row_id == tables.neighbours.neighbour_row_id).any()
    summary = tables.summary["layers"][0]
    r_star = summary["r_star"]
    assert summary["A2"]["coverage_at_r_star"] == pytest.approx((s <= r_star).mean())
    np.testing.assert_allclose(tables.coverage.coverage, [(s <= r).mean() for r in tables.coverage.radius])
    assert memscan.load(built / "run").summary["queries_are_patterns"] is False


def test_recall_compares_distances_so_a_duplicate_twin_is_found():
    truth = np.array([[0.0, 1.0, 2.0], [0.5, 0.5, 3.0]], np.float32)
    assert recall_at(truth.copy(), truth, "l2") == (1.0, 1.0)        # other ids at the same distances
    worse = np.array([[1.0, 2.0, 9.0], [0.5, 3.0, np.inf]], np.float32)
    assert recall_at(worse, truth, "l2") == (0.5, pytest.approx((2 / 3 + 2 / 3) / 2))
    assert recall_at(-worse, -truth, "ip") == recall_at(worse, truth, "l2")


def test_recall_on_data_with_exact_duplicates_counts_any_twin(tmp_path):
    X = clustered(200, 8, 8, seed=5)
    copies = np.concatenate([X] * 4)[np.random.default_rng(0).permutation(800)]   # every vector four times
    store.write_vectors(tmp_path / "twins", copies, ["train"] * 800, model="synthetic")
    for k in (1, 2):   # the true nearest are 3 twins at distance 0: HNSW returns any of them (ids compared: ~0.5)
        info = build(tmp_path / "twins", tmp_path / f"hnsw{k}", IndexSettings(factory="HNSW16", eval_recall=400,
                                                                              recall_k=k))
        assert info["recall"]["recall_1_at_1"] == 1.0 and info["recall"]["recall_k_at_k"] == 1.0


def test_an_approximate_index_that_finds_too_few_neighbours_is_one_line(capsys, data, tmp_path, monkeypatch):
    # IVF4 at nprobe 1 probes lists of about 150 vectors: the shards search again wider until k come back
    assert cli(capsys, "index", data, "--out", tmp_path / "ivf", "--factory", "IVF4,Flat", "--nprobe", "1")[0] == 0
    assert cli(capsys, "query", tmp_path / "ivf", "--queries", data, "--out", tmp_path / "run", "--k", "150")[0] == 0
    assert (memscan.load(tmp_path / "run").neighbours.neighbour_row_id >= 0).all()
    # where an index still comes back short (a graph index can), the query says so in one line
    search = KnnIndex.search

    def short(self, X, k, query_ids=None):
        D, I = search(self, X, k, query_ids)
        I[0, -1] = -1
        return D, I

    monkeypatch.setattr(KnnIndex, "search", short)
    fails(capsys, "query", tmp_path / "ivf", "--queries", data, "--out", tmp_path / "run2", "--k", "150",
          match="the approximate index found fewer than k=150 neighbours for 1 vectors")


def test_summaries_say_none_where_a_number_is_undefined(capsys, tmp_path):
    X = clustered(200, 8, 4, seed=6)
    store.write_vectors(tmp_path / "twins", np.concatenate([X, X, clustered(40, 8, 4, seed=7)]),
                        ["train"] * 400 + ["test"] * 40, model="synthetic")
    assert cli(capsys, "index", tmp_path / "twins", "--out", tmp_path / "index")[0] == 0
    code, out, _ = cli(capsys, *query_args(tmp_path / "index", tmp_path / "twins", tmp_path / "run"))
    assert code == 0 and "floor n/a" in out   # every pattern has a twin: s = 0, log Z = -inf, no finite floor
    text = (tmp_path / "run" / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    floor = memscan.load(tmp_path / "run").summary["layers"][0]["floor"]
    assert floor["log_z"] is None and floor["predicted_floor"] is None


# ---------------------------------------------------------------- D: values checked once at the boundary


@pytest.mark.parametrize("flag,value,match", [
    ("--eval-recall", "-5", "--eval-recall must be at least 0; got -5"),
    ("--seed", "-1", "--seed must be at least 0; got -1"),
    ("--nprobe", "-1", "--nprobe must be at least 1; got -1"),
    ("--nprobe", "0", "--nprobe must be at least 1; got 0"),
    ("--ef-search", "-1", "--ef-search must be at least 1; got -1"),
    ("--ef-search", "0", "--ef-search must be at least 1; got 0"),
    ("--train-size", "0", "--train-size must be at least 1; got 0"),
    ("--shards", "0", "--shards must be at least 1; got 0"),
])
def test_index_flags_out_of_range_name_the_flag(capsys, data, tmp_path, flag, value, match):
    fails(capsys, "index", data, "--out", tmp_path / "index", "--factory", "IVF4,Flat", flag, value, match=match)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("flag,value,match", [
    ("--beta", "inf", "--beta must be positive and finite; got inf"),
    ("--beta", "nan", "--beta must be positive and finite; got nan"),
    ("--radius", "inf", "--radius must be positive and finite; got inf"),
    ("--epsilon", "nan", "--epsilon must be positive and finite; got nan"),
    ("--seed", "-1", "--seed must be at least 0; got -1"),
    ("--k", "0", "--k must be at least 1; got 0"),
])
def test_query_flags_out_of_range_name_the_flag(capsys, data, built, tmp_path, flag, value, match):
    fails(capsys, "query", built / "index", "--queries", data, "--out", tmp_path / "run", flag, value, match=match)
    assert not (tmp_path / "run").exists()


def test_zero_is_an_error_and_none_the_default():
    with pytest.raises(InputError, match="--train-size must be at least 1; got 0"):
        IndexSettings(train_size=0).check()
    IndexSettings().check()
    assert knn_index._default_search_params("IVF64,Flat", 64, IndexSettings()) == {"nprobe": 8}
    assert knn_index._default_search_params("IVF64,Flat", 64, IndexSettings(nprobe=3)) == {"nprobe": 3}
    assert knn_index._default_search_params("HNSW8", None, IndexSettings()) == {"efSearch": 64}


# ---------------------------------------------------------------- E: the report escapes what it reads


def test_the_report_escapes_every_string_it_reads(capsys, tmp_path):
    script = "<script>alert(1)</script>"
    store.write_vectors(tmp_path / "data", clustered(240, 8, 6, seed=8), ["train"] * 200 + [script] * 40,
                        model="synthetic")
    build(tmp_path / "data", tmp_path / "index")
    run(tmp_path / "index", tmp_path / "data", tmp_path / "run", QuerySettings(split=script, k=3, subsets=(1.0,)))
    resign(tmp_path / "run" / "summary.json", lambda s: (
        s.update(index="<img src=x onerror=alert(2)>"), s["layers"][0].update(search="<b onclick=alert(3)>exact</b>")))
    page = render(tmp_path / "run").read_text()
    for raw in (script, "<img src=x", "<b onclick"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;b onclick=alert(3)&gt;exact&lt;/b&gt;" in page


# ---------------------------------------------------------------- F: progress on a terminal


def test_progress_bars_show_on_a_terminal_and_stay_quiet_elsewhere(capsys, data, monkeypatch, tmp_path):
    code, _, err = cli(capsys, "index", data, "--out", tmp_path / "quiet", "--factory", "IVF4,Flat")
    assert code == 0 and "vec/s" not in err and "step/s" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = cli(capsys, "index", data, "--out", tmp_path / "index", "--factory", "IVF4,Flat")
    assert code == 0 and "training sample:" in err and "add:" in err and "/600 [" in err and "vec/s" in err
    code, _, err = cli(capsys, *query_args(tmp_path / "index", data, tmp_path / "run"))
    assert code == 0 and "self-join" in err and "layer 0: retrieval" in err and "7/7" in err


def test_check_scale_measures_any_scale_without_overflow():
    X = clustered(50, 8, 2, seed=9).astype(np.float64)
    for scale in (1e-35, 1.0, 1e30):
        rms = exact.rms_norm((X * scale).astype(np.float32))
        assert rms == pytest.approx(np.sqrt(((X * scale) ** 2).sum(1).mean()), rel=1e-5)
    with pytest.raises(MemscanError, match="all of them are zero"):
        exact.check_scale(np.zeros((3, 4), np.float32), "a test")
