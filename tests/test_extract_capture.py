"""Stored activations and losses equal what the Hugging Face model returns for the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memscan.extract import ExtractSettings, extract
from memscan.store import ActivationDataset
from tests.conftest import qf_lines

CHUNK = 32


def reference_chunks(texts: list[str], tokenizer, length: int) -> dict[tuple[int, int], tuple[list[int], int]]:
    """(doc_id, chunk_id) -> (tokens, next token or -1), cut independently of memscan.corpus."""
    chunks = {}
    for doc_id, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for c in range(len(ids) // length):
            stop = (c + 1) * length
            chunks[(doc_id, c)] = (ids[c * length: stop], ids[stop] if stop < len(ids) else -1)
    return chunks


def read_all(directory) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    columns = ("row_id", "doc_id", "chunk_id", "position", "token_id", "next_token_id", "nll", "split", "layer")
    blocks = list(ActivationDataset(directory).iter_batches(columns=columns, batch_rows=50))
    return np.concatenate([b[0] for b in blocks]), {c: np.concatenate([b[1][c] for b in blocks]) for c in columns}


@pytest.mark.parametrize("positions,expected_positions", [
    ("last", [CHUNK - 1]), ("all", list(range(CHUNK))), ("every:5", [4, 9, 14, 19, 24, 29]),
])
def test_vectors_and_losses_match_hugging_face(tmp_path, qf_model, positions, expected_positions):
    texts = qf_lines(12)
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(texts) + "\n")
    settings = ExtractSettings(model=str(qf_model), source=str(source), chunk_tokens=CHUNK, layers="1,-1",
                               positions=positions, dtype="fp32", vec_dtype="float32", batch_size=3,
                               shard_rows=37, test_fraction=0.3)
    manifest = extract(settings, tmp_path / "out")
    vec, meta = read_all(tmp_path / "out")

    model = AutoModelForCausalLM.from_pretrained(qf_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(qf_model)
    chunks = reference_chunks(texts, tokenizer, CHUNK)
    assert manifest["layers"] == [1, 2]
    assert len(vec) == len(chunks) * 2 * len(expected_positions)
    assert np.array_equal(meta["row_id"], np.arange(len(vec)))

    row = 0
    for (doc_id, chunk_id), (tokens, following) in sorted(chunks.items()):
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_hidden_states=True)
        log_probs = torch.log_softmax(out.logits[0].double(), dim=-1)
        next_tokens = tokens[1:] + [following]
        for layer in (1, 2):
            for p in expected_positions:
                assert (meta["doc_id"][row], meta["chunk_id"][row]) == (doc_id, chunk_id)
                assert (meta["layer"][row], meta["position"][row]) == (layer, p)
                assert meta["token_id"][row] == tokens[p]
                assert meta["next_token_id"][row] == next_tokens[p]
                np.testing.assert_allclose(vec[row], out.hidden_states[layer][0, p].numpy(), rtol=1e-5, atol=1e-5)
                if next_tokens[p] < 0:
                    assert np.isnan(meta["nll"][row])
                else:
                    assert meta["nll"][row] == pytest.approx(-log_probs[p, next_tokens[p]].item(), rel=1e-5)
                row += 1
    # whole documents go to one split
    splits = {}
    for doc_id, split in zip(meta["doc_id"], meta["split"]):
        assert splits.setdefault(doc_id, split) == split
    assert set(splits.values()) == {"train", "test"}


def test_no_loss_stores_nan_and_bf16_stays_close(tmp_path, qf_model):
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(qf_lines(4)) + "\n")
    common = dict(model=str(qf_model), source=str(source), chunk_tokens=CHUNK, positions="all")
    extract(ExtractSettings(**common, dtype="fp32", vec_dtype="float32"), tmp_path / "fp32")
    manifest = extract(ExtractSettings(**common, dtype="bf16", loss=False), tmp_path / "bf16")
    assert (manifest["dtype"], manifest["vec_dtype"]) == ("bf16", "float16")
    exact, _ = read_all(tmp_path / "fp32")
    approx, meta = read_all(tmp_path / "bf16")
    assert np.isnan(meta["nll"]).all()
    relative = np.linalg.norm(approx - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert np.median(relative) < 0.03
