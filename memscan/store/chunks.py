"""The per-chunk table beside the shards: token ids and per-token statistics, one row per chunk, in pieces."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memscan import files, folders
from memscan.errors import DataError
from memscan.files import commit_file, sha256_of
from memscan.store.formats import (CHUNK_TABLE_SCHEMA, CHUNK_TEXT_COLUMNS, FORMAT_VERSION, MANIFEST, PER_TOKEN_COLUMNS,
                                   arrow_column, chunk_table_name, chunk_table_schema, column_numpy, writable_path)
from memscan.store.manifest import read_manifest, require_complete
from memscan.store.tables import read_table

# Beside the shards, `extract` writes one row per chunk: its token ids, the next token of its
# last position and the per-token nll, mu and var of the membership scores (memscan.membership),
# in pieces chunks/chunks-00000.parquet, ... (beside manifest.json before format version 4) of
# `manifest["chunk_table_chunks"]` chunks each, a whole
# number of batches. A piece is listed in manifest["chunk_tables"] once written, fsynced and
# renamed, exactly as a shard; pieces count chunks, not rows, so a resume restarts at a
# batch boundary of either and both come out byte-identical. A manifest without the key, or
# with null (an older memscan, imported vectors), has no per-chunk table. From version 4 a row also holds
# doc_key (the document's own key from the source, or null) and text (its token ids decoded by the run's tokenizer).

CHUNK_TABLE_CHUNKS = 4096  # chunks per piece, rounded up to whole batches: tens of MB at 256 tokens
_CHUNK_TABLE_FIELDS: dict[str, type] = {"name": str, "chunk_start": int, "chunk_stop": int, "bytes": int,
                                        "sha256": str}


def chunk_table_chunks(batch_size: int) -> int:
    """Chunks per piece of the per-chunk table: CHUNK_TABLE_CHUNKS rounded up to whole batches."""
    return -(-CHUNK_TABLE_CHUNKS // batch_size) * batch_size


def chunk_rows(columns: dict[str, Any], format_version: int = FORMAT_VERSION) -> pa.Table:
    """Rows of the per-chunk table: doc_id, chunk_id, split, next_token_id (m,), token_ids (m, T),
    nll, mu, var (m, T) float32 or None (extracted with --no-loss: null lists), and from format
    version 4 doc_key and text, lists of m str (a None key: null)."""
    m, length = columns["token_ids"].shape

    def lists(values: np.ndarray | None, value_type: pa.DataType) -> pa.Array:
        if values is None:
            return pa.nulls(m, pa.list_(value_type))
        offsets = pa.array(np.arange(0, (m + 1) * length, length, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type))

    arrays = [pa.array(columns["doc_id"], pa.int64()), pa.array(columns["chunk_id"], pa.int64()),
              arrow_column(columns["split"], CHUNK_TABLE_SCHEMA.field("split").type),
              lists(columns["token_ids"], pa.int32()), pa.array(columns["next_token_id"], pa.int32())]
    arrays += [lists(columns.get(name), pa.float32()) for name in PER_TOKEN_COLUMNS]
    table_schema = chunk_table_schema(format_version)
    if table_schema is not CHUNK_TABLE_SCHEMA:
        arrays += [pa.array(columns[name], kind) for name, kind in CHUNK_TEXT_COLUMNS]
    return pa.Table.from_arrays(arrays, schema=table_schema)


class ChunkTableWriter:
    """Cuts a stream of per-chunk rows into pieces of `piece_chunks` chunks, each written atomically.

    A piece's bytes depend only on its chunks (one row group per piece), so a resumed run
    writes the same bytes as an uninterrupted one. `on_piece` gets each piece's entry; pieces
    are named as `format_version` names them (`chunk_table_name`: in chunks/ from version 4).
    """

    def __init__(self, directory: Path, piece_chunks: int, first_chunk: int,
                 on_piece: Callable[[dict[str, Any]], None], format_version: int = FORMAT_VERSION):
        self.directory, self.piece_chunks, self.on_piece = Path(directory), piece_chunks, on_piece
        self.format_version = format_version
        self.index, remainder = divmod(first_chunk, piece_chunks)
        if remainder:
            raise ValueError(f"resume must start at a piece boundary; got chunk {first_chunk}")
        self._pending: list[pa.Table] = []
        self._pending_chunks = 0

    @property
    def final_path(self) -> Path:
        """Where the piece in progress goes once whole."""
        return self.directory / self.name

    @property
    def name(self) -> str:
        """The piece in progress's name, relative to the dataset folder."""
        return chunk_table_name(self.index, self.format_version)

    @property
    def tmp_path(self) -> Path:
        """The temporary name the piece in progress is written under."""
        return files.tmp_path(self.final_path)

    def write(self, table: pa.Table) -> None:
        """Append rows of the chunks that follow the last one written."""
        while table.num_rows:
            room = self.piece_chunks - self._pending_chunks
            head, table = table.slice(0, room), table.slice(room)
            self._pending.append(head)
            self._pending_chunks += head.num_rows
            if self._pending_chunks == self.piece_chunks:
                self._finish_piece()

    def close(self) -> None:
        """Write the last, partial piece."""
        if self._pending_chunks:
            self._finish_piece()

    def abort(self) -> None:
        """Drop the pending rows and any temporary file; written pieces stay."""
        self._pending, self._pending_chunks = [], 0
        self.tmp_path.unlink(missing_ok=True)

    def _finish_piece(self) -> None:
        final = self.final_path
        table = pa.concat_tables(self._pending).combine_chunks()
        pq.write_table(table, files.new_tmp(writable_path(self.directory, self.name)), row_group_size=max(1, table.num_rows), compression="zstd",
                       use_dictionary=["split"])
        commit_file(self.tmp_path, final)
        start = self.index * self.piece_chunks
        entry = {"name": self.name, "chunk_start": start, "chunk_stop": start + table.num_rows,
                 "bytes": final.stat().st_size, "sha256": sha256_of(final)}
        self._pending, self._pending_chunks = [], 0
        self.index += 1
        self.on_piece(entry)


