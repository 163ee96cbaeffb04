"""Hostile input that used to reach the user as a traceback or be accepted as bad text: a table of cases.

Each row is a command line with the user's files, the fragment its one error line must hold, and the folder the
job would create: afterwards that folder does not exist and every other file is byte for byte as before.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memscan.cli import library_error_line, main
from tests.test_trust_data import one_line_error

EXTRACT = ("extract", "--model", "{model}", "--source", "{source}", "--out", "{out}",
           "--chunk-tokens", "8", "--dtype", "fp32", "--device", "cpu")
TRAIN = ("train", "--out", "{out}", "--source", "qf:documents=12,lines=16", "--tokens", "3000", "--context", "32",
         "--n-layer", "2", "--n-head", "4", "--test-fraction", "0.2", "--seed", "1", "--steps", "1",
         "--device", "cpu", "--dtype", "fp32")


def jsonl(*lines: str) -> dict[str, bytes]:
    """A user's docs.jsonl of these lines."""
    return {"docs.jsonl": "".join(line + "\n" for line in lines).encode()}


def parquet(column: pa.Array) -> dict[str, bytes]:
    """A user's docs.parquet whose 'text' column is `column`."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": column, "id": list(range(len(column)))}), buffer)
    return {"docs.parquet": buffer.getvalue()}


def not_utf8(values: list[bytes]) -> pa.Array:
    """A string column holding these bytes unchecked (another writer's Parquet, which pyarrow's own refuses)."""
    return pa.Array.from_buffers(pa.string(), len(values), pa.array(values, pa.binary()).buffers())


def out_of_memory_building(settings, tokenizer):
    """Instead of the GPT-2, a module whose weights (2**60 bytes) no machine allocates: a real torch error, at once."""
    return torch.nn.Embedding(2**28, 2**30)


GOOD = '{"text": "a first document, long enough for a chunk or two of tokens"}'

CASES = [  # id, the user's files, command line, fragment of the one error line, folder the job would create
    ("run-check-huge-layers", {}, ("run", "demo", "--check", "--set", "train.n_layer=100000000000"),
     "train.n_layer: --n-layer 100000000000 (with --n-embd", "demo"),
    ("assoc-sweep-huge-dims", {}, ("assoc", "sweep", "--out", "{out}", "--dims", "50,200,1e12"),
     "--dims 1000000000000 with --n-tokens 1000 needs an array of 1.0e+15 numbers", "out"),
    ("train-huge-n-embd", {}, (*TRAIN, "--n-embd", "1000000000000"),
     "--n-embd 1000000000000 (with --n-layer 2, --context 32) makes a model of about", "out"),
    ("train-model-rejected", {}, (*TRAIN, "--n-embd", "30"), "the model configuration was rejected", "out"),
    ("parquet-struct-column", parquet(pa.array([{"a": "x"}, {"a": "y"}])), EXTRACT,
     "docs.parquet: column 'text' is of type struct<a: string>, not a string", "out"),
    ("parquet-list-column", parquet(pa.array([["x"], ["y", "z"]])), EXTRACT,
     "docs.parquet: column 'text' is of type list<element: string>, not a string", "out"),
    ("parquet-int-column", parquet(pa.array([1, 2])), EXTRACT,
     "docs.parquet: column 'text' is of type int64, not a string", "out"),
    ("parquet-lone-surrogate", parquet(not_utf8([b"fine text", b"bad \xed\xa0\x80 text"])), EXTRACT,
     "docs.parquet row 2: 'text' is not valid UTF-8 text", "out"),
    ("jsonl-lone-surrogate", jsonl(GOOD, '{"text": "bad \\ud800 text"}'), EXTRACT,
     "docs.jsonl line 2: 'text' holds an unpaired surrogate \\ud800", "out"),
    ("jsonl-null", jsonl(GOOD, GOOD, '{"text": null}'), EXTRACT, "docs.jsonl line 3: 'text' is null, not a string",
     "out"),
    ("jsonl-list", jsonl(GOOD, '{"text": [1, 2, 3]}'), EXTRACT, "docs.jsonl line 2: 'text' is a list, not a string",
     "out"),
    ("jsonl-number", jsonl('{"text": 7}'), EXTRACT, "docs.jsonl line 1: 'text' is a number, not a string", "out"),
]


def digests(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders: what must not change."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("user_files", "args", "expected", "folder"),
                         [pytest.param(*row[1:], id=row[0]) for row in CASES])
def test_hostile_input_is_one_line_and_leaves_nothing(user_files, args, expected, folder, tmp_path, request,
                                                      capsys, monkeypatch):
    monkeypatch.delenv("MEMSCAN_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    for name, data in user_files.items():
        (tmp_path / name).write_bytes(data)
    model = request.getfixturevalue("bpe_model") if "{model}" in args else tmp_path
    source = tmp_path / next(iter(user_files), "")
    command = [a.format(model=model, source=source, out=tmp_path / folder) for a in args]
    before = digests(tmp_path, model)
    assert expected in one_line_error(capsys, *command)
    assert not (tmp_path / folder).exists()
    assert digests(tmp_path, model) == before


def test_torch_running_out_of_memory_is_one_line_and_the_new_run_folder_goes(tmp_path, capsys, monkeypatch):
    """The safety net: a model that passes the size check but cannot be allocated (simulated at once)."""
    monkeypatch.delenv("MEMSCAN_DEBUG", raising=False)
    monkeypatch.setattr("memscan.train.build_model", out_of_memory_building)
    line = one_line_error(capsys, *[a.format(out=tmp_path / "out") for a in TRAIN], "--n-embd", "32")
    assert "out of memory (DefaultCPUAllocator" in line and "lower --n-embd, --n-layer, --context" in line
    assert not (tmp_path / "out").exists()


def test_memscan_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSCAN_DEBUG", "1")
    monkeypatch.setattr("memscan.train.build_model", out_of_memory_building)
    with pytest.raises(RuntimeError, match="allocate"):
        main([a.format(out=tmp_path / "out") for a in TRAIN] + ["--n-embd", "32"])


def test_a_runtime_error_of_memscan_itself_keeps_its_traceback(tmp_path, monkeypatch):
    """Only errors raised in torch or a tokenizer are shown as one line: memscan's own are bugs."""
    def bug(settings, tokenizer):
        raise RuntimeError("a bug in memscan")

    monkeypatch.delenv("MEMSCAN_DEBUG", raising=False)
    monkeypatch.setattr("memscan.train.build_model", bug)
    with pytest.raises(RuntimeError, match="a bug in memscan"):
        main([a.format(out=tmp_path / "out") for a in TRAIN] + ["--n-embd", "32"])


def test_a_tokenizer_error_is_one_line(bpe_model):
    """The safety net behind the readers' checks: what a tokenizer raises on text it cannot encode."""
    from transformers import AutoTokenizer

    with pytest.raises(Exception) as raised:
        AutoTokenizer.from_pretrained(bpe_model)(["fine", "bad \ud800"])
    assert library_error_line(raised.value, "extract").startswith("the tokenizer failed: ")
