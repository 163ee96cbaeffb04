"""Shared fixtures: small GPT-2 models and text sources that the tests build themselves, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from memscan import qf  # noqa: E402


def save_gpt2(directory: Path, tokenizer, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64,
              seed: int = 0) -> Path:
    """A randomly initialized GPT-2 saved with `save_pretrained`, next to its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def qf_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 over the Question-Formation tokenizer."""
    return save_gpt2(tmp_path_factory.mktemp("qf_model"), qf.tokenizer())


@pytest.fixture(scope="session")
def bpe_model(tmp_path_factory) -> Path:
    """A GPT-2 with a byte-level BPE tokenizer trained here, for arbitrary (also non-ASCII) text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs; naïve café, Straße." for i in range(200)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    return save_gpt2(tmp_path_factory.mktemp("bpe_model"), tokenizer, n_positions=48)


def clustered(count: int, n: int, clusters: int, seed: int, spread: float = 0.15) -> np.ndarray:
    """`count` float32 vectors of dimension n around `clusters` Gaussian centres (noise `spread` of their spread)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, n))
    return (centers[rng.integers(0, clusters, count)] + spread * rng.normal(size=(count, n))).astype(np.float32)


def qf_lines(count: int, seed: int = 0) -> list[str]:
    """Question-Formation documents of `count` lines each, as plain text lines (one per document)."""
    config = qf.QFConfig(documents=count, lines_per_document=8, generalization_fraction=0.0)
    return [text.replace(qf.LINE_SEPARATOR, " <eos> ") for _, text, _ in qf.documents(config, seed)]


@pytest.fixture
def qf_jsonl(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(qf_lines(30))))
    return path
