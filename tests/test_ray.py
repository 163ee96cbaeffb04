"""The Ray runners on a local Ray instance (2 CPUs): equal to the local runners, and robust to a lost worker;
extraction streamed in bounded windows, its model run and resolved on the workers, never loaded on the driver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import ray
import torch
from torch._subclasses.fake_tensor import FakeTensor

import memscan
from memscan import corpus, files, models, sites, store
from memscan.cli import main
from memscan.errors import InputError
from memscan.engines import ray_capture, ray_planning, ray_runner
from memscan.extract import ExtractSettings, extract
from memscan.knn import exact
from memscan.knn.index import IndexSettings, KnnIndex, build
from memscan.query import QuerySettings, run
from tests.test_knn_exact import tricky_vectors


@pytest.fixture(scope="module")
def options():
    opts = ray_runner.RayOptions(num_workers=2)
    ray_runner.connect(opts)
    yield opts
    ray.shutdown()


def test_ray_self_join_and_knn_equal_the_local_exact_results(options):
    X = tricky_vectors()
    ids = np.arange(len(X), dtype=np.int64) * 7
    blocks = exact.array_blocks(ids, X, 53)
    for metric in ("l2", "ip"):
        local = exact.self_join(blocks, 6, metric=metric)
        remote = ray_runner.RayEngine(options).self_join(blocks, 6, metric=metric)
        for a, b in zip(local, remote):
            np.testing.assert_array_equal(a, b)
    queries = exact.array_blocks(np.arange(40), tricky_vectors(5)[:40], 17)
    local = exact.knn(queries(), blocks, 4)
    remote = ray_runner.RayEngine(options).knn(queries(), blocks, 4)
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a, b)
    requests = [exact.Request(ids[:9], X[:9], 3, exclude_self=True), exact.Request(ids[:4], X[:4], 2, "ip"),
                exact.Request(ids[5:8], X[5:8], 1, among=ids[::3])]   # a shared pass, a subset's members among them
    for (D, I), (D_ray, I_ray) in zip(exact.knn_each(requests, blocks, block_rows=4),
                                      ray_runner.RayEngine(options).knn_each(requests, blocks, block_rows=4)):
        np.testing.assert_array_equal(D, D_ray)
        np.testing.assert_array_equal(I, I_ray)


SETTINGS = ExtractSettings(model="", source="qf:documents=16,lines=16", num_chunks=120, chunk_tokens=32,
                           layers="all", positions="every:8", dtype="fp32", vec_dtype="float32", batch_size=2,
                           shard_rows=90, test_fraction=0.25, seed=3)


def rows(directory) -> dict[str, np.ndarray]:
    table = pq.read_table(sorted(directory.glob("vectors/part-*.parquet"))).to_pandas()
    return {name: (np.stack(table[name].to_numpy()) if name == "vec" else table[name].to_numpy()) for name in table}


@pytest.fixture(scope="module")
def local_reference(qf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "data"
    extract(replace(SETTINGS, model=str(qf_model)), out)
    return out


def assert_same_dataset(got, expected):
    a, b = rows(got), rows(expected)
    for name in a:
        if name == "vec":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
        elif name == "nll":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5)
        else:
            np.testing.assert_array_equal(a[name], b[name])
    manifest, reference = (json.loads((d / store.MANIFEST).read_text()) for d in (got, expected))
    assert manifest["counts"] == reference["counts"] and manifest["complete"]
    assert manifest["corpus"] == reference["corpus"]  # planned by Ray tasks, counted the same


def assert_same_chunk_tables(got, expected):
    """The per-chunk tables byte for byte: the same pieces, listed with the same checksums."""
    listed, reference = (json.loads((d / store.MANIFEST).read_text())["chunk_tables"] for d in (got, expected))
    assert listed == reference and listed
    for entry in listed:
        assert (got / entry["name"]).read_bytes() == (expected / entry["name"]).read_bytes()


def test_ray_extraction_equals_the_local_runner(options, qf_model, local_reference, tmp_path):
    out = tmp_path / "ray"
    extract(replace(SETTINGS, model=str(qf_model)), out, engine=ray_runner.RayEngine(options))
    assert_same_dataset(out, local_reference)
    assert_same_chunk_tables(out, local_reference)
    assert not np.isnan(store.read_chunk_table(out)["nll"]).all()    # the statistics, not an empty table
    assert store.verify(out) == []


def test_a_dataset_begun_on_the_local_engine_by_an_older_memscan_resumes_on_ray(options, qf_model, local_reference,
                                                                                tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(local_reference, out)
    manifest = json.loads((out / store.MANIFEST).read_text())
    manifest["settings"]["engine"] = "local"   # as an older memscan recorded it, inside the identity
    manifest["fingerprint"] = files.fingerprint({key: manifest[key] for key in ("settings", "model", "source",
                                                                                "split_rule")})
    for key in ("counts", "corpus"):
        manifest.pop(key)
    manifest.update(complete=False, shards=manifest["shards"][:2], chunk_tables=manifest["chunk_tables"][:1])
    store.write_manifest(out, manifest)
    result = extract(replace(SETTINGS, model=str(qf_model)), out, engine=ray_runner.RayEngine(options))
    assert result.engine == "ray" and result["fingerprint"] == manifest["fingerprint"]
    assert_same_dataset(out, local_reference)
    assert_same_chunk_tables(out, local_reference)
    assert store.verify(out) == []


def test_ray_extraction_without_the_loss_writes_the_same_token_table(options, qf_model, tmp_path):
    settings = replace(SETTINGS, model=str(qf_model), num_chunks=24, loss=False)
    extract(settings, tmp_path / "local")
    extract(settings, tmp_path / "ray", engine=ray_runner.RayEngine(options))
    assert_same_dataset(tmp_path / "ray", tmp_path / "local")
    assert_same_chunk_tables(tmp_path / "ray", tmp_path / "local")
    assert np.isnan(store.read_chunk_table(tmp_path / "ray")["nll"]).all()


@pytest.mark.parametrize("kind", ["files", "hf"])
def test_ray_planning_of_a_stream_in_pieces_gives_the_same_chunks(kind, options, qf_model, tmp_path):
    from tests.conftest import qf_lines

    folder = tmp_path / "texts"
    folder.mkdir()
    lines = qf_lines(18)
    for i in range(3):
        (folder / f"train-0000{i}-of-00003.jsonl").write_text(
            "".join(json.dumps({"text": line}) + "\n" for line in lines[i * 6:(i + 1) * 6]))
    source = f"hf:{folder}" if kind == "hf" else str(folder)
    settings = replace(SETTINGS, model=str(qf_model), source=source, num_chunks=None, max_documents=14)
    extract(settings, tmp_path / "local")
    extract(settings, tmp_path / "ray", engine=ray_runner.RayEngine(options))
    assert_same_dataset(tmp_path / "ray", tmp_path / "local")
    assert json.loads((tmp_path / "ray" / store.MANIFEST).read_text())["corpus"]["documents"] == 14


def chunk_keys(chunks) -> list[tuple]:
    return [(c.doc_id, c.chunk_id, c.split, c.tokens.tolist(), c.next_tokens.tolist()) for c in chunks]


def test_planning_every_chunk_streams_pieces_a_window_at_a_time(options, qf_model, monkeypatch):
    settings = replace(SETTINGS, model=str(qf_model), num_chunks=None)
    source = corpus.open_source(settings.source, seed=settings.seed)
    drawn = []
    real_ahead = ray_planning._ahead

    def counted_ahead(items, width):
        def counting():
            for item in items:
                drawn.append(item)
                yield item
        return real_ahead(counting(), width)

    monkeypatch.setattr(ray_planning, "_ahead", counted_ahead)
    chunks, stats = ray_planning.plan(source, settings.chunk_request(), options)
    first = next(iter(chunks))
    assert len(drawn) == options.num_workers     # 2 of the 8 pieces' tasks started when the first chunk arrives
    assert stats.documents == 0                  # counts come with each piece's end
    got = [first, *chunks]
    local_stats = corpus.CorpusStats()
    expected = list(corpus.iter_chunks(source.documents(), models.load_tokenizer(str(qf_model)), settings.chunk_tokens,
                                       settings.test_fraction, settings.seed, local_stats))
    assert len(drawn) == 4 * options.num_workers and len(expected) > 100
    assert chunk_keys(got) == chunk_keys(expected) and stats == local_stats


def test_streamed_extraction_keeps_a_window_of_batches_and_loads_no_model_here(options, qf_model, tmp_path,
                                                                               monkeypatch):
    settings = replace(SETTINGS, model=str(qf_model), num_chunks=None, max_documents=5,
                       sites="attn_out:all,resid_mid:1")   # hooked sites go to the actors as they are
    extract(settings, tmp_path / "local")
    after_submit = []
    real_submit = ray_capture.RayCapturePool.submit

    def counted_submit(pool, key, tokens, following):
        real_submit(pool, key, tokens, following)
        after_submit.append((pool.in_flight, pool.window))

    def no_weights_here(*args, **kwargs):
        raise AssertionError("the driver loaded the model's weights")

    monkeypatch.setattr(ray_capture.RayCapturePool, "submit", counted_submit)
    monkeypatch.setattr(models, "load", no_weights_here)   # Ray workers are other processes: theirs is untouched
    extract(settings, tmp_path / "ray", engine=ray_runner.RayEngine(options))
    assert_same_dataset(tmp_path / "ray", tmp_path / "local")
    assert_same_chunk_tables(tmp_path / "ray", tmp_path / "local")
    window = 2 * options.num_workers
    assert len(after_submit) > 2 * window and {w for _, w in after_submit} == {window}
    # Each batch past the window had the oldest written before it went out, long before the source's end.
    assert [n for n, _ in after_submit] == [min(k, window) for k in range(1, len(after_submit) + 1)]


def test_the_workers_resolve_device_and_dtype_and_the_manifest_records_theirs(options, qf_model, tmp_path,
                                                                              monkeypatch):
    worker_dtype = {v: k for k, v in models.DTYPES.items()}[models.resolve_dtype("auto", torch.device("cpu"))]

    def not_here(*args, **kwargs):
        raise AssertionError("the driver resolved the device or dtype")

    monkeypatch.setattr(models, "resolve_device", not_here)
    monkeypatch.setattr(models, "resolve_dtype", not_here)
    settings = replace(SETTINGS, model=str(qf_model), num_chunks=8, dtype="auto", vec_dtype="auto", device="auto")
    manifest = extract(settings, tmp_path / "ray", engine=ray_runner.RayEngine(options))
    assert manifest["settings"]["device"] == "cpu"         # no GPU given to the workers: none used
    assert manifest["settings"]["dtype"] == manifest["dtype"] == worker_dtype
    assert manifest["vec_dtype"] == ("float32" if worker_dtype == "fp32" else "float16")
    assert store.verify(tmp_path / "ray") == []


def test_device_cuda_on_workers_without_gpus_is_one_line_from_a_worker(options, qf_model, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(models, "resolve_device", lambda name: pytest.fail("the driver resolved --device"))
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--model", str(qf_model), "--source", "qf:documents=4", "--out", str(tmp_path / "out"),
              "--chunk-tokens", "32", "--engine", "ray", "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--device cuda with --engine ray needs --gpus-per-worker" in err


def test_describe_gives_what_load_gives_without_weights(qf_model):
    described = models.describe(str(qf_model))
    loaded = models.load(str(qf_model), dtype=torch.float32, device=torch.device("cpu"))
    assert described.info == loaded.info and described.info["num_parameters"] > 0
    for name in ("num_layers", "hidden_size", "context_length"):
        assert getattr(described, name) == getattr(loaded, name)
    assert all(isinstance(p, FakeTensor) for p in described.model.parameters())   # shapes, no storage
    targets = [[*models.hidden_targets([0, 2]), *(models.Target(s.name, s.block, s) for s in
                                                  sites.parse("mlp_hidden:all,attn_out:1", 2, model))]
               for model in (described.model, loaded.model)]
    assert targets[0] == targets[1]
    widths = [models.target_widths(model, t) for model, t in zip((described.model, loaded.model), targets)]
    assert widths == [[32, 32, 128, 128, 32]] * 2


def _capture_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if "_CaptureActor" in text:
            found.append(process)
    return found


def test_a_worker_killed_mid_extraction_loses_and_doubles_nothing(options, qf_model, local_reference, tmp_path):
    out = tmp_path / "killed"
    killed = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            workers = _capture_workers()
            if workers:
                time.sleep(0.5)  # let it start working
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    bigger = replace(SETTINGS, model=str(qf_model), source="qf:documents=60,lines=16", num_chunks=400)
    extract(bigger, out, engine=ray_runner.RayEngine(options))
    thread.join(timeout=5)
    assert killed, "no Ray worker was found to kill"
    reference = tmp_path / "reference"
    extract(bigger, reference)
    assert_same_dataset(out, reference)


def test_index_shards_filled_and_searched_by_actors_equal_the_local_shards(options, tmp_path):
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(80, 16))
    X = (centers[rng.integers(0, 80, 6200)] + 0.2 * rng.normal(size=(6200, 16))).astype(np.float32)
    store.write_vectors(tmp_path / "data", X, ["train"] * 6000 + ["test"] * 200, model="synthetic", shard_rows=1500)
    settings = IndexSettings(factory="IVF32,Flat", nprobe=4, eval_recall=300, shards=3)
    local = build(tmp_path / "data", tmp_path / "local", settings)
    remote = build(tmp_path / "data", tmp_path / "ray", settings, engine=ray_runner.RayEngine(options))
    assert remote["engine"] == "ray" and remote["shards"] == local["shards"] and len(remote["shards"]) == 3
    assert remote["recall"] == local["recall"] and remote["recall"]["recall_1_at_1"] > 0.9
    for name in ("shard-001.faiss", "shard-001.row_ids.npy"):   # each actor wrote its own files
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()

    here = KnnIndex.load(tmp_path / "ray")
    on_actors = KnnIndex.load(tmp_path / "ray", engine=ray_runner.RayEngine(options))
    queries = X[6000:]
    for a, b in zip(here.search(queries, 5), on_actors.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(here.self_join(3, batch_rows=2500), on_actors.self_join(3, batch_rows=2500)):
        np.testing.assert_array_equal(a, b)
    on_actors.set_search_params(nprobe=32)   # every list: the sharded search is then exact
    _, D, I = exact.knn(exact.array_blocks(np.arange(6000, 6200), queries, 200)(),
                        exact.array_blocks(np.arange(6000), X[:6000], 2000), 5)
    np.testing.assert_allclose(on_actors.search(queries, 5)[0], D, rtol=1e-6)


def test_query_on_ray_equals_the_local_query(options, local_reference, tmp_path):
    build(local_reference, tmp_path / "index", IndexSettings(layer=2, factory="IVF4,Flat", nprobe=2, shards=2))
    settings = QuerySettings(k=3, subsets=(0.5, 1.0))
    run(tmp_path / "index", local_reference, tmp_path / "local", settings)
    run(tmp_path / "index", local_reference, tmp_path / "ray", settings, engine=ray_runner.RayEngine(options))
    here, there = memscan.load(tmp_path / "local"), memscan.load(tmp_path / "ray")
    for name in ("neighbours", "queries", "patterns", "histograms", "coverage"):
        pd.testing.assert_frame_equal(getattr(here, name), getattr(there, name))
    layers = [s["layer"] for s in there.summary["layers"]]
    assert len(layers) > 2 and [s["search"] for s in there.summary["layers"]].count("exact") == len(layers) - 1


def test_index_and_query_commands_on_ray(options, local_reference, tmp_path, capsys):
    for args in (["index", str(local_reference), "--out", str(tmp_path / "index"), "--shards", "2", "--engine", "ray"],
                 ["query", str(tmp_path / "index"), "--queries", str(local_reference), "--out", str(tmp_path / "run"),
                  "--k", "3", "--engine", "ray"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "2 shards on Ray" in out and "A1 retrieval" in out
    assert [s["layer"] for s in memscan.load(tmp_path / "run").summary["layers"]] == [0, 1, 2]


def test_errors_on_workers_and_impossible_requests_are_one_line(options, tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    X[150, 2] = np.nan    # in the second shard's rows: found by its actor, not the driver
    store.write_vectors(tmp_path / "nan", X, ["train"] * 200)
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(tmp_path / "nan"), "--out", str(tmp_path / "idx"), "--shards", "2", "--engine", "ray"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "1 vectors of split 'train' hold NaN or Inf" in err
    with pytest.raises(InputError, match="no node of the Ray cluster has that many GPUs"):
        ray_runner.connect(replace(options, gpus_per_worker=1))
    with pytest.raises(InputError, match="0, a whole number or 1/m"):
        replace(options, gpus_per_worker=0.6)   # Ray cannot pack 0.6 + 0.6 on one GPU


GPU_SLOTS_SCRIPT = """
import sys, ray
from dataclasses import replace
from memscan.engines.ray_runner import RayEngine, RayOptions
from memscan.errors import InputError
from memscan.knn.index import IndexSettings, build
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # one logical GPU
data, out = sys.argv[1], sys.argv[2]
try:
    build(data, out + "/a", IndexSettings(shards=2, eval_recall=20), engine=RayEngine(RayOptions(gpus_per_worker=1)))
