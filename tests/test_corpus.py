"""Sources, chunking, the seeded uniform sample and the document-level split."""

from __future__ import annotations

import json
import logging
import random

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as scipy_stats

from memscan import corpus, qf
from memscan.corpus import Chunk, CorpusStats
from memscan.errors import InputError


def test_chunks_drop_the_remainder_but_keep_its_first_token_as_next():
    chunks, following = corpus.chunk_tokens(np.arange(11, dtype=np.int32), 3)
    assert chunks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert following.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    chunks, following = corpus.chunk_tokens(np.arange(6, dtype=np.int32), 3)
    assert following.tolist() == [[1, 2, 3], [4, 5, -1]]
    assert corpus.chunk_tokens(np.arange(2, dtype=np.int32), 3)[0].shape == (0, 3)


def test_iter_chunks_counts_what_it_keeps_and_drops():
    tokenizer = qf.tokenizer()
    docs = [corpus.Document(0, "the newt does giggle ."), corpus.Document(1, "the newt does giggle . " * 3)]
    stats = CorpusStats()
    chunks = list(corpus.iter_chunks(docs, tokenizer, 6, 0.0, 0, stats))
    assert [(c.doc_id, c.chunk_id) for c in chunks] == [(1, 0), (1, 1)]
    assert (stats.documents, stats.documents_too_short, stats.tokens, stats.tokens_in_chunks) == (2, 1, 20, 12)
    assert chunks[1].next_tokens[-1] == tokenizer.convert_tokens_to_ids("does")  # token 12 opens the dropped remainder


def make_chunks(n_docs: int, per_doc: int, seed: int) -> list[Chunk]:
    return [Chunk(d, c, "train", np.zeros(1, np.int32), np.zeros(1, np.int32), int(key))
            for d in range(n_docs)
            for c, key in enumerate(corpus.sample_keys(seed, d, np.arange(per_doc)))]


def test_sample_is_uniform_over_chunks():
    k, n_docs, per_doc, seeds = 20, 40, 5, 600
    hits = np.zeros((n_docs, per_doc))
    for seed in range(seeds):
        for chunk in corpus.sample_chunks(make_chunks(n_docs, per_doc, seed), k):
            hits[chunk.doc_id, chunk.chunk_id] += 1
    expected = seeds * k / (n_docs * per_doc)
    assert scipy_stats.chisquare(hits.ravel(), np.full(hits.size, expected)).pvalue > 1e-3


def test_sample_ignores_stream_order_and_is_sorted():
    chunks = make_chunks(30, 7, seed=9)
    shuffled = chunks[:]
    random.Random(0).shuffle(shuffled)
    first, second = corpus.sample_chunks(chunks, 25), corpus.sample_chunks(shuffled, 25)
    ids = [(c.doc_id, c.chunk_id) for c in first]
    assert ids == [(c.doc_id, c.chunk_id) for c in second] == sorted(ids) and len(ids) == 25
    smallest = sorted(chunks, key=lambda c: c.sample_key)[:25]
    assert set(ids) == {(c.doc_id, c.chunk_id) for c in smallest}


def test_document_split_fraction_and_forced_splits():
    splits = [corpus.document_split(d, None, 0.2, seed=4) for d in range(20000)]
    assert splits.count("test") / len(splits) == pytest.approx(0.2, abs=0.01)
    assert splits != [corpus.document_split(d, None, 0.2, seed=5) for d in range(20000)]
    assert corpus.document_split(3, "gen", 0.2, seed=4) == "gen"
    assert {corpus.document_split(d, None, 0.0, seed=4) for d in range(100)} == {"train"}


def texts_of(source: corpus.Source) -> list[tuple[int, str]]:
    return [(d.doc_id, d.text) for d in source.documents()]


