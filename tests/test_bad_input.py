"""Every bad input gets one line on stderr, exit code 1, and loses nothing already written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memscan import store
from memscan.cli import main
from tests.conftest import qf_lines


def run(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def fails(capsys, *args: str, match: str) -> str:
    code, err = run(capsys, *args)
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert "Traceback" not in err and last.startswith("memscan: error: ") and match in last, err
    return last


@pytest.fixture
def txt(tmp_path) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(qf_lines(6)) + "\n")
    return path


def extract_args(model: Path, source: Path | str, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", str(model), "--source", str(source), "--out", str(out), "--chunk-tokens", "32", *extra]


def test_missing_source_path(capsys, qf_model, tmp_path):
    fails(capsys, *extract_args(qf_model, tmp_path / "nope.txt", tmp_path / "out"), match="does not exist")


def test_missing_model_folder(capsys, txt, tmp_path):
    fails(capsys, *extract_args(Path("./no/such/model"), txt, tmp_path / "out"), match="does not exist")


def test_unknown_hub_model(capsys, txt, tmp_path):
    fails(capsys, *extract_args(Path("memscan-nobody/no-such-model"), txt, tmp_path / "out"),
          match="could not load model 'memscan-nobody/no-such-model'")


def test_unknown_hub_dataset(capsys, qf_model, tmp_path):
    fails(capsys, *extract_args(qf_model, "hf:memscan-nobody/no-such-data", tmp_path / "out"),
          match="could not read dataset 'memscan-nobody/no-such-data'")


def test_chunk_longer_than_the_context(capsys, qf_model, txt, tmp_path):
    fails(capsys, *extract_args(qf_model, txt, tmp_path / "out"), "--chunk-tokens", "100",
          match="longer than the model's context of 64 tokens")


def test_empty_corpus(capsys, qf_model, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    fails(capsys, *extract_args(qf_model, tmp_path / "empty.txt", tmp_path / "out"), match="holds no documents")


def test_no_document_long_enough(capsys, qf_model, tmp_path):
    (tmp_path / "short.txt").write_text("the newt does giggle .\nsome yaks do swim .\n")
    fails(capsys, *extract_args(qf_model, tmp_path / "short.txt", tmp_path / "out"),
          match="no document of --source")


def test_missing_text_column_jsonl_and_parquet(capsys, qf_model, tmp_path, qf_jsonl):
    fails(capsys, *extract_args(qf_model, qf_jsonl, tmp_path / "out"), match="has no column 'text'")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    fails(capsys, *extract_args(qf_model, tmp_path / "t.parquet", tmp_path / "out"), match="has no column 'text'")


def test_text_column_option_reads_the_named_column(capsys, qf_model, tmp_path, qf_jsonl):
    code, err = run(capsys, *extract_args(qf_model, qf_jsonl, tmp_path / "out"), "--text-column", "body")
    assert code == 0, err


def test_non_utf8_file(capsys, qf_model, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    fails(capsys, *extract_args(qf_model, tmp_path / "latin1.txt", tmp_path / "out"), match="is not UTF-8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_a_gpu(capsys, qf_model, txt, tmp_path):
    fails(capsys, *extract_args(qf_model, txt, tmp_path / "out"), "--device", "cuda", match="no CUDA device")


def test_output_folder_holding_another_run(capsys, qf_model, txt, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, *extract_args(qf_model, txt, out))[0] == 0
    manifest_before = (out / store.MANIFEST).read_text()
    fails(capsys, *extract_args(qf_model, txt, out), "--seed", "1", match="holds another extraction")
    assert (out / store.MANIFEST).read_text() == manifest_before and store.verify(out) == []
    assert run(capsys, *extract_args(qf_model, txt, out), "--seed", "1", "--overwrite")[0] == 0
    assert json.loads((out / store.MANIFEST).read_text())["seed"] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    fails(capsys, *extract_args(qf_model, txt, foreign), match="holds files memscan did not write (notes.md)")
    assert (foreign / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("flag,value,match", [
    ("--num-chunks", "0", "--num-chunks must be at least 1"),
    ("--num-chunks", "100000", "more than the"),
    ("--test-fraction", "1.5", "--test-fraction must be in [0, 1)"),
    ("--layers", "7", "out of range"),
    ("--layers", "x", "--layers must be"),
    ("--positions", "every:0", "--positions must be"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
])
def test_settings_out_of_range(capsys, qf_model, txt, tmp_path, flag, value, match):
    fails(capsys, *extract_args(qf_model, txt, tmp_path / "out"), flag, value, match=match)


def test_nan_activations_are_reported_and_earlier_shards_kept(capsys, qf_model, tmp_path):
    poisoned = tmp_path / "poisoned"
    model = AutoModelForCausalLM.from_pretrained(qf_model)
    tokenizer = AutoTokenizer.from_pretrained(qf_model)
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.convert_tokens_to_ids("zebra")] = float("nan")
    model.save_pretrained(poisoned)
    tokenizer.save_pretrained(poisoned)
    clean = " ".join(["the newt does giggle ."] * 8)
    (tmp_path / "docs.txt").write_text("\n".join([clean] * 6 + [clean.replace("newt", "zebra", 1)]) + "\n")
    out = tmp_path / "out"
    last = fails(capsys, *extract_args(poisoned, tmp_path / "docs.txt", out), "--batch-size", "1",
                 "--shard-rows", "1", "--test-fraction", "0", match="NaN or Inf activations")
    assert "doc 6 chunk 0" in last
    manifest = json.loads((out / store.MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 6
    assert store.verify(out) == ["the dataset is incomplete (extraction did not finish)"]


def test_verify_and_info_on_a_folder_that_is_not_a_dataset(capsys, tmp_path):
    fails(capsys, "verify", str(tmp_path), match="is not a memscan folder of any kind")
    fails(capsys, "info", str(tmp_path / "missing"), match="is not a folder")