except InputError as exc:
    print("refused:", exc)
for gpus, shards in ((1, 1), (0.5, 2), (0.5, 1)):   # shards take every slot or leave one: never a wait
    info = build(data, out + f"/{gpus}-{shards}", IndexSettings(shards=shards, eval_recall=20),
                 engine=RayEngine(RayOptions(gpus_per_worker=gpus)))
    print("built", gpus, shards, info["recall"]["recall_1_at_1"])
"""


def test_index_shards_on_gpu_slots_are_refused_or_placed_never_left_waiting(tmp_path):
    import subprocess
    import sys

    X = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    store.write_vectors(tmp_path / "data", X, ["train"] * 300)
    done = subprocess.run([sys.executable, "-c", GPU_SLOTS_SCRIPT, str(tmp_path / "data"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("refused: 2 index shards of 1 GPU each do not fit the Ray cluster's 1 places")
    assert lines[1:] == ["built 1 1 1.0", "built 0.5 2 1.0", "built 0.5 1 1.0"]
    assert done.stderr.count("hold every GPU: exact searches run on CPUs") == 2


def _numbers(summary: dict) -> dict:
    """summary.json without what differs between two runs of one query: its timings, the runs' folders and the
    signature over them (the tables' entries, checksums included, stay)."""
    def strip(value):
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key != "seconds"}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value
    return {key: strip(value) for key, value in summary.items() if key not in ("index", "queries", "self_sha256")}


