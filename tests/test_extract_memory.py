"""`extract` on inputs the caller holds: a loaded model and tokenizer, a list of texts, a datasets.Dataset or
IterableDataset; recorded by name, identified by content, resumed like any other extraction."""

from __future__ import annotations

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memscan import store
from memscan.errors import InputError
from memscan.extract import ExtractSettings, extract

TEXTS = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs; naïve café." * (1 + i % 3)
         for i in range(10)]


def _settings(model: str = "held", source: str = "held", **overrides) -> ExtractSettings:
    base = dict(model=model, source=source, chunk_tokens=8, layers="0,2", positions="every:4", batch_size=2,
                shard_rows=16, seed=3, dtype="fp32")
    return ExtractSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def held(bpe_model):
    return AutoModelForCausalLM.from_pretrained(bpe_model), AutoTokenizer.from_pretrained(bpe_model)


def _vectors(folder) -> list:
    return pq.read_table(sorted(folder.glob("vectors/*.parquet"))).column("vec").to_pylist()


def test_a_held_model_and_list_give_the_rows_of_the_same_model_and_texts_on_disk(held, bpe_model, tmp_path):
    model, tokenizer = held
    (tmp_path / "docs.txt").write_text("\n".join(TEXTS) + "\n")
    on_disk = extract(_settings(str(bpe_model), str(tmp_path / "docs.txt")), tmp_path / "disk")
    in_memory = extract(_settings(), tmp_path / "memory", model=model, tokenizer=tokenizer, source=TEXTS)
    assert in_memory["settings"]["model"] == str(bpe_model) and in_memory["settings"]["source"] == "list of 10 texts"
    assert in_memory["model"]["parameters_sha256"] and in_memory["source"]["kind"] == "texts"
    assert in_memory["counts"] == on_disk["counts"] and store.verify(tmp_path / "memory") == []
    assert torch.allclose(torch.tensor(_vectors(tmp_path / "memory")), torch.tensor(_vectors(tmp_path / "disk")),
                          atol=1e-5)


def test_a_rerun_finds_it_a_changed_input_is_another_job_and_a_cut_run_resumes(held, tmp_path):
    model, tokenizer = held
    out = tmp_path / "memory"
    first = extract(_settings(), out, model=model, tokenizer=tokenizer, source=TEXTS)
    stamp = (out / store.MANIFEST).stat().st_mtime_ns
    assert extract(_settings(), out, model=model, tokenizer=tokenizer, source=list(TEXTS)) == first
    assert (out / store.MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="holds another extraction"):
        extract(_settings(), out, model=model, tokenizer=tokenizer, source=[*TEXTS[:-1], "changed"])
    cut = dict(store.read_manifest(out))
    for key in ("counts", "corpus"):
        cut.pop(key)
    whole = {p.name: p.read_bytes() for p in out.glob("*/*.parquet")}
    for entry in cut["shards"][1:] + cut["chunk_tables"]:
        (out / entry["name"]).unlink()
    store.write_manifest(out, {**cut, "complete": False, "shards": cut["shards"][:1], "chunk_tables": []})
    extract(_settings(), out, model=model, tokenizer=tokenizer, source=TEXTS)
    assert {p.name: p.read_bytes() for p in out.glob("*/*.parquet")} == whole and store.verify(out) == []


def test_changed_weights_are_another_job(held, tmp_path):
    model, tokenizer = held
    extract(_settings(), tmp_path / "a", model=model, tokenizer=tokenizer, source=TEXTS)
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1.0
    try:
        with pytest.raises(InputError, match="holds another extraction"):
            extract(_settings(), tmp_path / "a", model=model, tokenizer=tokenizer, source=TEXTS)
    finally:
        with torch.no_grad():
            model.transformer.wte.weight[0, 0] -= 1.0


def test_a_dataset_and_an_iterable_dataset_with_their_keys(held, bpe_model, tmp_path):
    rows = datasets.Dataset.from_dict({"text": TEXTS, "id": [f"doc{i}" for i in range(len(TEXTS))]})
    for name, source in (("dataset", rows), ("iterable", rows.to_iterable_dataset())):
        result = extract(_settings(model=str(bpe_model)), tmp_path / name, source=source)
        chunks = store.read_chunk_table(tmp_path / name)
        assert chunks["doc_key"].tolist() == [f"doc{d}" for d in chunks["doc_id"]]
        assert result["settings"]["source"].startswith(f"datasets.{type(source).__name__}")
    assert store.read_manifest(tmp_path / "dataset")["source"]["sha256"] == rows._fingerprint


def test_bad_inputs_are_one_line(held, bpe_model, tmp_path):
    model, tokenizer = held
    with pytest.raises(InputError, match="needs its tokenizer"):
        extract(_settings(), tmp_path / "x", model=model, source=TEXTS)
    with pytest.raises(InputError, match="list source must hold strings"):
        extract(_settings(model=str(bpe_model)), tmp_path / "x", source=["a", 3])
    with pytest.raises(InputError, match="got dict"):
        extract(_settings(model=str(bpe_model)), tmp_path / "x", source={"text": "a"})
    with pytest.raises(InputError, match="list of texts has no columns"):
        extract(_settings(model=str(bpe_model), id_column="id"), tmp_path / "x", source=TEXTS)
