"""What a stage returns: the folder it wrote, its kind and its signed record, with its tables read on demand.

Each stage's library call returns a subclass of `StageResult` with typed properties over its record, and
`memscan.load(folder)` returns the same class for a folder already on disk. A result is also a read-only
mapping over the record (`result["counts"]`), so code that read the returned JSON reads on. Its tables are
pandas DataFrames, each read (and checked against the record) when first asked for: `result.table("scores")`,
`result.tables`, or as an attribute (`result.neighbours`) where the class has no property of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from memscan import files, folders

Loader = Callable[[], pd.DataFrame]   # reads one table, checked against the folder's record


@dataclass(frozen=True, eq=False)
class StageResult(Mapping[str, Any]):
    """A finished stage's folder and record; equal to any mapping with the same items (its record as JSON).

    `loaders`: the tables beyond the record's listed Parquet files (`memscan.load` adds a kind's own, such
    as a score folder's metrics); `_read`: the tables read so far."""

    folder: Path
    record: Mapping[str, Any]
    loaders: Mapping[str, Loader] = field(default_factory=dict, repr=False)
    _read: dict[str, pd.DataFrame] = field(default_factory=dict, init=False, repr=False)
    kind: ClassVar[folders.Kind]

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    def __getattr__(self, name: str) -> pd.DataFrame:
        """A table by name as an attribute (`run.neighbours`), for names the class has no property for."""
        if name.startswith("_") or "record" not in self.__dict__:
            raise AttributeError(name)
        if name not in self._loaders():
            raise AttributeError(f"a memscan {self.kind.name} result has no attribute or table '{name}' "
                                 f"(its tables: {', '.join(self._loaders()) or 'none'})")
        return self.table(name)

    def _loaders(self) -> dict[str, Loader]:
        """Every table: the record's listed Parquet files by stem, checked on read, then `loaders`."""
        listed = {Path(entry["name"]).stem: _listed_loader(self.folder, entry)
                  for entry in folders.entries(self.kind, self.record) if entry["name"].endswith(".parquet")}
        return {**listed, **self.loaders}

    @property
    def table_names(self) -> list[str]:
        """The tables `table` reads: the listed Parquet files by name without `.parquet`, and the kind's own."""
        return list(self._loaders())

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table, read now."""
        return {name: self.table(name) for name in self._loaders()}

    def table(self, name: str) -> pd.DataFrame:
        """One table as a DataFrame, its bytes checked against the record when first read."""
        loaders = self._loaders()
        if name not in loaders:
            raise KeyError(f"a memscan {self.kind.name} folder has no table '{name}' "
                           f"(it has: {', '.join(loaders) or 'none'})")
        if name not in self._read:
            self._read[name] = loaders[name]()
        return self._read[name]


def _listed_loader(directory: Path, entry: Mapping[str, Any]) -> Loader:
    """A reader of one listed table, checked first; a name in a subfolder (a dataset's `vectors/part-00000.parquet`)
    is checked in that subfolder, each part of it a plain name."""
    *parents, name = str(entry["name"]).split("/")
    folder = directory.joinpath(*(files.plain_name(part, directory) for part in parents))
    return lambda: pd.read_parquet(files.check_file(folder, {**entry, "name": name}, "table"))