def test_query_on_ray_searches_inner_products_through_the_actors_own_lists(options, local_reference, tmp_path,
                                                                            monkeypatch):
    """An approximate layer's inner-product statistics (Delta, the MCHN top k) on Ray: each actor scans its own
    shard's lists for inner products (Delta's in the self-join's own scan, the queries' through its view of the
    lists) and the driver merges; no second index anywhere, and every number and table equal to the local
    query's."""
    from memscan.knn import mips, tuning

    # an IVF inner-product index (not Flat) for these few patterns: the approximate products are asked for
    monkeypatch.setattr(tuning, "auto_factory", lambda *args, **kwargs: ("IVF8,Flat", "a test's IVF"))
    build(local_reference, tmp_path / "index", IndexSettings(layer=2, factory="IVF8,Flat", nprobe=2, shards=2))
    settings = QuerySettings(k=3, subsets=(0.5, 1.0))
    run(tmp_path / "index", local_reference, tmp_path / "local", settings)
    views = []
    real_over_lists = mips.MipsIndex.over_lists.__func__

    def recorded(cls, shards, *args):
        found = real_over_lists(cls, shards, *args)
        views.append(found.shards)
        return found

    def no_second_index(*args, **kwargs):
        raise AssertionError("the driver built a second (augmented) inner-product index")

    monkeypatch.setattr(mips.MipsIndex, "over_lists", classmethod(recorded))
    monkeypatch.setattr(mips.MipsIndex, "build", no_second_index)
    run(tmp_path / "index", local_reference, tmp_path / "ray", settings, engine=ray_runner.RayEngine(options))
    assert [type(view).__name__ for view in views] == ["RayShardViews"] and len(views[0]) == 2

    here, there = memscan.load(tmp_path / "local"), memscan.load(tmp_path / "ray")
    for name in ("neighbours", "queries", "patterns", "histograms", "coverage"):
        pd.testing.assert_frame_equal(getattr(here, name), getattr(there, name))
    assert _numbers(there.summary) == _numbers(here.summary)
    approximate = [layer for layer in there.summary["layers"] if layer["search"] != "exact"]
    assert [layer["layer"] for layer in approximate] == [2]
    products = approximate[0]["A3"]["inner_products"]
    # Delta's maxima from the self-join's own scan of the actors' lists (they reach the target on this sample)
    assert products["search"].startswith("approximate: the self-join's own lists (IVF8,Flat {'nprobe': ")
    assert products["samples"]["patterns"]["recall_1_at_1"] >= products["target_recall"]
    assert products["tuning"] is None   # the actors' inner-product views serve the queries' top k alone
    assert approximate[0]["energy"]["mchn_top_k_recall"]["queries"] > 0


