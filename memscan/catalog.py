"""Every kind of memscan folder as a reader sees it: its checks, its one-line description, its tables.

`memscan verify`, `memscan info` and `memscan.load` find the kind by its record
(memscan.folders.detect) and answer with that kind's `Reader`:
the generic checks every record gets (signature, each listed file's size and sha256, the
records attached beside it) plus the kind's own (a dataset's shard contents, an index's
dataset, a training run's checkpoints, an experiment's stage folders). `load` returns the typed result the kind's stage returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from memscan import assoc, files, folders, query, saturation, score, store, train, verbatim
from memscan.errors import DataError, InputError, MemscanError
from memscan.extract import ExtractResult
from memscan.knn import index
from memscan.results import Loader, StageResult


@dataclass(frozen=True)
class Reader:
    """How one kind is read (its record, with the kind's own shape checks), checked, described and loaded (as
    `result`, the class its stage returns, with `tables`: its tables beyond the listed Parquet files); the
    last three take the folder and its sound record."""

    read: Callable[[Path], dict[str, Any]]
    problems: Callable[[Path, dict[str, Any]], list[str]]
    describe: Callable[[Path, dict[str, Any]], str]
    result: type[StageResult]
    tables: Callable[[Path, dict[str, Any]], dict[str, Loader]] = lambda directory, record: {}


@dataclass(frozen=True, eq=False)
class ExperimentResult(StageResult):
    """A `memscan run` experiment folder: its stages.json, and each stage folder loaded by name (`load("run")`)."""

    kind = folders.EXPERIMENT

    @property
    def fingerprints(self) -> dict[str, str]:
        """Each stage done, with the fingerprint of the settings it ran with."""
        return dict(self.record.get("stages", {}))

    @property
    def folder_names(self) -> list[str]:
        """The stage (or variant) folders the experiment owns (older records: its subfolders that hold a record)."""
        if "folders" in self.record:
            return list(self.record["folders"])
        return sorted(path.name for path in self.folder.iterdir() if path.is_dir() and _holds_record(path))

    def load(self, name: str) -> StageResult:
        """One stage folder of the experiment, loaded as its kind (`memscan.load`)."""
        if name not in self.folder_names:
            raise InputError(f"the experiment in '{self.folder}' has no folder '{name}' "
                             f"(it has: {', '.join(self.folder_names) or 'none'})")
        return load(self.folder / name)


def _holds_record(directory: Path) -> bool:
    try:
        folders.detect(directory)
    except MemscanError:
        return False
    return True


# ---------------------------------------------------------------- the generic parts


def _listed(directory: Path, record: dict[str, Any], kind: folders.Kind) -> list[str]:
    """The listed files' problems and those of the records attached beside this one (report, fit)."""
    return folders.listed_problems(directory, kind, record) + _attached_problems(directory)


def _attached_problems(directory: Path) -> list[str]:
    """Problems of the records attached beside a folder's own (a report, a fit) and of the files they list."""
    problems = []
    for attached in folders.ATTACHED:
        if (directory / attached.record).exists():
            try:
                problems += folders.listed_problems(directory, attached, folders.read_record(directory, attached))
            except MemscanError as exc:
                problems.append(files.first_line(exc))
    return problems


def _generic(kind: folders.Kind) -> Callable[[Path, dict[str, Any]], list[str]]:
    return lambda directory, record: _listed(directory, record, kind)


def _record(kind: folders.Kind) -> Callable[[Path], dict[str, Any]]:
    return lambda directory: folders.read_record(directory, kind)


def _frame(rows: list[dict[str, Any]]) -> Loader:
    return lambda: pd.DataFrame(rows)


# ---------------------------------------------------------------- the kinds' own parts


def _dataset_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    return store.verify(directory)


def _dataset_line(directory: Path, record: dict[str, Any]) -> str:
    rows = sum(record.get("counts", {}).get("rows", {}).values())
    return f"{rows:,} rows in {len(record['shards'])} shards"


def _dataset_tables(directory: Path, record: dict[str, Any]) -> dict[str, Loader]:
    """The per-chunk table (one row per chunk: ids, split, tokens, per-token loss) and the shards' list."""
    chunks = {"chunks": lambda: pd.DataFrame({name: list(values) if values.ndim > 1 else values
                                              for name, values in store.read_chunk_table(directory).items()})}
    return {**(chunks if record.get("chunk_tables") else {}), "shards": _frame(record["shards"])}


def _index_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    return index.verify(directory)


def _index_line(directory: Path, record: dict[str, Any]) -> str:
    shards = len(record["shards"])
    return f"index of {record['ntotal']:,} vectors ({record['factory']}, {shards} shard{'s' * (shards > 1)})"


def _run_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    return query.verify(directory) + _attached_problems(directory)


def _run_line(directory: Path, record: dict[str, Any]) -> str:
    layers = len(record["layers"])
    return f"run of {layers} layer{'s' * (layers > 1)} and {len(record['tables'])} tables"


def _scores_line(directory: Path, record: dict[str, Any]) -> str:
    chunks = record.get("chunks", {})
    return f"{chunks.get('train', 0):,} train and {chunks.get('test', 0):,} test chunks rated"


