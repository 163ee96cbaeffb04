"""Writing activation datasets: shards cut from a stream of rows, each atomic, and imported vectors as a dataset."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memscan import files
from memscan.errors import InputError
from memscan.files import commit_file, sha256_of
from memscan.store.formats import (DEFAULT_SITE, DICTIONARY_COLUMNS, FORMAT_VERSION, MANIFEST, VEC_DTYPES, rows_table,
                                   schema, shard_name, writable_path)
from memscan.store.manifest import new_manifest, write_manifest

log = logging.getLogger(__name__)

ROW_GROUP_BYTES = 32 << 20  # tens of MB: big enough to stream fast, small enough to bound memory


@dataclass(frozen=True)
class ShardInfo:
    """One completed shard, as the manifest records it (`name` relative to the dataset folder)."""

    name: str
    row_start: int
    row_stop: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "row_start": self.row_start, "row_stop": self.row_stop,
                "num_rows": self.row_stop - self.row_start, "bytes": self.bytes, "sha256": self.sha256}


class ShardWriter:
    """Cuts a stream of row tables into shards of `shard_rows` rows, each written atomically.

    Row groups hold a fixed number of rows counted from the shard's start, so a shard's
    bytes depend only on its rows, never on how the rows arrived: a resumed run writes
    the same bytes as an uninterrupted one. Shards are named as `format_version` names them
    (`shard_name`: in vectors/ from version 4).
    """

    def __init__(self, directory: Path, table_schema: pa.Schema, shard_rows: int, first_row: int,
                 on_shard: Callable[[ShardInfo], None], widest: int | None = None,
                 format_version: int = FORMAT_VERSION):
        self.directory, self.schema, self.shard_rows = Path(directory), table_schema, shard_rows
        self.format_version = format_version
        self.on_shard = on_shard
        vec_type = table_schema.field("vec").type
        width = vec_type.list_size if pa.types.is_fixed_size_list(vec_type) else widest
        if width is None:
            raise ValueError("a schema of several vector widths needs `widest` to size its row groups")
        self.group_rows = max(1, min(shard_rows, ROW_GROUP_BYTES // (width * vec_type.value_type.byte_width + 40)))
        self.shard_index, remainder = divmod(first_row, shard_rows)
        if remainder:
            raise ValueError(f"resume must start at a shard boundary; got row {first_row}")
        self.next_row = first_row
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._rows_in_shard = 0

    @property
    def final_path(self) -> Path:
        """Where the shard in progress goes once whole."""
        return self.directory / self.name

    @property
    def name(self) -> str:
        """The shard in progress's name, relative to the dataset folder."""
        return shard_name(self.shard_index, self.format_version)

    @property
    def tmp_path(self) -> Path:
        """The temporary name the shard in progress is written under."""
        return files.tmp_path(self.final_path)

    def write(self, table: pa.Table) -> None:
        """Append rows whose row_id runs on from the last row written."""
        while table.num_rows:
            room = min(self.shard_rows - self._rows_in_shard, self.group_rows - self._pending_rows)
            head, table = table.slice(0, room), table.slice(room)
            self._pending.append(head)
            self._pending_rows += head.num_rows
            self._rows_in_shard += head.num_rows
            self.next_row += head.num_rows
            if self._pending_rows == self.group_rows or self._rows_in_shard == self.shard_rows:
                self._flush_group()
            if self._rows_in_shard == self.shard_rows:
                self._finish_shard()

    def close(self) -> None:
        """Write the last, partial shard."""
        if self._pending_rows:
            self._flush_group()
        if self._rows_in_shard:
            self._finish_shard()

    def abort(self) -> None:
        """Drop the shard in progress and its pending rows; completed shards stay as they are."""
        writer, self._writer = self._writer, None
        self._pending, self._pending_rows, self._rows_in_shard = [], 0, 0
        try:
            if writer is not None:
                writer.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def _flush_group(self) -> None:
        if self._writer is None:
            metadata = [name for name in self.schema.names if name != "vec"]
            self._writer = pq.ParquetWriter(
                files.new_tmp(writable_path(self.directory, self.name)), self.schema, compression={name: "zstd" for name in metadata},
                use_dictionary=[name for name in DICTIONARY_COLUMNS if name in metadata], write_statistics=metadata,
            )
        group = pa.concat_tables(self._pending).combine_chunks()
        self._writer.write_table(group, row_group_size=self.group_rows)
        self._pending, self._pending_rows = [], 0

    def _finish_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        final = self.final_path
        commit_file(self.tmp_path, final)
        info = ShardInfo(self.name, self.next_row - self._rows_in_shard, self.next_row,
                         final.stat().st_size, sha256_of(final))
        log.debug("wrote %s: rows %d-%d, %.1f MB", info.name, info.row_start, info.row_stop - 1, info.bytes / 1e6)
        self._rows_in_shard = 0
        self.shard_index += 1
        self.on_shard(info)


def write_vectors(directory: str | os.PathLike[str], X: np.ndarray, splits: Sequence[str] | np.ndarray,
                  *, model: str = "external", layer: int = 0, shard_rows: int = 65536,
                  vec_dtype: str = "float32") -> dict[str, Any]:
    """Store vectors that came from elsewhere (arrays, another tool) as a complete dataset.

    X (m, n) becomes rows 0..m-1, one per pseudo-chunk (doc_id = chunk = row), at one layer
    and position 0, with no tokens or loss; the manifest says where they came from.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST).exists():
        raise InputError(f"'{directory}' already holds a dataset")
    m, n = X.shape
    if layer < 0 or vec_dtype not in VEC_DTYPES:
        raise InputError(f"write_vectors needs a layer >= 0 and vec_dtype float16 or float32; got {layer}, {vec_dtype}")
    splits = np.asarray(splits, dtype=object)
    if len(splits) != m:
        raise InputError(f"write_vectors needs one split per vector: {len(splits):,} splits for {m:,} vectors")
    manifest = new_manifest(
        fingerprint=None, settings={"source": "vectors", "imported": True},
        model={"id": model, "class": None, "num_parameters": 0}, source={"kind": "vectors"}, n=n, layers=[layer],
        positions="n/a", chunk_tokens=0, dtype="n/a", vec_dtype=vec_dtype, seed=None, rows_per_chunk=1,
    )
    writer = ShardWriter(directory, schema(n, vec_dtype), shard_rows, 0, lambda info: manifest["shards"].append(info.to_dict()))
    rows = np.arange(m, dtype=np.int64)
    columns = {"row_id": rows, "doc_id": rows, "chunk_id": np.zeros(m, np.int64), "position": np.zeros(m, np.int32),
               "token_id": np.full(m, -1, np.int32), "next_token_id": np.full(m, -1, np.int32),
               "nll": np.full(m, np.nan, np.float32), "split": splits, "layer": np.full(m, layer, np.int16),
               "site": np.full(m, DEFAULT_SITE, object)}
    writer.write(rows_table(columns, X.astype(vec_dtype, copy=False), writer.schema))
    writer.close()
    names, counts = np.unique(splits, return_counts=True)
    manifest["counts"] = {"chunks": {str(s): int(c) for s, c in zip(names, counts)},
                          "rows": {str(s): int(c) for s, c in zip(names, counts)}}
    manifest["complete"] = True
    return write_manifest(directory, manifest)