def test_inner_product_views_made_by_the_actors_equal_the_local_views(options, tmp_path):
    """`MipsIndex.over_lists` over shards in actors: each actor tells whether its shard has lists to scan
    (an IVF of SQ codes here; a Flat index has none: None, as locally) and searches its own view."""
    from memscan.knn import mips

    rng = np.random.default_rng(5)
    centers = rng.normal(size=(40, 12)) * rng.uniform(0.5, 2.0, (40, 1))
    X = (centers[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 12))).astype(np.float32)
    store.write_vectors(tmp_path / "data", X, ["train"] * 3000, model="synthetic", shard_rows=1000)
    max_sq_norm = float((X.astype(np.float64) ** 2).sum(1).max())
    engine = ray_runner.RayEngine(options)
    for factory, lists in (("IVF16,SQ8", True), ("Flat", False)):
        build(tmp_path / "data", tmp_path / factory, IndexSettings(factory=factory, eval_recall=50, shards=2))
        here, there = (KnnIndex.load(tmp_path / factory, engine=e) for e in (None, engine))
        local, remote = (mips.MipsIndex.over_lists(index.shards, here.vectors, max_sq_norm, factory)
                         for index in (here, there))
        if not lists:
            assert local is None and remote is None
            continue
        assert type(remote.shards).__name__ == "RayShardViews" and remote.factory == local.factory
        assert remote.shards.nlist == local.shards.nlist == 16 and not remote.exact_codes and not local.exact_codes
        np.testing.assert_array_equal(remote.shards.row_ids, local.shards.row_ids)
        for searcher in (local, remote):
            searcher.set_parameter("nprobe", 3)
        queries, ids = X[::25], np.arange(0, 3000, 25)
        for grouped in (False, True):
            a, b = local.search(queries, 4, ids, grouped), remote.search(queries, 4, ids, grouped)
            np.testing.assert_array_equal(a.ip, b.ip)
            np.testing.assert_array_equal(a.ids, b.ids)
        scores = [searcher.shards.search(queries, 5) for searcher in (local, remote)]   # merged by "ip": largest first
        for a, b in zip(*scores):
            np.testing.assert_array_equal(a, b)
        assert (np.diff(scores[1][0], axis=1) <= 0).all()
        fresh = KnnIndex.load(tmp_path / factory)     # the L2 shards in the actors keep their own nprobe
        for a, b in zip(fresh.search(queries, 3), there.search(queries, 3)):
            np.testing.assert_array_equal(a, b)