def chunk_table_entries(manifest: dict[str, Any], directory: Path) -> list[dict[str, Any]]:
    """manifest["chunk_tables"], each entry's shape checked; a dataset without one is refused in one line."""
    path = directory / MANIFEST
    entries = manifest.get("chunk_tables")
    if entries is None:
        raise DataError(f"dataset '{directory}' has no per-chunk table (extracted by an older memscan or by "
                        "--engine ray): rerun `memscan extract` into a new folder")
    if not isinstance(entries, list):
        raise DataError(f"{path}: 'chunk_tables' must be a list of file records; got {json.dumps(entries)[:60]}")
    next_chunk = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise DataError(f"{path}: 'chunk_tables' must be a list of file records; got {json.dumps(entry)[:60]}")
        for key, kind in _CHUNK_TABLE_FIELDS.items():
            files.require(entry, key, kind, path)
        folders.listed_name(folders.DATASET, entry["name"], path)
        if entry["chunk_start"] != next_chunk or entry["chunk_stop"] <= entry["chunk_start"]:
            raise DataError(f"{path}: chunk table {entry['name']} does not continue at chunk {next_chunk}")
        next_chunk = entry["chunk_stop"]
    return entries


def chunk_table_problems(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """`verify`'s findings on the per-chunk table: each piece's size and sha256, and its chunk count."""
    if manifest.get("chunk_tables") is None:
        return []
    try:
        entries = chunk_table_entries(manifest, directory)
    except DataError as exc:
        return [str(exc)]
    problems = [p for p in (folders.file_problem(directory, folders.DATASET, e, "chunk table") for e in entries) if p]
    chunks = sum(manifest.get("counts", {}).get("chunks", {}).values())
    if manifest["complete"] and not problems and entries and entries[-1]["chunk_stop"] != chunks:
        problems.append(f"the manifest counts {chunks:,} chunks but the chunk tables hold {entries[-1]['chunk_stop']:,}")
    if manifest["complete"] and not problems:
        held: collections.Counter[str] = collections.Counter()
        for entry in entries:
            try:
                split = pq.read_table(directory / entry["name"], columns=["split"]).column("split").combine_chunks()
            except (pa.ArrowInvalid, OSError, KeyError) as exc:
                problems.append(f"chunk table {entry['name']} is not a readable Parquet file ({files.first_line(exc)})")
                continue
            held.update(column_numpy(split).tolist())
        claimed = manifest["counts"]["chunks"]
        problems += [f"'counts.chunks' counts {claimed.get(split, 0):,} {split} chunks but the chunk tables hold "
                     f"{held[split]:,}" for split in sorted(set(claimed) | set(held))
                     if not problems and claimed.get(split, 0) != held[split]]
    return problems


def read_chunk_table(directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The whole per-chunk table of a complete dataset, each piece checked against its entry first.

    Returns doc_id, chunk_id (m,) int64, split (m,) object, next_token_id (m,) int32,
    token_ids (m, T) int32 and nll, mu, var (m, T) float32 (all NaN when extracted with
    --no-loss), and from format version 4 doc_key and text (m,) object (a key may be None), in
    extraction order: chunk i owns rows i * rows_per_chunk onwards.
    """
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    require_complete(manifest, directory)
    entries = chunk_table_entries(manifest, directory)
    tables = [read_table(folders.check_file(directory, folders.DATASET, entry, "chunk table")) for entry in entries]
    table = pa.concat_tables(tables) if tables else chunk_table_schema(manifest["format_version"]).empty_table()
    length = manifest["chunk_tokens"]
    m = table.num_rows

    def matrix(name: str, dtype: type) -> np.ndarray:
        column = table.column(name).combine_chunks()
        if column.null_count == m and m:
            return np.full((m, length), np.nan, dtype)
        return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(m, length)

    texts = [name for name, _ in CHUNK_TEXT_COLUMNS if name in table.schema.names]   # format version 4
    out = {name: np.concatenate([column_numpy(part) for part in table.column(name).chunks])
           for name in ("doc_id", "chunk_id", "split", "next_token_id", *texts)}
    out["token_ids"] = matrix("token_ids", np.int32)
    out.update({name: matrix(name, np.float32) for name in PER_TOKEN_COLUMNS})
    return out