def _scores_tables(directory: Path, record: dict[str, Any]) -> dict[str, Loader]:
    """scores.parquet (each column what its name says: a version-1 folder's negated columns turned back), and
    metrics.json as one row per score (the side members lie on, AUC and TPRs with their intervals)."""
    result = score.ScoreResult(directory, record)

    def metrics() -> pd.DataFrame:
        document = result.metrics
        sides = score.orientation(document, result.scores.column_names if score.is_version_1(document) else [])
        return pd.json_normalize([{"score": name, "member_when": sides[name], **row}
                                  for name, row in document["scores"].items()])
    return {"scores": lambda: result.scores.to_pandas(), "metrics": metrics}


def _verbatim_line(directory: Path, record: dict[str, Any]) -> str:
    return ", ".join(f"{split} {row['chunks']:,} chunks" for split, row in record.get("splits", {}).items())


def _training_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    problems = _listed(directory, record, folders.TRAINING)
    for _, checkpoint in train.checkpoints(directory):
        try:
            train.check_checkpoint(checkpoint)
        except DataError as exc:
            problems.append(files.first_line(exc))
    return problems


def _training_line(directory: Path, record: dict[str, Any]) -> str:
    state = "complete" if record.get("complete") else "INCOMPLETE (rerun `memscan train` to resume)"
    return f"{record['steps']:,} steps, {state}"


def _training_tables(directory: Path, record: dict[str, Any]) -> dict[str, Loader]:
    """The checkpoints found, by step (the log is a listed table)."""
    steps = [{"step": step, "path": str(path)} for step, path in train.checkpoints(directory)]
    return {"checkpoints": _frame(steps)}


def _saturation_line(directory: Path, record: dict[str, Any]) -> str:
    return f"{record['argmax_heads']} of {record['heads']} heads argmax at c={record['scale']:g}"


def _assoc_line(directory: Path, record: dict[str, Any]) -> str:
    return f"{record['rows']:,} rows" + (", fitted" if (directory / folders.FIT.record).exists() else "")


def _experiment_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    """The run folder's own files, then each stage (or variant) folder it lists, checked as its own kind."""
    problems = _listed(directory, record, folders.EXPERIMENT)
    for name in record.get("folders", []):
        try:
            problems += [f"{name}: {problem}" for problem in verify(directory / name)[1]]
        except MemscanError as exc:
            problems.append(f"{name}: {files.first_line(exc)}")
    return problems


def _experiment_line(directory: Path, record: dict[str, Any]) -> str:
    stages = record.get("stages", {})
    return f"{len(stages)} stages done ({', '.join(stages) or 'none'}), folders {', '.join(record.get('folders', []))}"


def _experiment_tables(directory: Path, record: dict[str, Any]) -> dict[str, Loader]:
    stages = [{"stage": stage, "fingerprint": value} for stage, value in record.get("stages", {}).items()]
    return {"stages": _frame(stages)}


READERS: dict[folders.Kind, Reader] = {
    folders.DATASET: Reader(store.read_manifest, _dataset_problems, _dataset_line, ExtractResult, _dataset_tables),
    folders.INDEX: Reader(index.read_info, _index_problems, _index_line, index.IndexResult,
                          lambda directory, record: {"shards": _frame(record["shards"])}),
    folders.QUERY_RUN: Reader(query.read_summary, _run_problems, _run_line, query.QueryResult),
    folders.SCORES: Reader(_record(folders.SCORES), _generic(folders.SCORES), _scores_line, score.ScoreResult,
                           _scores_tables),
    folders.VERBATIM: Reader(_record(folders.VERBATIM), _generic(folders.VERBATIM), _verbatim_line,
                             verbatim.VerbatimResult),
    folders.TRAINING: Reader(train.read_run, _training_problems, _training_line, train.TrainResult,
                             _training_tables),
    folders.SATURATION: Reader(saturation.read_summary, _generic(folders.SATURATION), _saturation_line,
                               saturation.SaturationResult),
    folders.ASSOC: Reader(assoc.read_settings, _generic(folders.ASSOC), _assoc_line, assoc.SweepResult),
    folders.EXPERIMENT: Reader(_record(folders.EXPERIMENT), _experiment_problems, _experiment_line,
                               ExperimentResult, _experiment_tables),
}


def load(directory: str | Path) -> StageResult:
    """Any memscan folder for analysis: the typed result its stage returns (`ScoreResult` for a scores folder,
    `QueryResult` for a query run, `ExperimentResult` for an experiment), its tables pandas DataFrames read
    and checked against the record when first asked for (`result.table(name)`, `result.tables`)."""
    directory = Path(directory)
    kind, _ = folders.detect(directory)
    reader = READERS[kind]
    record = reader.read(directory)   # a pending record (a job cut short) is refused here
    return reader.result(directory, record, reader.tables(directory, record))


def verify(directory: str | Path) -> tuple[str, list[str], str]:
    """(kind, problems, one line describing what was found sound) for any memscan folder whose record reads
    (a MemscanError, one line, where it does not)."""
    directory = Path(directory)
    kind, _ = folders.detect(directory)
    record = READERS[kind].read(directory)   # a record that cannot be read is the one line of the failure
    reader = READERS[kind]
    problems = reader.problems(directory, record)
    return kind.name, problems, "" if problems else reader.describe(directory, record)


def describe(directory: str | Path) -> tuple[folders.Kind, dict[str, Any], str]:
    """(kind, record, one line) of a memscan folder, for `memscan info`."""
    directory = Path(directory)
    kind, _ = folders.detect(directory)
    record = READERS[kind].read(directory)
    return kind, record, READERS[kind].describe(directory, record)
