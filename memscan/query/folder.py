"""A query run folder: its five tables written in streams and committed under the signed summary.json
(docs/formats.md), read back and checked (`read_summary`, `verify`), and loaded into pandas (`load`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import memscan.store as store
from memscan import analysis, files, folders, layout
from memscan.errors import DataError
from memscan.results import StageResult

SUMMARY = folders.QUERY_RUN.record
TABLES = ("neighbours", "queries", "patterns", "histograms", "coverage")
TABLE_FILES = tuple(f"{name}.parquet" for name in TABLES)

Sink = Callable[[str, dict[str, np.ndarray]], None]   # appends rows (columns (m,)) to the named table


def site_sink(writers: dict[str, store.TableWriter], site: str) -> Sink:
    """A sink that writes one site's rows, each table with its `site` column."""
    def sink(name: str, rows: dict[str, np.ndarray]) -> None:
        count = len(next(iter(rows.values())))
        writers[name].write({"site": np.full(count, site, dtype=object), **rows})
    return sink


@contextlib.contextmanager
def table_writers(out_dir: Path) -> Iterator[dict[str, store.TableWriter]]:
    """One streaming writer per table, under its temporary name; a job that fails removes them all
    (a run already in the folder stays whole: its tables are replaced only at the commit)."""
    writers = {name: store.TableWriter(out_dir / path) for name, path in zip(TABLES, TABLE_FILES)}
    try:
        yield writers
    except BaseException:
        for writer in writers.values():
            with contextlib.suppress(OSError):
                writer.discard()
        raise


def commit(out_dir: Path, writers: dict[str, store.TableWriter], header: dict[str, Any],
           layers: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The tables renamed into place, then the signed summary listing them; a pending record replaces the old
    summary first, so a run killed (or out of disk) while committing leaves no summary vouching for a mix of
    old and new tables, and a rerun resumes."""
    pending = folders.begin(out_dir, folders.QUERY_RUN, header["fingerprint"], TABLE_FILES, previous)
    entries = [writers[name].commit() for name in TABLES]
    body = analysis.finite_or_none({**header, "tables": entries, "layers": layers})
    return folders.write_record(out_dir, folders.QUERY_RUN, body, pending)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json, refused in one line unless it is a signed record of this format of sound shape."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY
    if not path.exists():
        if any((run_dir / name).exists() or files.tmp_path(run_dir / name).exists() for name in TABLE_FILES):
            raise DataError(f"'{run_dir}' holds an incomplete run (no {SUMMARY} vouches for its tables): "
                            "rerun `memscan query`")
        raise DataError(f"'{run_dir}' is not a memscan run folder: it has no {SUMMARY} (run `memscan query`)")
    summary = folders.read_record(run_dir, folders.QUERY_RUN)
    _check_shape(summary, path)
    return summary


def _check_tables(summary: dict[str, Any], path: Path) -> None:
    """Every table entry a plain name with its size and sha256, and the entries exactly the run's tables."""
    for entry in summary["tables"]:
        if not isinstance(entry, dict):
            raise DataError(f"{path}: a table entry must be an object; got {entry!r:.60}")
        files.plain_name(files.require(entry, "name", str, path), path)
        files.require(entry, "bytes", int, path)
        files.require(entry, "sha256", str, path)
    if sorted(entry["name"] for entry in summary["tables"]) != sorted(TABLE_FILES):
        raise DataError(f"{path} lists the tables {[e['name'] for e in summary['tables']]}; "
                        f"a run has {list(TABLE_FILES)}")


def _check_shape(summary: dict[str, Any], path: Path) -> None:
    """Every field that loading and the report use, of its type (the signature says memscan wrote it)."""
    fields = {"index": str, "queries": str, "settings": dict, "queries_are_patterns": bool, "tables": list,
              "layers": list}
    for key, kinds in fields.items():
        files.require(summary, key, kinds, path)
    for key, kinds in {"split": str, "k": int, "beta": (int, float)}.items():
        files.require(summary["settings"], key, kinds, path)
    _check_tables(summary, path)
    if not summary["layers"]:
        raise DataError(f"{path} lists no layers")
    for layer in summary["layers"]:
        if not isinstance(layer, dict):
            raise DataError(f"{path}: a layer's summary must be an object; got {layer!r:.60}")
        for key, kinds in {"layer": int, "r_star": (int, float), "typical_radius": (int, float)}.items():
            files.require(layer, key, kinds, path)


def verify(run_dir: str | Path) -> list[str]:
    """Every problem found in a run folder: its summary, and each table's size and sha256."""
    try:
        summary = read_summary(run_dir)
    except DataError as exc:
        return [str(exc)]
    problems = [files.file_problem(Path(run_dir), entry, "table") for entry in summary["tables"]]
    return [problem for problem in problems if problem]


@dataclass
class RunTables:
    """A run folder's tables as pandas DataFrames, and its summary."""

    summary: dict[str, Any]
    neighbours: Any
    queries: Any
    patterns: Any
    histograms: Any
    coverage: Any

    kind = folders.QUERY_RUN.name

    @property
    def record(self) -> dict[str, Any]:
        """The run's summary.json."""
        return self.summary

    @property
    def tables(self) -> dict[str, Any]:
        """The five tables by name."""
        return {name: getattr(self, name) for name in TABLES}

    def at_site(self, site: str) -> RunTables:
        """The tables' rows of one site (a run from before sites has no site column: all of them)."""
        def rows(table: Any) -> Any:
            return table[table.site == site] if "site" in table else table
        return RunTables(self.summary, *(rows(getattr(self, name)) for name in TABLES))


def load(run_dir: str | Path) -> RunTables:
    """Open a `memscan query` run folder for analysis in pandas, every table checked against its summary entry."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    paths = {entry["name"]: files.check_file(run_dir, entry, "table") for entry in summary["tables"]}
    return RunTables(summary, *(store.read_table(paths[name]).to_pandas() for name in TABLE_FILES))


@dataclass(frozen=True, eq=False)
class QueryResult(StageResult):
    """A finished `memscan query` run: its folder and signed summary.json, read as a mapping or by property."""

    kind = folders.QUERY_RUN

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Every analysed (site, layer)'s summary (`LayerSummary.to_json`), in the order analysed."""
        return list(self.record["layers"])

    @property
    def site(self) -> str:
        """The site the index holds (runs from before sites: the residual stream)."""
        return layout.site_of(self.record)

    @property
    def settings(self) -> dict[str, Any]:
        """The run's QuerySettings as recorded."""
        return dict(self.record["settings"])

    @property
    def queries_are_patterns(self) -> bool:
        """Whether the queries were the indexed patterns (each left its own row out)."""
        return bool(self.record["queries_are_patterns"])

    def layer(self, key: layout.SiteKey) -> dict[str, Any]:
        """The summary of one (site, layer), refused in one line when the run did not analyse it."""
        for entry in self.layers:
            if layout.SiteKey(layout.site_of(entry), entry["layer"]) == key:
                return entry
        raise KeyError(f"the run in '{self.folder}' did not analyse {key.label()}")

    @property
    def summary(self) -> dict[str, Any]:
        """The run's summary.json (as `RunTables.summary`)."""
        return dict(self.record)

    def at_site(self, site: str) -> RunTables:
        """The five tables' rows of one site, each table checked against its summary entry when read."""
        return RunTables(self.summary, *(self.table(name) for name in TABLES)).at_site(site)
