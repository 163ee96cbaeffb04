"""The dataset folder of format version 4: shards in vectors/, the per-chunk table in chunks/ (one schema per glob),
doc_key and text per chunk, the row/chunk-to-text joins, the ownership rules of the subfolders, and version 3 kept."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from memscan import corpus, files, folders, store
from memscan.errors import DataError, InputError
from memscan.extract import ExtractSettings, extract, settings_record
from memscan.store import manifest as manifest_module


def _settings(model: Path, source: Path, **overrides) -> ExtractSettings:
    base = dict(model=str(model), source=str(source), chunk_tokens=8, layers="0,2", positions="every:4",
                batch_size=2, shard_rows=20, seed=3, dtype="fp32")
    return ExtractSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """12 documents keyed doc0..doc11 in an `id` column, of a few chunks each."""
    path = tmp_path_factory.mktemp("source") / "docs.jsonl"
    texts = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs; naïve café." * (1 + i % 3)
             for i in range(12)]
    path.write_text("".join(json.dumps({"id": f"doc{i}", "body": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def acts(bpe_model, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("acts") / "acts"
    extract(_settings(bpe_model, source, text_column="body"), out)
    return out


def _all_rows(folder: Path, sub: str) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((folder / sub).glob("*.parquet"))])


def test_version_4_puts_shards_and_chunk_tables_in_their_own_folders(acts):
    manifest = store.read_manifest(acts)
    assert manifest["format_version"] == 4 and store.verify(acts) == []
    assert sorted(p.name for p in acts.iterdir() if p.name not in files.LOCK_FILES) == ["chunks", "manifest.json",
                                                                                         "vectors"]
    assert [s["name"] for s in manifest["shards"]] == [f"vectors/part-{i:05d}.parquet"
                                                        for i in range(len(manifest["shards"]))]
    assert len(manifest["shards"]) > 2
    assert [e["name"] for e in manifest["chunk_tables"]] == ["chunks/chunks-00000.parquet"]
    assert {p.name for p in (acts / "vectors").iterdir()} == {Path(s["name"]).name for s in manifest["shards"]}
    assert folders.owned_names(acts) >= {"vectors", "chunks", "manifest.json"}


def test_chunk_table_holds_the_key_and_the_decoded_text(acts, bpe_model):
    chunks = _all_rows(acts, "chunks")
    tokenizer = AutoTokenizer.from_pretrained(bpe_model)
    assert chunks["text"].tolist() == [tokenizer.decode(list(ids)) for ids in chunks["token_ids"]]
    assert chunks["doc_key"].tolist() == [f"doc{d}" for d in chunks["doc_id"]]
    table = store.read_chunk_table(acts)
    assert table["text"].tolist() == chunks["text"].tolist() and table["doc_key"][0] == "doc0"


def test_each_glob_reads_exactly_one_kind_of_file(acts):
    for sub, rows in (("vectors", _all_rows(acts, "vectors")), ("chunks", _all_rows(acts, "chunks"))):
        glob = str(acts / sub / "*.parquet")
        counts = {"pandas": len(pd.read_parquet(acts / sub)), "polars": pl.scan_parquet(glob).collect().height,
                  "duckdb": duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall()[0][0],
                  "datasets": len(datasets.load_dataset("parquet", data_files=glob, split="train"))}
        assert counts == dict.fromkeys(counts, len(rows)), (sub, counts)
        assert set(duckdb.sql(f"SELECT * FROM '{glob}' LIMIT 1").columns) == set(rows.columns)


def test_rows_with_text_joins_rows_to_their_chunk_in_the_given_order(acts):
    rows = _all_rows(acts, "vectors").set_index("row_id")
    chunks = _all_rows(acts, "chunks").reset_index(drop=True)
    wanted = [int(len(rows) - 1), 0, 17, 5, 17]
    got = store.rows_with_text(acts, wanted)
    assert list(got.columns) == ["row_id", "doc_id", "doc_key", "chunk_id", "position", "token_id", "split", "site",
                                 "layer", "text"]
    assert got["row_id"].tolist() == wanted
    for name in ("doc_id", "chunk_id", "position", "token_id", "layer"):
        assert got[name].tolist() == rows.loc[wanted, name].tolist()
    by_chunk = chunks.set_index(["doc_id", "chunk_id"])
    assert got["text"].tolist() == [by_chunk.loc[(d, c), "text"] for d, c in zip(got["doc_id"], got["chunk_id"])]
    assert got["doc_key"].tolist() == [f"doc{d}" for d in got["doc_id"]]
    with pytest.raises(DataError, match=f"row id {len(rows)} is not in dataset"):
        store.rows_with_text(acts, [0, len(rows)])


def test_chunks_with_text_in_the_given_order(acts):
    chunks = _all_rows(acts, "chunks").reset_index(drop=True)
    picks = [len(chunks) - 1, 0, 3]
    got = store.chunks_with_text(acts, chunks["doc_id"][picks], chunks["chunk_id"][picks])
    assert list(got.columns) == ["doc_id", "doc_key", "chunk_id", "split", "text"]
    assert got["text"].tolist() == chunks["text"][picks].tolist()
    assert got["split"].tolist() == chunks["split"][picks].astype(str).tolist()
    with pytest.raises(DataError, match="chunk 99 of document 0 is not in dataset"):
        store.chunks_with_text(acts, [0], [99])


def _version_3(bpe_model, source, out: Path, monkeypatch) -> Path:
    """A dataset written as a version-3 memscan wrote it: flat, no doc_key or text."""
    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "FORMAT_VERSION", 3)
        extract(_settings(bpe_model, source, text_column="body"), out)
    return out


def test_version_3_reads_and_its_text_is_decoded_by_its_tokenizer(acts, bpe_model, source, tmp_path, monkeypatch):
    old = _version_3(bpe_model, source, tmp_path / "v3", monkeypatch)
    assert store.read_manifest(old)["format_version"] == 3 and store.verify(old) == []
    assert (old / "part-00000.parquet").is_file() and not (old / "vectors").exists()
    assert "text" not in pq.read_schema(old / "chunks-00000.parquet").names
    got, new = store.rows_with_text(old, [9, 2]), store.rows_with_text(acts, [9, 2])
    assert got["text"].tolist() == new["text"].tolist() and got["doc_key"].tolist() == [None, None]
    assert store.ActivationDataset(old).total_rows == store.ActivationDataset(acts).total_rows
    moved = tmp_path / "moved"
    shutil.copytree(old, moved)
    manifest = store.read_manifest(moved)
    manifest["settings"]["model"] = str(tmp_path / "gone")
    store.write_manifest(moved, manifest)
    with pytest.raises(DataError, match="predates chunk text .* could not be loaded"):
        store.chunks_with_text(moved, [0], [0])


def test_an_interrupted_version_3_job_resumes_in_its_own_layout(bpe_model, source, tmp_path, monkeypatch):
    whole = _version_3(bpe_model, source, tmp_path / "whole", monkeypatch)
    cut = _version_3(bpe_model, source, tmp_path / "cut", monkeypatch)
    manifest = store.read_manifest(cut)
    for key in ("counts", "corpus"):
        manifest.pop(key)
    dropped = manifest["shards"][2:]
    manifest.update(complete=False, shards=manifest["shards"][:2], chunk_tables=[])
    store.write_manifest(cut, manifest)
    for entry in dropped:
        (cut / entry["name"]).unlink()
    finished = extract(_settings(bpe_model, source, text_column="body"), cut)
    assert finished["format_version"] == 3 and store.verify(cut) == []
    assert {p.name: p.read_bytes() for p in cut.glob("*.parquet")} == {
        p.name: p.read_bytes() for p in whole.glob("*.parquet")}


@pytest.mark.parametrize("name", ["/etc/passwd", "../part-00000.parquet", "vectors/../../x.parquet",
                                  "elsewhere/part-00000.parquet", "vectors/sub/part-00000.parquet"])
def test_a_manifest_naming_a_file_outside_its_folders_is_refused(acts, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(acts, copy)
    manifest = store.read_manifest(copy)
    manifest["shards"][0]["name"] = name
    store.write_manifest(copy, manifest)
    with pytest.raises(DataError, match="only plain file names"):
        store.read_manifest(copy)
    with pytest.raises(DataError, match="only plain file names"):
        folders.read_record(copy, folders.DATASET)


def test_a_symlinked_subfolder_is_refused_by_readers_verify_and_extract(acts, bpe_model, source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(acts, copy)
    os.rename(copy / "vectors", tmp_path / "real")
    os.symlink(tmp_path / "real", copy / "vectors")
    assert any("symbolic link" in p for p in store.verify(copy))
    assert any("symbolic link" in p for p in folders.listed_problems(copy, folders.DATASET,
                                                                      store.read_manifest(copy)))
    with pytest.raises(DataError, match="symbolic link"):
        store.rows_with_text(copy, [0])
    with pytest.raises(InputError, match="symbolic link"):
        extract(_settings(bpe_model, source, text_column="body"), copy)
    assert (tmp_path / "real" / "part-00000.parquet").is_file()


def test_a_users_file_in_a_subfolder_is_refused_kept_and_its_folder_too(acts, bpe_model, source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(acts, copy)
    (copy / "vectors" / "notes.txt").write_text("mine")
    other = _settings(bpe_model, source, text_column="body", seed=4)
    with pytest.raises(InputError, match="did not write \\(notes.txt\\)"):
        extract(other, copy, overwrite=True)
    extract(other, copy, overwrite=True, allow_other_files=True)
    assert (copy / "vectors" / "notes.txt").read_text() == "mine" and store.verify(copy) == []
    (copy / "vectors" / "notes.txt").unlink()
    fewer = _settings(bpe_model, source, text_column="body", seed=4, layers="0")
    extract(fewer, copy, overwrite=True)
    assert store.verify(copy) == [] and len(store.read_manifest(copy)["shards"]) < len(list(acts.glob("vectors/*")))
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*.parquet")) == sorted(
        e["name"] for key in ("shards", "chunk_tables") for e in store.read_manifest(copy)[key])


def test_overwrite_by_a_flat_dataset_removes_the_emptied_subfolders(acts, bpe_model, source, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(acts, copy)
    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "FORMAT_VERSION", 3)
        extract(_settings(bpe_model, source, text_column="body", seed=9), copy, overwrite=True)
    assert not (copy / "vectors").exists() and not (copy / "chunks").exists() and store.verify(copy) == []


def test_id_column_reads_each_documents_key_or_names_what_is_there(tmp_path):
    rows = [{"id": 17, "name": "first", "body": "one"}, {"id": 18, "name": None, "body": "two"}]
    jsonl, parquet, txt = tmp_path / "a.jsonl", tmp_path / "a.parquet", tmp_path / "a.txt"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(parquet)
    txt.write_text("one\ntwo\n")
    for path in (jsonl, parquet, tmp_path / "a.csv"):
        if path.suffix == ".csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        keys = [d.doc_key for d in corpus.open_source(str(path), seed=0, text_column="body").documents()]
        named = [d.doc_key for d in corpus.open_source(str(path), seed=0, text_column="body",
                                                       id_column="name").documents()]
        assert (keys, named) == (["17", "18"], ["first", None]), path
        with pytest.raises(InputError, match="has no column 'nope'; columns are: id, name, body"):
            list(corpus.open_source(str(path), seed=0, text_column="body", id_column="nope").documents())
    assert [d.doc_key for d in corpus.open_source(str(txt), seed=0).documents()] == [None, None]
    for spec in (str(txt), "qf:documents=2"):
        with pytest.raises(InputError, match="--id-column id: .* no columns"):
            list(corpus.open_source(spec, seed=0, id_column="id").documents())


def test_id_column_enters_the_fingerprint_only_when_it_changes_the_dataset():
    plain = settings_record(ExtractSettings(model="m", source="s"))
    assert "id_column" not in plain
    assert settings_record(ExtractSettings(model="m", source="s", id_column="id")) == plain
    assert settings_record(ExtractSettings(model="m", source="s", id_column="name"))["id_column"] == "name"
