"""`memscan demo`: the shipped demo experiment (experiments/demo.toml), offline, on a CPU.

Trains a small GPT-2 on the Question-Formation language, extracts the activations of
exactly its training and held-out chunks, indexes the training ones, queries with the
held-out ones, measures norm growth and saturation, and writes the report. Each stage
writes to its own folder under `out` (train, activations, index, run, run/saturation); a
rerun reuses every finished stage (`memscan run`'s stages.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan import experiments
from memscan.experiments.tables import FOLDERS

EXPERIMENT = "demo"
# The test suite's size: seconds on a CPU (the header of experiments/demo.toml gives the same line).
QUICK = ("source.id=qf:lines=16",
         "train={tokens=12000, epochs=1, n_layer=2, n_embd=32, context=32, batch_size=16, lr=1e-2}",
         "query.k=5")
SEEDED = ("train", "index", "query", "saturation")   # the extraction takes the training run's seed


@dataclass(frozen=True)
class DemoResult:
    train: dict[str, Any]
    dataset_dir: Path
    manifest: dict[str, Any]
    run_dir: Path
    summary: dict[str, Any]
    saturation: dict[str, Any]
    report: Path


def settings(quick: bool = False, seed: int = 0) -> tuple[str, ...]:
    """The --set overrides of a demo run: QUICK's for `quick`, and the seed of every seeded stage."""
    return (*(QUICK if quick else ()), *(f"{stage}.seed={seed}" for stage in SEEDED))


def run(out: str | Path, quick: bool = False, seed: int = 0) -> DemoResult:
    """Train, extract, index, query, analyse saturation and report; returns every stage's result."""
    outcome, = experiments.run(experiments.load(EXPERIMENT, settings(quick, seed)), out)
    return result_of(outcome)


def result_of(outcome: experiments.Outcome) -> DemoResult:
    """The demo's results from its experiment's outcome: each stage's record and the folders it wrote."""
    records = outcome.records
    return DemoResult(records["train"], outcome.folder / FOLDERS["extract"], records["extract"],
                      outcome.folder / FOLDERS["query"], records["query"], records["saturation"],
                      Path(records["report"]))
