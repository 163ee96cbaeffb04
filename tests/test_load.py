"""`memscan.load` on every folder kind: the typed result the kind's stage returns, its tables pandas DataFrames
read when first asked for and checked against the record, its typed properties read from the record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import memscan
from memscan import catalog, folders, query, saturation, score, train
from memscan.assoc import SweepResult
from memscan.errors import DataError, InputError
from memscan.extract import ExtractResult
from memscan.knn.index import IndexResult
from memscan.verbatim import VerbatimResult
from tests.fixtures import make_fixtures

CLASSES = {"dataset": ExtractResult, "index": IndexResult, "run": query.QueryResult, "scores": score.ScoreResult,
           "verbatim": VerbatimResult, "training": train.TrainResult, "saturation": saturation.SaturationResult,
           "assoc": SweepResult, "experiment": catalog.ExperimentResult}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("load") / "kinds"
    make_fixtures.main(root)
    return root


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_kind_loads_as_the_class_its_stage_returns(kinds, name):
    loaded = memscan.load(kinds / name)
    assert type(loaded) is CLASSES[name]
    kind, _ = folders.detect(kinds / name)
    assert loaded.kind is kind and dict(loaded) == folders.read_record(kinds / name, kind)
    assert loaded.table_names and all(isinstance(loaded.table(t), pd.DataFrame) for t in loaded.table_names)


def test_a_query_run_reads_its_tables_when_asked_and_checks_them(kinds, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(kinds / "run", copy)
    run = memscan.load(copy)
    on_disk = pq.read_table(copy / "neighbours.parquet").to_pandas()
    pd.testing.assert_frame_equal(run.neighbours, on_disk)
    assert run.summary == json.loads((copy / "summary.json").read_text()) and run.settings["k"] == 3
    assert run.table("neighbours") is run.neighbours   # read once
    assert (run.at_site(run.site).queries.site == run.site).all()
    data = bytearray((copy / "queries.parquet").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "queries.parquet").write_bytes(bytes(data))
    damaged = memscan.load(copy)   # nothing read yet: the record is sound
    with pytest.raises(DataError, match="queries.parquet fails its sha256 checksum"):
        damaged.queries
    with pytest.raises(AttributeError, match="has no attribute or table 'nope' .*neighbours, queries"):
        damaged.nope


def test_typed_properties_read_the_record(kinds):
    scores = memscan.load(kinds / "scores")
    metrics = scores.table("metrics")
    assert dict(zip(metrics.score, metrics.member_when)).items() <= scores.orientation.items()   # those rated
    assert scores.orientation["loss"] == "smaller" and scores.scores.num_rows == len(scores.table("scores"))
    assert scores.table("scores").loss.to_numpy().tolist() == scores.scores.column("loss").to_pylist()
    dataset = memscan.load(kinds / "dataset")
    assert dataset.rows == sum(len(dataset.table(t)) for t in dataset.table_names if t.startswith("part-"))
    assert len(dataset.table("chunks")) == sum(dataset.counts["chunks"].values())
    training = memscan.load(kinds / "training")
    assert training.table("checkpoints").step.tolist()[-1] == training.steps
    index = memscan.load(kinds / "index")
    assert index.ntotal == dataset.counts["rows"]["train"] // 3 and index.factory == "Flat"


def test_an_experiment_loads_its_stage_folders_by_name(kinds):
    experiment = memscan.load(kinds / "experiment")
    assert {"run", "index"} <= set(experiment.folder_names)
    run = experiment.load("run")
    assert isinstance(run, query.QueryResult) and run.folder == kinds / "experiment" / "run"
    assert set(experiment.table("stages").stage) == set(experiment.fingerprints)
    with pytest.raises(InputError, match="has no folder 'nope' \\(it has: .*run"):
        experiment.load("nope")
