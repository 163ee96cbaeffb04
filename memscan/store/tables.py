"""Plain result tables (neighbours, queries, patterns, histograms): written whole or block by block, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memscan import files
from memscan.errors import DataError
from memscan.files import commit_file


def write_table(path: str | os.PathLike[str], columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write a plain result table (neighbours, queries, patterns, histograms) atomically and fsynced;
    returns its entry (name, bytes, sha256) for the record that will vouch for it."""
    path = Path(path)
    tmp = files.new_tmp(path)
    pq.write_table(pa.table({name: np.asarray(values) for name, values in columns.items()}), tmp,
                   compression="zstd")
    commit_file(tmp, path)
    return files.file_entry(path)


class TableWriter:
    """A result table appended block by block, so no table is ever held whole in memory.

    Rows go to the table's temporary name (`files.tmp_path`) through one pyarrow
    ParquetWriter, each `write` a row group of the same columns and types; `commit`
    closes it, fsyncs and renames it into place and returns its entry (name, bytes,
    sha256) for the record that will vouch for it; `discard` removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.tmp = files.tmp_path(self.path)
        self._writer: pq.ParquetWriter | None = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        """Append rows: columns of equal length (m,), the same names and dtypes at every call."""
        table = pa.table({name: np.asarray(values) for name, values in columns.items()})
        if self._writer is None:
            self._writer = pq.ParquetWriter(files.new_tmp(self.path), table.schema, compression="zstd")
        self._writer.write_table(table)

    def commit(self) -> dict[str, Any]:
        """Close, fsync and rename the table (written at least once) into place; returns its entry."""
        self._writer.close()
        commit_file(self.tmp, self.path)
        return files.file_entry(self.path)

    def discard(self) -> None:
        """Close and remove the temporary file (a job that failed): the table in place, if any, stays."""
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """Read a result table written by `write_table` (check it against its entry first: `files.check_file`)."""
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable result table: {exc}") from None
