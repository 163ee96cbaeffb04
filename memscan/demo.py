"""`memscan demo`: the whole pipeline on the built-in default, offline, on a CPU.

The Question-Formation corpus and a small GPT-2 that the demo builds and saves itself,
then extract, index, query and report; each stage writes to its own folder under `out`
and a rerun reuses finished stages.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan import qf, query, report
from memscan.extract import ExtractSettings, extract
from memscan.knn import index as knn_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo runs; `quick` is the test suite's size."""

    qf_documents: int
    num_chunks: int
    chunk_tokens: int = 64
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4


FULL = DemoSize(qf_documents=qf.QFConfig().documents, num_chunks=4096)
QUICK = DemoSize(qf_documents=40, num_chunks=256, n_layer=2, n_embd=32)


@dataclass(frozen=True)
class DemoResult:
    model_dir: Path
    dataset_dir: Path
    manifest: dict[str, Any]
    index_dir: Path
    run_dir: Path
    summary: dict[str, Any]
    report: Path


def build_model(directory: Path, size: DemoSize, seed: int = 0) -> Path:
    """A GPT-2 over the Question-Formation tokenizer, saved with `save_pretrained` (reused if present)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (directory / "config.json").exists() and (directory / "model.safetensors").exists():
        return directory
    tokenizer = qf.tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(128, size.chunk_tokens), n_embd=size.n_embd,
        n_layer=size.n_layer, n_head=size.n_head, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    GPT2LMHeadModel(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)
    log.info("built a %d-layer GPT-2 (n=%d) over the Question-Formation vocabulary in %s",
             size.n_layer, size.n_embd, directory)
    return directory


def run(out: str | Path, quick: bool = False, seed: int = 0) -> DemoResult:
    """Build the model, extract its activations, index the train split, query with the test split, report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = QUICK if quick else FULL
    model_dir = build_model(out / "model", size, seed)
    settings = ExtractSettings(
        model=str(model_dir), source=f"qf:documents={size.qf_documents}", num_chunks=size.num_chunks,
        chunk_tokens=size.chunk_tokens, layers="all", positions="last", seed=seed,
    )
    dataset_dir = out / "activations"
    manifest = extract(settings, dataset_dir)
    index_dir, run_dir = out / "index", out / "run"
    if not (index_dir / knn_index.INFO_FILE).exists():
        knn_index.build(dataset_dir, index_dir, knn_index.IndexSettings(seed=seed))
    if (run_dir / query.SUMMARY).exists():
        summary = query.load(run_dir).summary
    else:
        summary = query.run(index_dir, dataset_dir, run_dir, query.QuerySettings(seed=seed, k=5 if quick else 10))
    return DemoResult(model_dir, dataset_dir, manifest, index_dir, run_dir, summary, report.render(run_dir))
