"""The stage registry: every stage has its command, its folder kind a reader, and its compute function a typed
result that carries its record and reads its tables."""

from __future__ import annotations

import click

from memscan import catalog, folders, stages
from memscan.cli import COMMANDS, cli
from memscan.extract import ExtractResult, ExtractSettings
from memscan.knn.index import IndexResult, IndexSettings
from memscan.query import QueryResult, QuerySettings
from memscan.results import StageResult


def test_every_stage_has_its_command_and_its_kind_a_reader():
    assert set(stages.STAGES) <= set(COMMANDS)
    for stage in stages.STAGES.values():
        assert stage.kind in catalog.READERS or stage.kind.attached, stage.name
        if stage.name != "report":
            assert stages.writing(stage.kind) is stage


def test_every_documented_settings_field_is_an_option_of_its_command():
    context = click.Context(cli)
    for stage in stages.STAGES.values():
        if stage.settings is None or stage.name not in ("index", "query"):
            continue
        command = cli.get_command(context, stage.name)
        names = {param.name for param in command.params}
        documented = {field for field, spec in stage.settings.__dataclass_fields__.items() if "help" in spec.metadata}
        assert documented <= names, stage.name


def test_the_compute_functions_return_typed_results_with_their_tables(qf_model, tmp_path):
    settings = ExtractSettings(model=str(qf_model), source="qf:documents=12,lines=16", chunk_tokens=32,
                               layers="all", batch_size=4, test_fraction=0.3, seed=6, dtype="fp32", device="cpu")
    dataset = stages.STAGES["extract"].compute(settings, tmp_path / "data")
    index = stages.STAGES["index"].compute(tmp_path / "data", tmp_path / "index", IndexSettings())
    run = stages.STAGES["query"].compute(tmp_path / "index", tmp_path / "data", tmp_path / "run",
                                         QuerySettings(k=3, device="cpu"))
    for result, cls, kind in ((dataset, ExtractResult, folders.DATASET), (index, IndexResult, folders.INDEX),
                              (run, QueryResult, folders.QUERY_RUN)):
        assert isinstance(result, cls) and isinstance(result, StageResult) and result.kind == kind
        assert dict(result) == folders.read_record(result.folder, kind)   # the result is its folder's record
    assert sum(dataset.counts["rows"].values()) == sum(len(part) for part in
                                                        (dataset.table(name) for name in dataset.table_names
                                                         if name.startswith("part-")))
    assert index.ntotal == dataset.counts["rows"]["train"] // 3   # three layers stored, the last one indexed
    assert [layer["layer"] for layer in run.layers] == [0, 1, 2]
    assert len(run.table("neighbours")) == dataset.counts["chunks"]["test"] * 3 * 3   # queries x layers x k
