"""Every kind of memscan folder as a reader sees it: its checks, its one-line description, its tables.

`memscan verify`, `memscan info` and `memscan.load` go through `open_folder`, which finds
the kind by its record (memscan.folders.detect) and answers with that kind's `Reader`:
the generic checks every record gets (signature, each listed file's size and sha256, the
records attached beside it) plus the kind's own (a dataset's shard contents, an index's
dataset, a training run's checkpoints, an experiment's stage folders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memscan import assoc, files, folders, query, saturation, score, store, train
from memscan.errors import DataError, MemscanError
from memscan.knn import index


@dataclass(frozen=True)
class Reader:
    """How one kind is read (its record, with the kind's own shape checks), checked, described and loaded;
    the last three take the folder and its sound record."""

    read: Callable[[Path], dict[str, Any]]
    problems: Callable[[Path, dict[str, Any]], list[str]]
    describe: Callable[[Path, dict[str, Any]], str]
    tables: Callable[[Path, dict[str, Any]], dict[str, Callable[[], pd.DataFrame]]]


@dataclass
class Folder:
    """A memscan folder for analysis: its kind, its record and its tables as pandas DataFrames, each read (and
    checked against its record) when first asked for: `folder.tables["scores"]` or `folder.scores`."""

    path: Path
    kind: str
    record: dict[str, Any]
    _loaders: dict[str, Callable[[], pd.DataFrame]] = field(repr=False)
    _loaded: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def table_names(self) -> list[str]:
        return list(self._loaders)

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table, read now."""
        return {name: getattr(self, name) for name in self._loaders}

    def __getattr__(self, name: str) -> pd.DataFrame:
        loaders = self.__dict__.get("_loaders", {})
        if name not in loaders:
            raise AttributeError(f"a memscan {self.kind} folder has no table '{name}' (it has: "
                                 f"{', '.join(loaders) or 'none'})")
        if name not in self._loaded:
            self._loaded[name] = loaders[name]()
        return self._loaded[name]


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


def _parquet(directory: Path, record: dict[str, Any], kind: folders.Kind, name: str) -> Callable[[], pd.DataFrame]:
    """A loader of the listed table `name`, checked against its entry when read."""
    entry = next(e for e in folders.entries(kind, record) if e["name"] == name)
    return lambda: store.read_table(files.check_file(directory, entry, "table")).to_pandas()


def _listed_tables(kind: folders.Kind) -> Callable[[Path, dict[str, Any]], dict[str, Callable[[], pd.DataFrame]]]:
    """Every listed Parquet table, named by its file's stem."""
    def tables(directory: Path, record: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
        return {entry["name"].removesuffix(".parquet"): _parquet(directory, record, kind, entry["name"])
                for entry in folders.entries(kind, record) if entry["name"].endswith(".parquet")}
    return tables


def _frame(rows: list[dict[str, Any]]) -> Callable[[], pd.DataFrame]:
    return lambda: pd.DataFrame(rows)


# ---------------------------------------------------------------- the kinds' own parts


def _dataset_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    return store.verify(directory)


def _dataset_line(directory: Path, record: dict[str, Any]) -> str:
    rows = sum(record.get("counts", {}).get("rows", {}).values())
    return f"{rows:,} rows in {len(record['shards'])} shards"


def _dataset_tables(directory: Path, record: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
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


def _scores_tables(directory: Path, record: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
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


def _training_tables(directory: Path, record: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
    steps = [{"step": step, "path": str(path)} for step, path in train.checkpoints(directory)]
    tables = {"checkpoints": _frame(steps)}
    if folders.entries(folders.TRAINING, record):
        tables["log"] = _parquet(directory, record, folders.TRAINING, train.LOG_FILE)
    return tables


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


def _experiment_tables(directory: Path, record: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
    stages = [{"stage": stage, "fingerprint": value} for stage, value in record.get("stages", {}).items()]
    return {"stages": _frame(stages)}


def _no_tables(directory: Path, record: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
    return {}





READERS: dict[folders.Kind, Reader] = {
    folders.DATASET: Reader(store.read_manifest, _dataset_problems, _dataset_line, _dataset_tables),
    folders.INDEX: Reader(index.read_info, _index_problems, _index_line, lambda d, r: {"shards": _frame(r["shards"])}),
    folders.QUERY_RUN: Reader(query.read_summary, _run_problems, _run_line, _listed_tables(folders.QUERY_RUN)),
    folders.SCORES: Reader(_record(folders.SCORES), _generic(folders.SCORES), _scores_line, _scores_tables),
    folders.VERBATIM: Reader(_record(folders.VERBATIM), _generic(folders.VERBATIM), _verbatim_line,
                             _listed_tables(folders.VERBATIM)),
    folders.TRAINING: Reader(train.read_run, _training_problems, _training_line, _training_tables),
    folders.SATURATION: Reader(saturation.read_summary, _generic(folders.SATURATION), _saturation_line,
                               _listed_tables(folders.SATURATION)),
    folders.ASSOC: Reader(assoc.read_settings, _generic(folders.ASSOC), _assoc_line, _listed_tables(folders.ASSOC)),
    folders.EXPERIMENT: Reader(_record(folders.EXPERIMENT), _experiment_problems, _experiment_line,
                               _experiment_tables),
}


def open_folder(directory: str | Path) -> Folder:
    """The memscan folder at `directory`: its kind (found by its record), the record and its tables, unread."""
    directory = Path(directory)
    kind, _ = folders.detect(directory)
    record = READERS[kind].read(directory)   # a pending record (a job cut short) is refused here
    return Folder(directory, kind.name, record, READERS[kind].tables(directory, record))


def load(directory: str | Path) -> Folder | query.RunTables:
    """Any memscan folder for analysis in pandas: a query run as `query.RunTables` (its five tables, by site
    too), every other kind as a `Folder`; both carry `kind`, `record` and `tables`."""
    kind, _ = folders.detect(Path(directory))
    return query.load(directory) if kind is folders.QUERY_RUN else open_folder(directory)


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
