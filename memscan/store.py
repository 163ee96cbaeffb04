"""The activation store: shard schema, manifest, atomic writes, checksums, streaming reads.

The only module that touches Parquet. A dataset folder holds `part-00000.parquet`, ...
and `manifest.json`; a shard is listed in the manifest only after it is fully written,
fsynced and renamed into place, so a listed shard is always whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscan import files
from memscan.errors import DataError, InputError
from memscan.files import commit_file, sha256_of, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "memscan.activations"
FORMAT_VERSION = 2          # 2: a `site` column beside `layer`, and the manifest's `sites`
READABLE_VERSIONS = (1, 2)  # version 1 holds the residual stream only: every row is site "hidden"
DEFAULT_SITE = "hidden"     # the residual stream as output_hidden_states numbers it (--layers)
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
_SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")
ROW_GROUP_BYTES = 32 << 20  # tens of MB: big enough to stream fast, small enough to bound memory
VEC_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
DICTIONARY_COLUMNS = ("split", "site")


def schema(widths: int | Sequence[int], vec_dtype: str, format_version: int = FORMAT_VERSION) -> pa.Schema:
    """The shard schema of DESIGN.md, plus `site` from format version 2.

    `vec` is fixed_size_list<vec_dtype>[n] when every site has width n; sites of several
    widths (mlp_hidden beside the residual stream) store it as large_list<vec_dtype>, each
    row as wide as its site.
    """
    distinct = sorted({widths} if isinstance(widths, int) else set(widths))
    vec = (pa.list_(VEC_DTYPES[vec_dtype], distinct[0]) if len(distinct) == 1
           else pa.large_list(VEC_DTYPES[vec_dtype]))
    fields = [
        ("row_id", pa.int64()), ("doc_id", pa.int64()), ("chunk_id", pa.int64()),
        ("position", pa.int32()), ("token_id", pa.int32()), ("next_token_id", pa.int32()),
        ("nll", pa.float32()), ("split", pa.dictionary(pa.int8(), pa.string())), ("layer", pa.int16()),
    ]
    if format_version >= 2:
        fields.append(("site", pa.dictionary(pa.int16(), pa.string())))
    return pa.schema([*fields, ("vec", vec)])


def rows_table(columns: dict[str, np.ndarray], vec: np.ndarray, table_schema: pa.Schema,
               widths: np.ndarray | None = None) -> pa.Table:
    """Build one table of rows: metadata columns (m,) and `vec`, without copying it.

    vec is (m, n) for a fixed width, or the rows' values end to end with `widths` (m,)
    their widths for a large_list `vec`. A schema without `site` (format version 1) skips it.
    """
    names = [name for name in table_schema.names if name != "vec"]
    arrays = [_arrow_column(columns[name], table_schema.field(name).type) for name in names]
    vec_type = table_schema.field("vec").type
    flat = pa.array(np.ascontiguousarray(vec).reshape(-1), type=vec_type.value_type)
    if pa.types.is_fixed_size_list(vec_type):
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, vec_type.list_size))
    else:
        offsets = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
        arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat))
    return pa.Table.from_arrays(arrays, schema=table_schema)


def _arrow_column(values: np.ndarray | pa.Array, arrow_type: pa.DataType) -> pa.Array:
    """A column of `arrow_type` from numpy values (dictionary-encoded where the type says so) or an Arrow array."""
    if isinstance(values, pa.Array):
        return values.cast(arrow_type)
    if pa.types.is_dictionary(arrow_type):
        return pa.array(values, type=arrow_type.value_type).dictionary_encode().cast(arrow_type)
    return pa.array(values, type=arrow_type)


# ---------------------------------------------------------------- the manifest


def new_manifest(*, fingerprint: str | None, settings: dict[str, Any], model: dict[str, Any],
                 source: dict[str, Any], n: int | None = None, layers: list[int] | None = None, positions: str,
                 chunk_tokens: int,
                 dtype: str, vec_dtype: str, seed: int | None, rows_per_chunk: int,
                 versions: dict[str, str] | None = None, split_rule: dict[str, Any] | None = None,
                 chunk_table_chunks: int | None = None, sites: list[dict[str, Any]] | None = None,
                 ) -> dict[str, Any]:
    """The manifest of a dataset being written: incomplete, no shards yet (DESIGN.md, the manifest).

    `sites`: the stored vector sets in row order within a chunk, each {name, layers, n}
    (or the residual stream alone: site "hidden" at `layers`, width `n`); `n` and
    `layers` are the first site's, as version 1 recorded them. `rows_per_chunk` is the
    sites' layers x positions per chunk. The one place a manifest is built, so every writer
    records the same keys that `read_manifest` checks. `split_rule`: what made the split
    (default the seeded hash); `chunk_table_chunks`: chunks per piece of the per-chunk table,
    None for a dataset without one (its `chunk_tables` is then null).
    """
    sites = sites or [{"name": DEFAULT_SITE, "layers": layers, "n": n}]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, "fingerprint": fingerprint,
        "settings": settings, "model": model, "source": source, "n": sites[0]["n"], "layers": sites[0]["layers"],
        "sites": sites, "positions": positions,
        "chunk_tokens": chunk_tokens, "dtype": dtype, "vec_dtype": vec_dtype, "seed": seed,
        "rows_per_chunk": rows_per_chunk, "versions": versions or {}, "shards": [],
        "split_rule": split_rule or {"kind": "hash"}, "chunk_table_chunks": chunk_table_chunks,
        "chunk_tables": None if chunk_table_chunks is None else [],
    }


_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "format_version": int, "complete": bool, "fingerprint": (str, type(None)), "settings": dict,
    "model": dict, "source": dict, "n": int, "layers": list, "positions": str, "chunk_tokens": int, "dtype": str,
    "vec_dtype": str, "seed": (int, type(None)), "rows_per_chunk": int, "shards": list,
}
_SHARD_FIELDS: dict[str, type] = {"name": str, "row_start": int, "row_stop": int, "bytes": int, "sha256": str}


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """manifest.json of a dataset folder, its shape checked once here: readers then trust it.

    A manifest that does not parse, lacks a key, holds a value of the wrong type or range,
    or names a shard outside its folder is one DataError line naming the file and the key.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"'{directory}' is not a folder")
    path = directory / MANIFEST
    manifest = files.read_record(path, "memscan dataset")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a memscan activation manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise DataError(f"{path} has format version {manifest.get('format_version')}; "
                        f"this memscan reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    for key, kinds in _MANIFEST_FIELDS.items():
        files.require(manifest, key, kinds, path)
    _check_shape(manifest, path)
    return manifest


def _check_shape(manifest: dict[str, Any], path: Path) -> None:
    """Ranges and nested records of a manifest whose top-level types are checked."""
    def refuse(key: str, wanted: str, value: Any) -> NoReturn:
        raise DataError(f"{path}: '{key}' must be {wanted}; got {json.dumps(value)[:60]}")

    for key, minimum in (("n", 1), ("chunk_tokens", 0), ("rows_per_chunk", 1)):
        if manifest[key] < minimum:
            refuse(key, f"at least {minimum}", manifest[key])
    if manifest["vec_dtype"] not in VEC_DTYPES:
        refuse("vec_dtype", " or ".join(VEC_DTYPES), manifest["vec_dtype"])
    if manifest["format_version"] >= 2:
        files.require(manifest, "sites", list, path)
    stored = sites_of(manifest)
    if not stored or not all(isinstance(site, dict) for site in stored):
        refuse("sites", "a non-empty list of site records", stored)
    for site in stored:
        files.require(site, "name", str, path)
        files.require(site, "n", int, path)
        layers = files.require(site, "layers", list, path)
        if not layers or not all(type(x) is int and x >= -1 for x in layers) or layers != sorted(set(layers)):
            refuse("layers", "a non-empty ascending list of layer numbers >= -1 (-1: a module: site)", layers)
        if site["n"] < 1:
            refuse("n", "at least 1", site["n"])
    for key in ("n", "layers"):   # the first site's, as version 1 readers expect them
        if manifest[key] != stored[0][key]:
            refuse(key, f"the first site's ({json.dumps(stored[0][key])})", manifest[key])
    if len({site["name"] for site in stored}) != len(stored):
        refuse("sites", "a list of distinct site names", [site["name"] for site in stored])
    if manifest["rows_per_chunk"] % sum(len(site["layers"]) for site in stored):
        refuse("rows_per_chunk", "a whole number of positions for every site and layer", manifest["rows_per_chunk"])
    files.require(manifest["model"], "id", str, path)
    files.require(manifest["model"], "num_parameters", int, path)
    files.require(manifest["settings"], "source", str, path)
    next_row, names = 0, set()
    for shard in manifest["shards"]:
        if not isinstance(shard, dict):
            refuse("shards", "a list of shard records", shard)
        for key, kind in _SHARD_FIELDS.items():
            files.require(shard, key, kind, path)
        if files.plain_name(shard["name"], path) in names:
            refuse("shards", "a list of distinct files", shard["name"])
        if shard["row_start"] != next_row or shard["row_stop"] <= shard["row_start"] or shard["bytes"] < 0:
            refuse("shards", f"consecutive row ranges from row {next_row}", shard)
        next_row = shard["row_stop"]
        names.add(shard["name"])
    if manifest["complete"]:
        counts = files.require(manifest, "counts", dict, path)
        for key in ("chunks", "rows"):
            table = files.require(counts, key, dict, path)
            if not all(type(v) is int and v >= 0 for v in table.values()):
                refuse(f"counts.{key}", "counts >= 0 per split", table)


def sites_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored sites {name, layers, n} in row order; a version-1 manifest's are site "hidden" alone."""
    if manifest["format_version"] >= 2:
        return manifest["sites"]
    return [{"name": DEFAULT_SITE, "layers": manifest["layers"], "n": manifest["n"]}]


def set_index(manifest: dict[str, Any], site: str, layer: int) -> int:
    """Where (site, layer) comes among a chunk's vector sets: its rows start at chunk x rows_per_chunk + this x P."""
    return [(entry["name"], number) for entry in sites_of(manifest) for number in entry["layers"]].index((site, layer))


def shard_schema(manifest: dict[str, Any]) -> pa.Schema:
    """The schema every shard of this manifest has (its version, its sites' widths)."""
    return schema([site["n"] for site in sites_of(manifest)], manifest["vec_dtype"], manifest["format_version"])


def is_dataset_file(name: str, listed: Collection[str] = ()) -> bool:
    """Whether memscan writes `name` into a dataset folder: manifest.json, a shard named by the exact
    pattern or listed in the manifest (`listed`), or the temporary name of either."""
    base = name.removesuffix(files.TMP_SUFFIX)
    shard = _SHARD_NAME.fullmatch(base) or _CHUNK_TABLE_NAME.fullmatch(base)
    pattern = SHARD_PATTERN if base.startswith("part-") else CHUNK_TABLE_PATTERN
    return base == MANIFEST or base in listed or (shard is not None and pattern.format(int(shard[1])) == base)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardInfo:
    """One completed shard, as the manifest records it."""

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
    the same bytes as an uninterrupted one.
    """

    def __init__(self, directory: Path, table_schema: pa.Schema, shard_rows: int, first_row: int,
                 on_shard: Callable[[ShardInfo], None], widest: int | None = None):
        self.directory, self.schema, self.shard_rows = Path(directory), table_schema, shard_rows
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
    def tmp_path(self) -> Path:
        return self.directory / (SHARD_PATTERN.format(self.shard_index) + ".tmp")

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
                self.tmp_path, self.schema, compression={name: "zstd" for name in metadata},
                use_dictionary=[name for name in DICTIONARY_COLUMNS if name in metadata], write_statistics=metadata,
            )
        group = pa.concat_tables(self._pending).combine_chunks()
        self._writer.write_table(group, row_group_size=self.group_rows)
        self._pending, self._pending_rows = [], 0

    def _finish_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        final = self.directory / SHARD_PATTERN.format(self.shard_index)
        commit_file(self.tmp_path, final)
        info = ShardInfo(final.name, self.next_row - self._rows_in_shard, self.next_row,
                         final.stat().st_size, sha256_of(final))
        log.debug("wrote %s: rows %d-%d, %.1f MB", info.name, info.row_start, info.row_stop - 1, info.bytes / 1e6)
        self._rows_in_shard = 0
        self.shard_index += 1
        self.on_shard(info)


# ---------------------------------------------------------------- reading


class ActivationDataset:
    """A dataset folder opened for reading at one site: the manifest checked, shards streamed.

    Every read (n, layers, counts, batches, row ids) is of the rows of `site`: by default
    the residual stream ("hidden") when the dataset holds it, else its first site. Every
    shard's size and sha256 are checked against the manifest before its first row is read,
    so a corrupt or truncated shard is named, never half-read.
    """

    def __init__(self, directory: str | os.PathLike[str], site: str | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest["complete"]:
            raise DataError(f"dataset '{directory}' is incomplete: rerun the same `memscan extract` "
                            "command to finish it")
        stored = {entry["name"]: entry for entry in sites_of(self.manifest)}
        if site is None:
            site = DEFAULT_SITE if DEFAULT_SITE in stored else next(iter(stored))
        if site not in stored:
            raise InputError(f"site '{site}' is not in dataset '{directory}' (sites: {', '.join(stored)})")
        self.site, self._site = site, stored[site]
        self._one_site = len(stored) == 1  # then no row needs filtering by site
        self._verified: set[str] = set()

    @property
    def sites(self) -> list[str]:
        """Every site the dataset holds, in row order."""
        return [entry["name"] for entry in sites_of(self.manifest)]

    @property
    def n(self) -> int:
        """The width of this site's vectors."""
        return int(self._site["n"])

    @property
    def layers(self) -> list[int]:
        """This site's layers: output_hidden_states numbering for "hidden", block indices for block sites."""
        return list(self._site["layers"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    @property
    def total_rows(self) -> int:
        """Rows of every split and layer: row ids run from 0 to this."""
        return int(self.manifest["shards"][-1]["row_stop"]) if self.manifest["shards"] else 0

    def count(self, split: str | None = None, layer: int | None = None) -> int:
        """Rows of this site in a split (all splits when None) at a layer (all its layers when None)."""
        per_split = self.manifest["counts"]["chunks"]
        chunks = sum(per_split.values()) if split is None else per_split.get(split, 0)
        sets = sum(len(entry["layers"]) for entry in sites_of(self.manifest))
        per_layer = chunks * (self.manifest["rows_per_chunk"] // sets)
        return per_layer * (len(self.layers) if layer is None else int(layer in self.layers))

    def iter_batches(self, split: str | None = None, layer: int | None = None,
                     columns: Sequence[str] = ("row_id",), batch_rows: int = 65536,
                     rows: tuple[int, int] | None = None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (X float32 (m, n), {column: (m,) array}) for the rows of a split and layer.

        Every batch but the last holds exactly `batch_rows` rows, in row order, whatever
        the shard and row-group boundaries; memory is bounded by about one batch. `rows`
        (start, stop) keeps only row ids in that range and reads only its row groups.
        """
        if layer is not None and layer not in self.layers:
            raise InputError(f"layer {layer} is not in dataset '{self.directory}' (layers: {self.layers})")
        wanted = list(dict.fromkeys([*columns, "vec", *self._filter_columns]))
        start, stop = rows or (0, self.total_rows)
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for shard in self.shards:
            if shard["row_stop"] <= start or shard["row_start"] >= stop:
                continue
            parquet = self._open_checked(shard)
            group_rows = parquet.metadata.row_group(0).num_rows
            first = (max(start, shard["row_start"]) - shard["row_start"]) // group_rows
            last = (min(stop, shard["row_stop"]) - shard["row_start"] - 1) // group_rows
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted,
                                              row_groups=list(range(first, last + 1))):
                batch = self._filter(batch, split, layer, (start, stop))
                while batch.num_rows:
                    head, batch = batch.slice(0, batch_rows - pending_rows), batch.slice(batch_rows - pending_rows)
                    pending.append(head)
                    pending_rows += head.num_rows
                    if pending_rows == batch_rows:
                        yield self._to_numpy(pending, columns)
                        pending, pending_rows = [], 0
        if pending_rows:
            yield self._to_numpy(pending, columns)

    def row_ids(self, split: str | None = None, layer: int | None = None) -> np.ndarray:
        """Row ids (int64, ascending) of a split and layer, from the metadata columns alone (no vectors read)."""
        parts = [self._filter(batch, split, layer, (0, self.total_rows)).column("row_id").to_numpy()
                 for shard in self.shards
                 for batch in self._open_checked(shard).iter_batches(columns=self._filter_columns)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def take(self, row_ids: np.ndarray) -> np.ndarray:
        """Vectors of the given row ids (rows of this site), float32 (m, n) in the order given; reads only their
        row groups."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        out = np.empty((len(row_ids), self.n), np.float32)
        starts = np.array([s["row_start"] for s in self.shards])
        shard_of = np.searchsorted(starts, row_ids, side="right") - 1
        if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= self.total_rows):
            raise InputError(f"row ids must lie in [0, {self.total_rows}); got {row_ids.min()}..{row_ids.max()}")
        for index in np.unique(shard_of):
            shard, here = self.shards[index], np.flatnonzero(shard_of == index)
            parquet = self._open_checked(shard)
            group_rows = parquet.metadata.row_group(0).num_rows
            local = row_ids[here] - shard["row_start"]
            groups = np.unique(local // group_rows)
            table = parquet.read_row_groups(groups.tolist(), columns=["vec"])
            position = np.searchsorted(groups, local // group_rows) * group_rows + local % group_rows
            vec = table.column("vec").combine_chunks().take(pa.array(position)).flatten()
            out[here] = vec.to_numpy(zero_copy_only=False).reshape(-1, self.n)
        return out

    def _to_numpy(self, batches: list[pa.RecordBatch], columns: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        table = pa.Table.from_batches(batches).combine_chunks()
        vec = table.column("vec").chunk(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, self.n)
        meta = {name: _column_numpy(table.column(name).chunk(0)) for name in columns}
        return vec.astype(np.float32, copy=False), meta

    def _open_checked(self, shard: dict[str, Any]) -> pq.ParquetFile:
        """Open a shard, checking it is a regular file of its size and sha256 the first time this dataset reads it."""
        path = self.directory / shard["name"]
        if shard["name"] not in self._verified:
            files.check_file(self.directory, shard, "shard")
            self._verified.add(shard["name"])
        return pq.ParquetFile(path, memory_map=True)

    @property
    def _filter_columns(self) -> list[str]:
        return ["row_id", "split", "layer", *([] if self._one_site else ["site"])]

    def _filter(self, batch: pa.RecordBatch, split: str | None, layer: int | None,
                rows: tuple[int, int]) -> pa.RecordBatch:
        """The batch's rows of this site and of one split and layer (None: any) with row ids in [start, stop)."""
        row_id = batch.column("row_id")
        mask = pc.and_(pc.greater_equal(row_id, rows[0]), pc.less(row_id, rows[1]))
        if split is not None:
            mask = pc.and_(mask, pc.equal(batch.column("split").dictionary_decode(), split))
        if layer is not None:
            mask = pc.and_(mask, pc.equal(batch.column("layer"), layer))
        if not self._one_site:
            mask = pc.and_(mask, pc.equal(batch.column("site").dictionary_decode(), self.site))
        return batch.filter(mask)


def _column_numpy(column: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.to_numpy(zero_copy_only=False)


def verify(directory: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a dataset folder: manifest, completeness, shards, schema, counts."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = [] if manifest["complete"] else ["the dataset is incomplete (extraction did not finish)"]
    expected_schema = shard_schema(manifest)
    for shard in manifest["shards"]:
        problem = files.file_problem(directory, shard, "shard")
        if problem:
            problems.append(problem)
            continue
        problems.extend(_shard_content_problems(directory / shard["name"], shard, expected_schema))
    if manifest["complete"]:
        total = sum(manifest["counts"]["rows"].values())
        stored = manifest["shards"][-1]["row_stop"] if manifest["shards"] else 0
        if total != stored:
            problems.append(f"the manifest counts {total:,} rows but the shards hold {stored:,}")
    problems.extend(chunk_table_problems(directory, manifest))
    return problems


def _shard_content_problems(path: Path, shard: dict[str, Any], expected_schema: pa.Schema) -> list[str]:
    """A whole shard's schema and row ids against its manifest entry (row ids row_start..row_stop-1 in order)."""
    try:
        parquet = pq.ParquetFile(path)
        row_ids = parquet.read(columns=["row_id"]).column("row_id").to_numpy()
    except (pa.ArrowInvalid, OSError) as exc:
        return [f"shard {shard['name']} is not a readable Parquet file ({files.first_line(exc)})"]
    problems = []
    if not parquet.schema_arrow.equals(expected_schema):
        problems.append(f"shard {shard['name']} has schema {parquet.schema_arrow}, expected {expected_schema}")
    if not np.array_equal(row_ids, np.arange(shard["row_start"], shard["row_stop"])):
        problems.append(f"shard {shard['name']} does not hold rows {shard['row_start']}-{shard['row_stop'] - 1} in order")
    return problems


def read_text_column(path: Path, column: str, batch_rows: int = 4096) -> Iterator[str]:
    """Stream one string column of a user's Parquet file (a text source)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None
    if column not in parquet.schema_arrow.names:
        raise InputError(f"{path} has no column '{column}'; columns are: "
                         f"{', '.join(parquet.schema_arrow.names)} (choose one with --text-column)")
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
        yield from (text for text in batch.column(0).to_pylist() if text)


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
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def write_table(path: str | os.PathLike[str], columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write a plain result table (neighbours, queries, patterns, histograms) atomically and fsynced;
    returns its entry (name, bytes, sha256) for the record that will vouch for it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
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
            self._writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
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


# ---------------------------------------------------------------- the per-chunk table (issue 13)
#
# Beside the shards, `extract` writes one row per chunk: its token ids, the next token of its
# last position and the per-token nll, mu and var of the membership scores (memscan.membership),
# in pieces chunks-00000.parquet, ... of `manifest["chunk_table_chunks"]` chunks each, a whole
# number of batches. A piece is listed in manifest["chunk_tables"] once written, fsynced and
# renamed, exactly as a shard; pieces count chunks, not rows, so a resume restarts at a
# batch boundary of either and both come out byte-identical. A manifest without the key, or
# with null (an older memscan, the Ray engine, imported vectors), has no per-chunk table; the
# format version stays 1, as every version-1 reader ignores the key.

CHUNK_TABLE_PATTERN = "chunks-{:05d}.parquet"
_CHUNK_TABLE_NAME = re.compile(r"chunks-(\d{5,})\.parquet")
CHUNK_TABLE_CHUNKS = 4096  # chunks per piece, rounded up to whole batches: tens of MB at 256 tokens
CHUNK_TABLE_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("chunk_id", pa.int64()), ("split", pa.dictionary(pa.int8(), pa.string())),
    ("token_ids", pa.list_(pa.int32())), ("next_token_id", pa.int32()),
    ("nll", pa.list_(pa.float32())), ("mu", pa.list_(pa.float32())), ("var", pa.list_(pa.float32())),
])
_CHUNK_TABLE_FIELDS: dict[str, type] = {"name": str, "chunk_start": int, "chunk_stop": int, "bytes": int,
                                        "sha256": str}
PER_TOKEN_COLUMNS = ("nll", "mu", "var")


def chunk_table_chunks(batch_size: int) -> int:
    """Chunks per piece of the per-chunk table: CHUNK_TABLE_CHUNKS rounded up to whole batches."""
    return -(-CHUNK_TABLE_CHUNKS // batch_size) * batch_size


def chunk_rows(columns: dict[str, np.ndarray]) -> pa.Table:
    """Rows of the per-chunk table: doc_id, chunk_id, split, next_token_id (m,), token_ids (m, T) and
    nll, mu, var (m, T) float32 or None (extracted with --no-loss: null lists)."""
    m, length = columns["token_ids"].shape

    def lists(values: np.ndarray | None, value_type: pa.DataType) -> pa.Array:
        if values is None:
            return pa.nulls(m, pa.list_(value_type))
        offsets = pa.array(np.arange(0, (m + 1) * length, length, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type))

    arrays = [pa.array(columns["doc_id"], pa.int64()), pa.array(columns["chunk_id"], pa.int64()),
              _arrow_column(columns["split"], CHUNK_TABLE_SCHEMA.field("split").type),
              lists(columns["token_ids"], pa.int32()), pa.array(columns["next_token_id"], pa.int32())]
    arrays += [lists(columns.get(name), pa.float32()) for name in PER_TOKEN_COLUMNS]
    return pa.Table.from_arrays(arrays, schema=CHUNK_TABLE_SCHEMA)


class ChunkTableWriter:
    """Cuts a stream of per-chunk rows into pieces of `piece_chunks` chunks, each written atomically.

    A piece's bytes depend only on its chunks (one row group per piece), so a resumed run
    writes the same bytes as an uninterrupted one. `on_piece` gets each piece's entry.
    """

    def __init__(self, directory: Path, piece_chunks: int, first_chunk: int,
                 on_piece: Callable[[dict[str, Any]], None]):
        self.directory, self.piece_chunks, self.on_piece = Path(directory), piece_chunks, on_piece
        self.index, remainder = divmod(first_chunk, piece_chunks)
        if remainder:
            raise ValueError(f"resume must start at a piece boundary; got chunk {first_chunk}")
        self._pending: list[pa.Table] = []
        self._pending_chunks = 0

    @property
    def tmp_path(self) -> Path:
        return files.tmp_path(self.directory / CHUNK_TABLE_PATTERN.format(self.index))

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
        final = self.directory / CHUNK_TABLE_PATTERN.format(self.index)
        table = pa.concat_tables(self._pending).combine_chunks()
        pq.write_table(table, self.tmp_path, row_group_size=max(1, table.num_rows), compression="zstd",
                       use_dictionary=["split"])
        commit_file(self.tmp_path, final)
        start = self.index * self.piece_chunks
        entry = {"name": final.name, "chunk_start": start, "chunk_stop": start + table.num_rows,
                 "bytes": final.stat().st_size, "sha256": sha256_of(final)}
        self._pending, self._pending_chunks = [], 0
        self.index += 1
        self.on_piece(entry)


def _chunk_table_entries(manifest: dict[str, Any], directory: Path) -> list[dict[str, Any]]:
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
        files.plain_name(entry["name"], path)
        if entry["chunk_start"] != next_chunk or entry["chunk_stop"] <= entry["chunk_start"]:
            raise DataError(f"{path}: chunk table {entry['name']} does not continue at chunk {next_chunk}")
        next_chunk = entry["chunk_stop"]
    return entries


def chunk_table_problems(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """`verify`'s findings on the per-chunk table: each piece's size and sha256, and its chunk count."""
    if manifest.get("chunk_tables") is None:
        return []
    try:
        entries = _chunk_table_entries(manifest, directory)
    except DataError as exc:
        return [str(exc)]
    problems = [p for p in (files.file_problem(directory, e, "chunk table") for e in entries) if p]
    chunks = sum(manifest.get("counts", {}).get("chunks", {}).values())
    if manifest["complete"] and not problems and entries and entries[-1]["chunk_stop"] != chunks:
        problems.append(f"the manifest counts {chunks:,} chunks but the chunk tables hold {entries[-1]['chunk_stop']:,}")
    return problems


def read_chunk_table(directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The whole per-chunk table of a complete dataset, each piece checked against its entry first.

    Returns doc_id, chunk_id (m,) int64, split (m,) object, next_token_id (m,) int32,
    token_ids (m, T) int32 and nll, mu, var (m, T) float32 (all NaN when extracted with
    --no-loss), in extraction order: chunk i owns rows i * rows_per_chunk onwards.
    """
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    if not manifest["complete"]:
        raise DataError(f"dataset '{directory}' is incomplete: rerun the same `memscan extract` command to finish it")
    entries = _chunk_table_entries(manifest, directory)
    tables = [read_table(files.check_file(directory, entry, "chunk table")) for entry in entries]
    table = pa.concat_tables(tables) if tables else CHUNK_TABLE_SCHEMA.empty_table()
    length = manifest["chunk_tokens"]
    m = table.num_rows

    def matrix(name: str, dtype: type) -> np.ndarray:
        column = table.column(name).combine_chunks()
        if column.null_count == m and m:
            return np.full((m, length), np.nan, dtype)
        return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(m, length)

    out = {name: np.concatenate([_column_numpy(part) for part in table.column(name).chunks])
           for name in ("doc_id", "chunk_id", "split", "next_token_id")}
    out["token_ids"] = matrix("token_ids", np.int32)
    out.update({name: matrix(name, np.float32) for name in PER_TOKEN_COLUMNS})
    return out


def read_labelled_texts(path: Path, text_column: str, label_column: str, batch_rows: int = 4096,
                        ) -> Iterator[tuple[str, str]]:
    """(text, label as a string) of each row of a user's Parquet file with a non-empty text."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None
    for column, flag in ((text_column, "--text-column"), (label_column, "--split-column/--key-column")):
        if column not in parquet.schema_arrow.names:
            raise InputError(f"{path} has no column '{column}'; columns are: "
                             f"{', '.join(parquet.schema_arrow.names)} (choose one with {flag})")
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_column, label_column]):
        texts, labels = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        yield from ((text, str(label)) for text, label in zip(texts, labels) if text)
