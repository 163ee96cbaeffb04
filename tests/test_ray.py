"""The Ray runners on a local Ray instance (2 CPUs): equal to the local runners, and robust to a lost worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import ray

from memscan import store
from memscan.engines import ray_runner
from memscan.extract import ExtractSettings, extract
from memscan.knn import exact
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
        remote = ray_runner.self_join(blocks, 6, metric=metric, options=options)
        for a, b in zip(local, remote):
            np.testing.assert_array_equal(a, b)
    queries = exact.array_blocks(np.arange(40), tricky_vectors(5)[:40], 17)
    local = exact.knn(queries(), blocks, 4)
    remote = ray_runner.knn(queries(), blocks, 4, options=options)
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a, b)


SETTINGS = ExtractSettings(model="", source="qf:documents=16,lines=16", num_chunks=120, chunk_tokens=32,
                           layers="all", positions="every:8", dtype="fp32", vec_dtype="float32", batch_size=2,
                           shard_rows=90, test_fraction=0.25, seed=3)


def rows(directory) -> dict[str, np.ndarray]:
    table = pq.read_table(sorted(directory.glob("part-*.parquet"))).to_pandas()
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


def test_ray_extraction_equals_the_local_runner(options, qf_model, local_reference, tmp_path):
    out = tmp_path / "ray"
    extract(replace(SETTINGS, model=str(qf_model), engine="ray"), out, ray_options=options)
    assert_same_dataset(out, local_reference)
    assert store.verify(out) == []


def test_ray_planning_of_a_folder_of_files_streams_the_same_chunks(options, qf_model, tmp_path):
    from tests.conftest import qf_lines

    folder = tmp_path / "texts"
    folder.mkdir()
    lines = qf_lines(18)
    for i in range(3):
        (folder / f"part{i}.txt").write_text("\n".join(lines[i * 6:(i + 1) * 6]) + "\n")
    settings = replace(SETTINGS, model=str(qf_model), source=str(folder), num_chunks=None, max_documents=14)
    extract(settings, tmp_path / "local")
    extract(replace(settings, engine="ray"), tmp_path / "ray", ray_options=options)
    assert_same_dataset(tmp_path / "ray", tmp_path / "local")
    assert json.loads((tmp_path / "ray" / store.MANIFEST).read_text())["corpus"]["documents"] == 14


def _capture_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if "_CaptureActor" in text or "MapWorker" in text:
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
    extract(replace(bigger, engine="ray"), out, ray_options=options)
    thread.join(timeout=5)
    assert killed, "no Ray worker was found to kill"
    reference = tmp_path / "reference"
    extract(bigger, reference)
    assert_same_dataset(out, reference)


def test_sharded_ivf_on_actors_equals_one_index_with_the_same_quantizer(options):
    import faiss

    rng = np.random.default_rng(4)
    centers = rng.normal(size=(80, 16))
    X = (centers[rng.integers(0, 80, 6000)] + 0.2 * rng.normal(size=(6000, 16))).astype(np.float32)
    queries = (centers[rng.integers(0, 80, 200)] + 0.2 * rng.normal(size=(200, 16))).astype(np.float32)
    trained = faiss.index_factory(16, "IVF32,Flat")
    trained.train(X[:3000])
    whole = faiss.clone_index(trained)
    whole.add(X)
    whole.nprobe = 4
    D_whole, I_whole = whole.search(queries, 5)
    sharded = ray_runner.shard_index(trained, exact.array_blocks(np.arange(6000), X, 700)(), {"nprobe": 4}, "l2", 3,
                                     options)
    D, I = sharded.search(queries, 5)
    np.testing.assert_allclose(D, D_whole, rtol=1e-5, atol=1e-5)
    assert (I == I_whole).mean() > 0.99  # ids may differ only among exact ties
    _, _, truth = exact.knn(exact.array_blocks(np.arange(200), queries, 200)(), exact.array_blocks(np.arange(6000), X, 2000), 5)
    assert (I[:, 0] == truth[:, 0]).mean() > 0.9   # its recall, against exact search
