"""`memscan demo`: the whole pipeline on the built-in default, offline, on a CPU.

Generates the Question-Formation corpus, trains a small GPT-2 on a token budget of it,
extracts the activations of exactly its training and held-out chunks, indexes the
training ones, queries with the held-out ones, measures norm growth and saturation, and
writes the report. Each stage writes to its own folder under `out`; a rerun reuses
every finished stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan import query, report, saturation, train
from memscan.extract import ExtractSettings, extract
from memscan.knn import index as knn_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo runs; `quick` is the test suite's size."""

    source: str
    train_tokens: int
    epochs: float
    n_layer: int
    n_embd: int
    context: int
    batch_size: int
    lr: float
    k: int


FULL = DemoSize(source="qf", train_tokens=300_000, epochs=4, n_layer=4, n_embd=128, context=64, batch_size=32, lr=3e-3, k=10)
QUICK = DemoSize(source="qf:lines=16", train_tokens=12_000, epochs=1, n_layer=2, n_embd=32, context=32, batch_size=16, lr=1e-2, k=5)


@dataclass(frozen=True)
class DemoResult:
    train: dict[str, Any]
    dataset_dir: Path
    manifest: dict[str, Any]
    run_dir: Path
    summary: dict[str, Any]
    saturation: dict[str, Any]
    report: Path


def run(out: str | Path, quick: bool = False, seed: int = 0) -> DemoResult:
    """Train, extract, index, query, analyse saturation and report; returns every stage's result."""
    out = Path(out)
    size = QUICK if quick else FULL
    trained = train.train(train.TrainSettings(
        source=size.source, tokens=size.train_tokens, n_layer=size.n_layer, n_embd=size.n_embd, n_head=4,
        context=size.context, batch_size=size.batch_size, epochs=size.epochs, lr=size.lr, warmup_steps=20,
        eval_every=50, seed=seed), out / "train")
    data = trained["data"]
    dataset_dir = out / "activations"
    manifest = extract(ExtractSettings(
        model=trained["final"], source=data["source"], max_documents=data["documents"], chunk_tokens=data["context"],
        test_fraction=data["test_fraction"], seed=data["seed"], layers="all", positions="last"), dataset_dir)
    index_dir, run_dir = out / "index", out / "run"
    if not (index_dir / knn_index.INFO_FILE).exists():
        knn_index.build(dataset_dir, index_dir, knn_index.IndexSettings(seed=seed))
    if (run_dir / query.SUMMARY).exists():
        summary = query.load(run_dir).summary
    else:
        summary = query.run(index_dir, dataset_dir, run_dir, query.QuerySettings(seed=seed, k=size.k))
    saturation_dir = run_dir / "saturation"
    if (saturation_dir / saturation.SUMMARY).exists():
        saturated = saturation.read_summary(saturation_dir)
    else:
        saturated = saturation.analyse(str(out / "train"), str(saturation_dir),
                                       saturation.SaturationSettings(chunks=4, seed=seed))
    return DemoResult(trained, dataset_dir, manifest, run_dir, summary, saturated, report.render(run_dir))
