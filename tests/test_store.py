"""Shards and manifest: determinism, resume after SIGKILL, corruption found, streaming reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from memscan import files, store
from memscan.errors import DataError
from memscan.extract import ExtractSettings, extract
from memscan.store import writers


def settings_for(model: Path, **overrides) -> ExtractSettings:
    base = dict(model=str(model), source="qf:documents=20,lines=16", chunk_tokens=32, layers="all",
                positions="every:4", batch_size=3, shard_rows=700, num_chunks=150, seed=5, test_fraction=0.25,
                dtype="fp32")  # pinned: bytes are compared, and --dtype auto depends on the CPU
    return ExtractSettings(**{**base, **overrides})


def shard_bytes(directory: Path) -> dict[str, bytes]:
    """The shards' and the per-chunk table pieces' bytes, by name relative to the dataset folder."""
    found = [*directory.glob("vectors/part-*.parquet"), *directory.glob("chunks/chunks-*.parquet")]
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(found)}


@pytest.fixture(scope="module")
def reference(qf_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "data"
    extract(settings_for(qf_model), out)
    return out


def test_same_seed_gives_byte_identical_shards(reference, qf_model, tmp_path):
    extract(settings_for(qf_model), tmp_path / "again")
    assert shard_bytes(tmp_path / "again") == shard_bytes(reference)
    assert len(shard_bytes(reference)) > 3
    other = extract(settings_for(qf_model, seed=6), tmp_path / "other")
    first = json.loads((reference / store.MANIFEST).read_text())
    assert other["shards"][0]["sha256"] != first["shards"][0]["sha256"]


def test_rerun_of_a_complete_dataset_changes_nothing(reference, qf_model):
    def stamps() -> dict[str, int]:  # the lock file records each job that held the folder
        return {str(p): p.stat().st_mtime_ns for p in reference.rglob("*") if p.name != files.LOCK_FILE}

    before = stamps()
    extract(settings_for(qf_model), reference)
    assert stamps() == before


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memscan", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "2"})


def _shards_listed(directory: Path) -> int:
    try:
        return len(json.loads((directory / store.MANIFEST).read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_sigkill_at_several_points_then_rerun_equals_uninterrupted_run(reference, qf_model, tmp_path):
    out = tmp_path / "killed"
    s = settings_for(qf_model)
    args = ["extract", "--model", s.model, "--source", s.source, "--out", str(out), "--chunk-tokens", "32",
            "--layers", "all", "--positions", "every:4", "--batch-size", "3", "--shard-rows", "700",
            "--num-chunks", "150", "--seed", "5", "--test-fraction", "0.25", "--dtype", "fp32"]
    total = len(shard_bytes(reference))
    kills = 0
    for wait_for_shards in (0, 2, total // 2, total - 1):
        process = _start(args)
        deadline = time.monotonic() + 120
        while _shards_listed(out) < wait_for_shards and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if process.poll() is None:
            time.sleep(0.05 if wait_for_shards else 1.5)
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 3
    finish = _start(args)
    assert finish.wait() == 0, finish.stderr.read().decode()
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.rglob("*.tmp"))
    assert store.verify(out) == []


def test_truncated_and_flipped_shards_are_named_by_verify_and_refused_by_the_reader(reference, tmp_path):
    for damage in ("truncate", "flip"):
        copy = tmp_path / damage
        copy.mkdir()
        shutil.copytree(reference, copy, dirs_exist_ok=True)
        victim = copy / "vectors" / "part-00002.parquet"
        data = bytearray(victim.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0xFF
        victim.write_bytes(bytes(data))
        problems = store.verify(copy)
        assert len(problems) == 1 and "part-00002.parquet" in problems[0]
        with pytest.raises(DataError, match="part-00002.parquet"):
            for _ in store.ActivationDataset(copy).iter_batches():
                pass


def test_reader_filters_by_split_and_layer_in_row_order(reference):
    dataset = store.ActivationDataset(reference)
    table = pq.read_table(sorted(reference.glob("vectors/part-*.parquet"))).to_pandas()
    for split, layer in (("train", 2), ("test", 0), (None, 1), ("train", None)):
        blocks = list(dataset.iter_batches(split=split, layer=layer, columns=("row_id", "layer"), batch_rows=97))
        X = np.concatenate([b[0] for b in blocks])
        row_ids = np.concatenate([b[1]["row_id"] for b in blocks])
        expected = table[((table.split == split) if split else True) & ((table.layer == layer) if layer is not None else True)]
        assert np.array_equal(row_ids, expected.row_id.to_numpy())
        assert X.dtype == np.float32 and X.shape == (len(expected), dataset.n)
        np.testing.assert_array_equal(X, np.stack(expected.vec.to_numpy()).astype(np.float32))
        assert len(row_ids) == dataset.count(split, layer)


def test_reader_keeps_only_a_row_range_across_shard_and_row_group_boundaries(reference, tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", 40 * 4 * 4)  # groups of a few rows
    X = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    store.write_vectors(tmp_path / "groups", X, ["train", "test"] * 500, shard_rows=250)
    grouped = store.ActivationDataset(tmp_path / "groups")
    assert pq.ParquetFile(tmp_path / "groups" / "vectors" / "part-00000.parquet").metadata.num_row_groups > 5
    for start, stop in ((0, 1000), (39, 41), (245, 531), (999, 1000)):
        blocks = list(grouped.iter_batches(split="test", batch_rows=33, rows=(start, stop)))
        expected = np.arange(start + (start % 2 == 0), stop, 2)
        assert np.array_equal(np.concatenate([b[1]["row_id"] for b in blocks]), expected)
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), X[expected])

    dataset = store.ActivationDataset(reference)
    table = pq.read_table(sorted(reference.glob("vectors/part-*.parquet"))).to_pandas()
    assert dataset.total_rows == len(table) == 3600
    for start, stop in ((650, 1450), (0, 1), (1399, 1400), (700, 1400), (3000, 3600), (5, 5)):
        blocks = list(dataset.iter_batches(split="train", layer=1, batch_rows=61, rows=(start, stop)))
        row_ids = np.concatenate([b[1]["row_id"] for b in blocks]) if blocks else np.empty(0, np.int64)
        expected = table[(table.split == "train") & (table.layer == 1) & (table.row_id >= start) & (table.row_id < stop)]
        assert np.array_equal(row_ids, expected.row_id.to_numpy())
        if blocks:
            np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), np.stack(expected.vec.to_numpy()))


def test_a_split_stored_apart_is_read_without_decoding_the_other_row_groups(tmp_path, monkeypatch):
    """Row groups whose statistics exclude the split (or layer) are skipped; `columns` reads no vectors. The rows
    read are those a full read would give (also where the splits interleave, as a wrong skip would lose them)."""
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", 40 * 4 * 4)
    X = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    store.write_vectors(tmp_path / "apart", X, ["train"] * 900 + ["test"] * 100, shard_rows=250)
    store.write_vectors(tmp_path / "mixed", X, ["train", "test"] * 500, shard_rows=250)
    read_groups: list[int] = []
    original = pq.ParquetFile.iter_batches

    def spying(self, *args, row_groups=None, columns=None, **kwargs):
        if columns is not None and "vec" in columns:
            read_groups.extend(row_groups)
        return original(self, *args, row_groups=row_groups, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spying)
    for name, expected in (("apart", np.arange(900, 1000)), ("mixed", np.arange(1, 1000, 2))):
        dataset, read_groups[:] = store.ActivationDataset(tmp_path / name), []
        blocks = list(dataset.iter_batches(split="test", batch_rows=64))
        assert np.array_equal(np.concatenate([b[1]["row_id"] for b in blocks]), expected)
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), X[expected])
        groups = sum(pq.ParquetFile(path).metadata.num_row_groups
                     for path in (tmp_path / name / "vectors").glob("part-*.parquet"))
        assert len(read_groups) < groups / 5 if name == "apart" else len(read_groups) == groups
        columns = dataset.columns("test", None, ("row_id", "split"))
        assert np.array_equal(columns["row_id"], expected) and set(columns["split"]) == {"test"}


def test_shards_are_sized_and_listed_in_the_manifest(reference):
    manifest = json.loads((reference / store.MANIFEST).read_text())
    assert manifest["complete"] and manifest["counts"]["chunks"] == {
        split: n for split, n in manifest["counts"]["chunks"].items() if n}
    assert sum(manifest["counts"]["chunks"].values()) == 150
    rows = [s["num_rows"] for s in manifest["shards"]]
    assert all(r == 700 for r in rows[:-1]) and 0 < rows[-1] <= 700
    assert sum(rows) == 150 * 3 * 8
    for shard in manifest["shards"]:
        assert store.sha256_of(reference / shard["name"]) == shard["sha256"]
    assert {"torch", "transformers", "memscan"} <= set(manifest["versions"])


def test_resume_when_only_the_complete_flag_is_missing(reference, qf_model, tmp_path):
    out = tmp_path / "almost"
    extract(settings_for(qf_model), out)
    manifest = json.loads((out / store.MANIFEST).read_text())
    for key in ("counts", "corpus"):
        manifest.pop(key)
    manifest["complete"] = False  # killed after the last (partial) shard was listed, before the end
    store.write_manifest(out, manifest)
    finished = extract(settings_for(qf_model), out)
    assert finished["complete"] and shard_bytes(out) == shard_bytes(reference)
    assert finished["counts"] == json.loads((reference / store.MANIFEST).read_text())["counts"]


def test_a_failing_write_stops_without_hanging_or_recording_a_bad_shard(reference, qf_model, tmp_path, monkeypatch):
    flushes = {"count": 0}
    original = store.ShardWriter._flush_group

    def flaky(self):
        flushes["count"] += 1
        if flushes["count"] == 3:
            raise OSError("disk full (simulated)")
        original(self)

    monkeypatch.setattr(store.ShardWriter, "_flush_group", flaky)
    out = tmp_path / "flaky"
    with pytest.raises(OSError, match="disk full"):
        extract(settings_for(qf_model), out)
    assert store.verify(out) == ["the dataset is incomplete (extraction did not finish)"]
    assert len(json.loads((out / store.MANIFEST).read_text())["shards"]) == 2
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    extract(settings_for(qf_model), out)
    assert shard_bytes(out) == shard_bytes(reference)


def test_a_leftover_temporary_manifest_does_not_block_a_rerun(qf_model, tmp_path):
    out = tmp_path / "tmp_left"
    out.mkdir()
    (out / "manifest.json.tmp").write_text('{"half": ')
    assert extract(settings_for(qf_model), out)["complete"]