def test_local_sources_txt_jsonl_parquet_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    pq.write_table(pa.table({"text": ["fifth", None, "sixth"], "x": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.md").write_text("not a source")
    open_ = lambda p: corpus.open_source(str(p), seed=0)  # noqa: E731
    assert texts_of(open_(tmp_path / "a.txt")) == [(0, "first doc"), (1, "second doc")]
    assert texts_of(open_(tmp_path / "b.jsonl")) == [(0, "third"), (1, "fourth")]
    assert texts_of(open_(tmp_path / "c.parquet")) == [(0, "fifth"), (1, "sixth")]
    assert [t for _, t in texts_of(open_(tmp_path))] == ["first doc", "second doc", "third", "fourth", "fifth", "sixth"]
    files = open_(tmp_path).describe()["files"]
    assert [f["path"].rsplit("/", 1)[1] for f in files] == ["a.txt", "b.jsonl", "c.parquet"]
    assert all(len(f["sha256"]) == 64 for f in files)


def test_hf_source_streams_local_files_through_datasets(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    rows = [{"content": f"document number {i}", "meta": i} for i in range(7)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = corpus.open_source(f"hf:{folder}", seed=0, text_column="content", split="train")
    assert texts_of(source) == [(i, f"document number {i}") for i in range(7)]
    assert source.describe()["kind"] == "hf"


@pytest.mark.parametrize("kind", ["files", "hf"])
def test_pieces_of_a_stream_read_in_order_give_the_stream(kind, tmp_path):
    (tmp_path / "data").mkdir()
    sizes, number = (4, 2, 5), 0
    for i, size in enumerate(sizes):
        rows = [{"text": f"document {number + j}"} for j in range(size)]
        (tmp_path / "data" / f"train-0000{i}-of-00003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        number += size
    source = corpus.open_source(f"hf:{tmp_path}" if kind == "hf" else str(tmp_path / "data"), seed=0)
    whole = texts_of(source)
    assert whole == [(i, f"document {i}") for i in range(11)]
    for max_documents in (None, 3, 4, 6, 11, 50):
        pieces = source.partitions(max_documents, 8)
        assert [doc for piece in pieces for doc in texts_of(piece)] == whole[:max_documents]
    calls = []

    def count_all(runs: list[corpus.Source]) -> list[int]:   # what Ray does in parallel tasks
        calls.append(len(runs))
        return [run.count_documents() for run in runs]
    pieces = source.partitions(None, 8, count_documents=count_all)
    assert calls == [3] and [piece.first_doc_id for piece in pieces] == [0, 4, 6]   # one piece per file
    if kind == "hf":   # runs of files: two pieces of 2 files and 1
        assert [piece.first_doc_id for piece in source.partitions(None, 2)] == [0, 6]


def test_qf_source_options_and_forced_gen_split():
    source = corpus.open_source("qf:documents=40,lines=4,gen=0.5", seed=1)
    docs = list(source.documents())
    assert len(docs) == 40 and all(d.text.count(qf.LINE_SEPARATOR) == 3 for d in docs)
    assert 5 < sum(d.split == "gen" for d in docs) < 35
    assert all(d.split in (None, "gen") for d in docs)


# ---------------------------------------------------------------- sources read through `datasets` (issue 24)

ROWS = [{"text": f"document {i} says {'ab' * i}", "label": "member" if i % 2 else "non-member", "n": i}
        for i in range(6)]
TEXTS = [r["text"] for r in ROWS]
LABELS = [r["label"] for r in ROWS]


def write_rows(path, rows=ROWS):
    """`rows` written in the format `path`'s name gives, with pandas, pyarrow and the standard library."""
    import bz2
    import gzip
    import lzma

    import pandas as pd

    name = path.name
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix)
    inner = name[: -len(path.suffix)] if opener else name
    text = (pd.DataFrame(rows).to_csv(index=False) if inner.endswith(".csv")
            else json.dumps(rows) if inner.endswith(".array.json") else lines)
    if inner.endswith(".arrow"):
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(path), table.schema) as writer:
            writer.write_table(table)
    elif opener:
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def labelled(source):
    return [(d.doc_id, d.text, d.label) for d in source.documents()]


@pytest.mark.parametrize("name", ["docs.csv", "docs.array.json", "docs.lines.json", "docs.jsonl.gz", "docs.jsonl.bz2",
                                  "docs.jsonl.xz", "docs.csv.gz", "docs.json.gz", "docs.arrow"])
def test_files_read_through_datasets_give_the_texts_written(tmp_path, name):
    path = write_rows(tmp_path / name)
    assert texts_of(corpus.open_source(str(path), seed=0)) == list(enumerate(TEXTS))
    by_label = corpus.open_source(str(path), seed=0, label_column="label")
    assert labelled(by_label) == [(i, t, label) for i, (t, label) in enumerate(zip(TEXTS, LABELS))]
    keyed = corpus.open_source(str(path), seed=0, text_column="label", label_column="n")
    assert labelled(keyed) == [(i, label, str(i)) for i, label in enumerate(LABELS)]


def test_save_to_disk_folder_is_read_in_row_order(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    source = corpus.open_source(str(tmp_path / "saved"), seed=0, label_column="label")
    assert labelled(source) == [(i, t, label) for i, (t, label) in enumerate(zip(TEXTS, LABELS))]
    described = [f["path"].rsplit("/", 1)[1] for f in source.describe()["files"]]
    assert "state.json" in described and "dataset_info.json" in described
    assert any(name.endswith(".arrow") for name in described)
    assert all(len(f["sha256"]) == 64 for f in source.describe()["files"])


def test_folder_mixes_formats_in_sorted_path_order(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    write_rows(tmp_path / "b.csv", ROWS[:2])
    datasets.Dataset.from_list(ROWS[2:4]).save_to_disk(str(tmp_path / "c_saved"))
    write_rows(tmp_path / "d.jsonl", ROWS[4:5])
    write_rows(tmp_path / "e.jsonl.gz", ROWS[5:])
    write_rows(tmp_path / "f.csv", [{"text": None, "n": 0}, {"text": "", "n": 1}, {"text": "last", "n": 2}])
    (tmp_path / "notes.md").write_text("not a source")
    source = corpus.open_source(str(tmp_path), seed=0)
    whole = texts_of(source)
    assert whole == list(enumerate(["first line", "second line", *TEXTS, "last"]))
    assert [p.name for p in source.paths] == ["a.txt", "b.csv", "c_saved", "d.jsonl", "e.jsonl.gz", "f.csv"]
    pieces = source.partitions(None, 8)   # one piece per file, a save_to_disk folder one piece
    assert [piece.first_doc_id for piece in pieces] == [0, 2, 4, 6, 7, 8]
    assert [doc for piece in pieces for doc in texts_of(piece)] == whole
    assert [doc for piece in source.partitions(5, 8) for doc in texts_of(piece)] == whole[:5]


def one_line_error(source):
    with pytest.raises(InputError) as error:
        list(source.documents())
    message = str(error.value)
    assert "\n" not in message
    return message


def test_datasets_sources_refuse_in_one_line(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "docs.csv")
    message = one_line_error(corpus.open_source(str(path), seed=0, text_column="body"))
    assert message == f"{path} has no column 'body'; columns are: text, label, n (choose one with --text-column)"
    message = one_line_error(corpus.open_source(str(path), seed=0, label_column="member"))
    assert "has no column 'member'" in message and "--split-column/--key-column" in message
    bad = {"bad.csv": 'text,n\n"never closed,1\n', "bad.json": '{"text": "x"\n', "bad.jsonl.gz": "not gzip",
           "bad.arrow": "not arrow"}
    logged = []   # what datasets logs (its loggers do not propagate to the root's): nothing besides our line
    handler = logging.Handler(logging.DEBUG)
    handler.emit = logged.append
    monkeypatch.setattr(logging.getLogger("datasets"), "handlers", [handler])
    for name, content in bad.items():
        (tmp_path / name).write_text(content)
        message = one_line_error(corpus.open_source(str(tmp_path / name), seed=0))
        assert message.startswith(f"{tmp_path / name} could not be read (by datasets"), message
        assert not [r.getMessage() for r in logged if r.levelno >= logging.WARNING]
    write_rows(tmp_path / "numbers.csv", [{"text": 3, "n": 1}])
    assert "numbers.csv row 1: 'text' is a number, not a string" in one_line_error(
        corpus.open_source(str(tmp_path / "numbers.csv"), seed=0))


def test_a_dataset_dict_folder_asks_for_one_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS[3:])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"DatasetDict saved with save_to_disk \(splits: test, train\); give one "
                                         r"split's folder"):
        corpus.open_source(str(tmp_path / "dd"), seed=0)
    assert texts_of(corpus.open_source(str(tmp_path / "dd" / "test"), seed=0)) == list(enumerate(TEXTS[3:]))


def test_unknown_suffix_is_refused_naming_what_is_read(tmp_path):
    (tmp_path / "docs.md").write_text("x")
    with pytest.raises(InputError, match=r"is not a .txt, .jsonl, .parquet, .csv, .json, .arrow"):
        corpus.open_source(str(tmp_path / "docs.md"), seed=0)


def test_offline_hub_id_fails_at_once_in_one_line():
    message = one_line_error(corpus.open_source("hf:no-such-owner/no-such-name", seed=0))   # HF_HUB_OFFLINE=1
    assert message.startswith("--source 'hf:no-such-owner/no-such-name': no local folder named "
                              "'no-such-owner/no-such-name' and the hub is not reachable (offline"), message


def test_unreachable_hub_fails_without_retrying(monkeypatch):
    import socket

    import huggingface_hub

    with socket.socket() as closed:   # a port nothing listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    loads = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a))
    message = one_line_error(corpus.open_source("hf:owner/name:cfg", seed=0))
    assert message.startswith(f"--source 'hf:owner/name:cfg': no local folder named 'owner/name' and the hub is "
                              f"not reachable (127.0.0.1:{port}: "), message
    assert loads == []   # refused before datasets could retry
