"""Rows and chunks joined to their chunk's text in one call: what a page or `memscan show` prints for ids.

Both read only what the ids need: the shards' row groups holding the rows (their metadata
columns, never `vec`) and the per-chunk table pieces holding the chunks (found by the
manifest's row and chunk ranges, or for (doc_id, chunk_id) by each piece's doc_id
statistics), so memory follows the number of ids, not the dataset's size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import transformers

from memscan import files, folders
from memscan.errors import DataError
from memscan.store.chunks import chunk_table_entries
from memscan.store.formats import DEFAULT_SITE, SUBFOLDERS_SINCE, column_numpy
from memscan.store.manifest import read_manifest, require_complete

ROW_COLUMNS = ("row_id", "doc_id", "doc_key", "chunk_id", "position", "token_id", "split", "site", "layer", "text")
CHUNK_COLUMNS = ("doc_id", "doc_key", "chunk_id", "split", "text")
_SHARD_COLUMNS = ("row_id", "doc_id", "chunk_id", "position", "token_id", "split", "layer", "site")


def rows_with_text(dataset_dir: str | os.PathLike[str], row_ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """One row per given row id (m,), in the given order: row_id, doc_id, doc_key (None where the source had no
    key), chunk_id, position, token_id, split, site, layer and text (its chunk's). A row id not in the dataset is
    one DataError line."""
    directory = Path(dataset_dir)
    manifest = _complete(directory)
    ids = _as_ids(row_ids, "row_ids")
    total = manifest["shards"][-1]["row_stop"] if manifest["shards"] else 0
    outside = ids[(ids < 0) | (ids >= total)]
    if len(outside):
        raise DataError(f"row id {outside[0]} is not in dataset '{directory}' (its row ids run from 0 to {total - 1:,})")
    rows = _shard_rows(directory, manifest, ids)
    chunks = _chunk_texts(directory, manifest, ids // manifest["rows_per_chunk"])
    return pd.DataFrame({**rows, **chunks})[list(ROW_COLUMNS)]


def chunks_with_text(dataset_dir: str | os.PathLike[str], doc_ids: Sequence[int] | np.ndarray,
                     chunk_ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """One row per given (doc_id, chunk_id) pair (m,), in the given order: doc_id, doc_key, chunk_id, split and
    text, for tables keyed by chunk (scores, verbatim). A pair not in the dataset is one DataError line."""
    directory = Path(dataset_dir)
    manifest = _complete(directory)
    docs, chunk_numbers = _as_ids(doc_ids, "doc_ids"), _as_ids(chunk_ids, "chunk_ids")
    if len(docs) != len(chunk_numbers):
        raise DataError(f"chunks_with_text needs one chunk id per doc id; got {len(docs):,} doc ids and "
                        f"{len(chunk_numbers):,} chunk ids")
    found = _chunk_indices(directory, manifest, docs, chunk_numbers)
    chunks = _chunk_texts(directory, manifest, found, with_ids=True)
    return pd.DataFrame(chunks)[list(CHUNK_COLUMNS)]


def _complete(directory: Path) -> dict[str, Any]:
    manifest = read_manifest(directory)
    require_complete(manifest, directory)
    return manifest


def _as_ids(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    """Ids as int64 (m,); anything that is not a flat list of whole numbers is one DataError line."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{name} must be a flat list of whole numbers; got {array.dtype} of shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _shard_rows(directory: Path, manifest: dict[str, Any], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The metadata columns (no `vec`) of rows `ids` (m,), in that order; reads only their shards' row groups."""
    shards = manifest["shards"]
    shard_of = np.searchsorted([s["row_start"] for s in shards], ids, side="right") - 1
    out: dict[str, np.ndarray] = {name: np.empty(len(ids), object) for name in _SHARD_COLUMNS}
    for index in np.unique(shard_of):
        shard, here = shards[index], np.flatnonzero(shard_of == index)
        parquet = pq.ParquetFile(folders.check_file(directory, folders.DATASET, shard, "shard"))
        columns = [name for name in _SHARD_COLUMNS if name in parquet.schema_arrow.names]
        group_rows = parquet.metadata.row_group(0).num_rows
        local = ids[here] - shard["row_start"]
        groups = np.unique(local // group_rows)
        table = parquet.read_row_groups(groups.tolist(), columns=columns)
        taken = table.take(pa.array(np.searchsorted(groups, local // group_rows) * group_rows + local % group_rows))
        for name in columns:
            out[name][here] = column_numpy(taken.column(name).combine_chunks())
    if manifest["format_version"] < 2:   # version 1: every row is the residual stream
        out["site"][:] = DEFAULT_SITE
    kinds = {"row_id": np.int64, "doc_id": np.int64, "chunk_id": np.int64, "position": np.int32,
             "token_id": np.int32, "layer": np.int16}
    return {name: values.astype(kinds.get(name, object)) for name, values in out.items()}


def _chunk_indices(directory: Path, manifest: dict[str, Any], docs: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """Where each (doc_id, chunk_id) lies in the per-chunk table (m,); reads the id columns of only the pieces
    whose doc_id range (Parquet statistics) holds a wanted doc."""
    wanted = docs << 32 | chunks
    found = np.full(len(wanted), -1, np.int64)
    for entry in chunk_table_entries(manifest, directory):
        parquet = pq.ParquetFile(folders.check_file(directory, folders.DATASET, entry, "chunk table"))
        stats = parquet.metadata.row_group(0).column(0).statistics
        if stats is not None and stats.has_min_max and not np.any((docs >= stats.min) & (docs <= stats.max)):
            continue
        ids = parquet.read(columns=["doc_id", "chunk_id"])
        keys = ids.column("doc_id").to_numpy() << 32 | ids.column("chunk_id").to_numpy()
        where = pd.Index(keys).get_indexer(wanted)
        found[where >= 0] = entry["chunk_start"] + where[where >= 0]
    missing = np.flatnonzero(found < 0)
    if len(missing):
        first = missing[0]
        raise DataError(f"chunk {chunks[first]} of document {docs[first]} is not in dataset '{directory}'")
    return found


def _chunk_texts(directory: Path, manifest: dict[str, Any], indices: np.ndarray, with_ids: bool = False,
                 ) -> dict[str, np.ndarray]:
    """doc_key and text (and with `with_ids` doc_id, chunk_id, split) of the per-chunk table's rows `indices`
    (m,), in that order; reads only the pieces holding them. Before format version 4 the text is decoded here."""
    modern = manifest["format_version"] >= SUBFOLDERS_SINCE
    ids = ["doc_id", "chunk_id", "split"] if with_ids else []
    out = _chunk_columns(directory, manifest, indices, [*ids, *(["doc_key", "text"] if modern else ["token_ids"])])
    if not modern:
        out["text"] = np.array(_decode(manifest, directory, out.pop("token_ids")), dtype=object)
        out["doc_key"] = np.full(len(indices), None, object)
    for name in ("doc_id", "chunk_id"):
        if name in out:
            out[name] = out[name].astype(np.int64)
    return out


def _chunk_columns(directory: Path, manifest: dict[str, Any], indices: np.ndarray, names: list[str],
                   ) -> dict[str, np.ndarray]:
    """The columns `names` (m,) of the per-chunk table's rows `indices`, in that order; reads only the pieces
    holding them."""
    entries = chunk_table_entries(manifest, directory)
    piece_of = np.searchsorted([e["chunk_start"] for e in entries], indices, side="right") - 1
    out: dict[str, np.ndarray] = {name: np.empty(len(indices), object) for name in names}
    for index in np.unique(piece_of):
        entry, here = entries[index], np.flatnonzero(piece_of == index)
        path = folders.check_file(directory, folders.DATASET, entry, "chunk table")
        taken = pq.read_table(path, columns=names).take(pa.array(indices[here] - entry["chunk_start"]))
        for name in names:
            out[name][here] = column_numpy(taken.column(name).combine_chunks())
    return out


def chunk_tokens(dataset_dir: str | os.PathLike[str], doc_ids: Sequence[int] | np.ndarray,
                 chunk_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The token ids (m, T) int64 of the given (doc_id, chunk_id) pairs, in order, read from only the pieces
    holding them; a pair not in the dataset is one DataError line."""
    directory = Path(dataset_dir)
    manifest = _complete(directory)
    found = _chunk_indices(directory, manifest, _as_ids(doc_ids, "doc_ids"), _as_ids(chunk_ids, "chunk_ids"))
    rows = _chunk_columns(directory, manifest, found, ["token_ids"])["token_ids"]
    return np.array([np.asarray(row, np.int64) for row in rows]).reshape(len(found), -1)


def _decode(manifest: dict[str, Any], directory: Path, token_ids: np.ndarray) -> list[str]:
    """Texts of a dataset written before chunk text (format versions 1-3), decoded by the tokenizer its manifest's
    settings name, read from the local cache or folder only; one DataError line when it cannot be loaded."""
    model = manifest["settings"].get("model") or manifest["model"]["id"]
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, revision=manifest["settings"].get("revision"),
                                                               local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise DataError(f"dataset '{directory}' predates chunk text (format version {manifest['format_version']}) "
                        f"and its tokenizer '{model}' could not be loaded ({files.first_line(exc)})") from None
    return [tokenizer.decode(np.asarray(ids).tolist()) for ids in token_ids]
