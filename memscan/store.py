"""The activation store: shard schema, manifest, atomic writes, checksums, streaming reads.

The only module that touches Parquet. A dataset folder holds `part-00000.parquet`, ...
and `manifest.json`; a shard is listed in the manifest only after it is fully written,
fsynced and renamed into place, so a listed shard is always whole.
"""

from __future__ import annotations

import collections
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
from memscan.layout import RESIDUAL, parse_positions

log = logging.getLogger(__name__)

FORMAT = "memscan.activations"
FORMAT_VERSION = 3             # 2: a `site` column beside `layer`, and the manifest's `sites`; 3: version 2, signed
READABLE_VERSIONS = (1, 2, 3)  # version 1 holds the residual stream only: every row is site "hidden"
SIGNED_SINCE = 3               # manifests of versions 1-2 (an earlier memscan) carry no self_sha256
DEFAULT_SITE = RESIDUAL
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
    """manifest.json of a dataset folder, its signature, shape and counts checked once here: readers then trust it.

    A manifest that does not parse, fails its self_sha256 (version 3, or any version that
    carries one), lacks a key, holds a value of the wrong type or range, names a shard outside
    its folder, or whose counts, rows per chunk and shard row ranges do not add up
    (`_cross_check`) is one DataError line naming the file and the key.
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
    if manifest["format_version"] >= SIGNED_SINCE or files.SELF_SHA256 in manifest:
        files.check_signature(manifest, path)
    for key, kinds in _MANIFEST_FIELDS.items():
        files.require(manifest, key, kinds, path)
    _check_shape(manifest, path)
    _cross_check(manifest, path)
    return manifest


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a dataset's manifest.json, signed (self_sha256 over the rest), atomically; returns what was written.

    The one way memscan writes a manifest: extraction (each shard and chunk-table piece it
    lists, then the counts) and `write_vectors`. A stale self_sha256 in `manifest` (one read
    back to resume) is replaced; the fingerprint and every other key are written as they are.
    """
    document = files.signed(manifest)
    write_json_atomic(Path(directory) / MANIFEST, document)
    return document


def kept_positions(manifest: dict[str, Any], path: Path | None = None) -> int:
    """How many positions of each chunk every site and layer stores (the manifest's `positions`).

    Imported vectors (`write_vectors`, positions "n/a") hold one per pseudo-chunk.
    """

    if manifest["positions"] == "n/a":
        return 1
    try:
        return len(parse_positions(manifest["positions"], manifest["chunk_tokens"]))
    except InputError:
        raise DataError(f"{path or MANIFEST}: 'positions' must be last, all or every:K with 1 <= K <= "
                        f"'chunk_tokens' ({manifest['chunk_tokens']}); got {json.dumps(manifest['positions'])[:60]}"
                        ) from None


def _cross_check(manifest: dict[str, Any], path: Path) -> None:
    """The manifest against itself (no file read): rows per chunk = site layers x kept positions; for a
    complete dataset, rows per split = its chunks x rows per chunk, the splits' rows = the shards' row
    ranges and their chunks = the chunk tables'. Each mismatch is one DataError line naming the key."""
    sets = sum(len(site["layers"]) for site in sites_of(manifest))
    positions = kept_positions(manifest, path)
    if manifest["rows_per_chunk"] != sets * positions:
        raise DataError(f"{path}: 'rows_per_chunk' must be the {sets} site layers ('sites') x {positions} kept "
                        f"positions ('positions') = {sets * positions}; got {manifest['rows_per_chunk']}")
    if not manifest["complete"]:
        return
    chunks, rows = manifest["counts"]["chunks"], manifest["counts"]["rows"]
    if set(chunks) != set(rows):
        raise DataError(f"{path}: 'counts.rows' must count the splits of 'counts.chunks' "
                        f"({', '.join(sorted(chunks))}); got {', '.join(sorted(rows))}")
    for split in sorted(rows):
        if rows[split] != chunks[split] * manifest["rows_per_chunk"]:
            raise DataError(f"{path}: 'counts.rows' of split {split} must be its {chunks[split]:,} chunks "
                            f"('counts.chunks') x {manifest['rows_per_chunk']} ('rows_per_chunk') = "
                            f"{chunks[split] * manifest['rows_per_chunk']:,}; got {rows[split]:,}")
    stored = manifest["shards"][-1]["row_stop"] if manifest["shards"] else 0
    if sum(rows.values()) != stored:
        raise DataError(f"{path}: 'counts.rows' add up to {sum(rows.values()):,} rows but the shards' row ranges "
                        f"('shards') hold {stored:,}")
    tables = manifest.get("chunk_tables")
    last = tables[-1] if isinstance(tables, list) and tables else None
    if isinstance(last, dict) and type(last.get("chunk_stop")) is int and last["chunk_stop"] != sum(chunks.values()):
        raise DataError(f"{path}: 'counts.chunks' add up to {sum(chunks.values()):,} chunks but the chunk tables "
                        f"('chunk_tables') hold {last['chunk_stop']:,}")


def expected_rows(manifest: dict[str, Any]) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """What a complete manifest says its shards hold: rows per split ('counts.rows') and per (site, layer)."""
    per_set = sum(manifest["counts"]["chunks"].values()) * kept_positions(manifest)
    return (dict(manifest["counts"]["rows"]),
            {(site["name"], layer): per_set for site in sites_of(manifest) for layer in site["layers"]})


def shard_tally(parquet: pq.ParquetFile) -> collections.Counter[tuple[str, str, int]]:
    """Rows of a (checked) shard per (split, site, layer), from its metadata columns alone."""
    names = [name for name in ("split", "site", "layer") if name in parquet.schema_arrow.names]
    groups = parquet.read(columns=names).group_by(names).aggregate([([], "count_all")])
    columns = [groups.column(name).to_pylist() for name in (*names, "count_all")]
    if "site" not in names:   # version 1: every row is the residual stream
        columns.insert(1, [DEFAULT_SITE] * groups.num_rows)
    return collections.Counter({(split, site, layer): count for split, site, layer, count in zip(*columns)})


def tally_problems(manifest: dict[str, Any], tally: collections.Counter[tuple[str, str, int]],
                   whole: bool = True) -> list[str]:
    """Where the rows the shards hold (`tally`, per (split, site, layer)) differ from the manifest's counts.

    With `whole` (every shard tallied) a count must match exactly; otherwise (some shards) it
    must not be exceeded. One line per mismatch, naming the manifest key.
    """
    splits, sets = expected_rows(manifest)
    held_splits: collections.Counter[str] = collections.Counter()
    held_sets: collections.Counter[tuple[str, int]] = collections.Counter()
    for (split, site, layer), count in tally.items():
        held_splits[split] += count
        held_sets[(site, layer)] += count

    def wrong(claimed: int, held: int) -> bool:
        return held != claimed if whole else held > claimed

    problems = [f"'counts.rows' counts {splits.get(split, 0):,} {split} rows but the shards hold "
                f"{'' if whole else 'at least '}{held_splits[split]:,}"
                for split in sorted(set(splits) | set(held_splits)) if wrong(splits.get(split, 0), held_splits[split])]
    problems += [f"'sites', 'positions' and 'counts.chunks' make {sets.get(key, 0):,} rows of site {key[0]} layer "
                 f"{key[1]} but the shards hold {'' if whole else 'at least '}{held_sets[key]:,}"
                 for key in sorted(set(sets) | set(held_sets), key=str) if wrong(sets.get(key, 0), held_sets[key])]
    return problems


def schema_problem(name: str, found: pa.Schema, manifest: dict[str, Any]) -> str | None:
    """One line when a shard's Parquet schema is not the one its manifest describes (widths, dtype, columns)."""
    expected = shard_schema(manifest)
    if found.equals(expected):
        return None
    if found.names != expected.names:
        return (f"shard {name} has the columns {', '.join(found.names)}; 'format_version' "
                f"{manifest['format_version']} has {', '.join(expected.names)}")
    column = next(field.name for field, want in zip(found, expected) if not field.equals(want))
    keys = "'sites' (n) and 'vec_dtype'" if column == "vec" else "'format_version'"
    return (f"shard {name} stores {column} as {found.field(column).type}; the manifest's {keys} say "
            f"{expected.field(column).type}")


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
                files.new_tmp(self.directory / SHARD_PATTERN.format(self.shard_index)), self.schema, compression={name: "zstd" for name in metadata},
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
    so a corrupt or truncated shard is named, never half-read; its schema is then checked
    against the manifest's sites, and its rows per split and per site and layer are added up:
    rows beyond the manifest's counts (or, once every shard is read, any difference) are one
    DataError line before a row of that shard is read.
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
        self._tally: collections.Counter[tuple[str, str, int]] = collections.Counter()

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
            parquet = pq.ParquetFile(path, memory_map=True)
            problem = schema_problem(shard["name"], parquet.schema_arrow, self.manifest)
            self._tally.update(shard_tally(parquet))
            whole = len(self._verified) + 1 == len(self.shards)
            problems = [problem] if problem else tally_problems(self.manifest, self._tally, whole)
            if problems:
                raise DataError(f"{self.directory / MANIFEST}: {problems[0]}; run `memscan verify {self.directory}`")
            self._verified.add(shard["name"])
            return parquet
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
    """Every problem found in a dataset folder: manifest (signature, shape, its own counts), completeness,
    shards (size, sha256, schema, row ids), the rows per split and per site and layer that the shards'
    `split`, `site` and `layer` columns hold against the manifest's counts, and the chunk tables."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = [] if manifest["complete"] else ["the dataset is incomplete (extraction did not finish)"]
    tally: collections.Counter[tuple[str, str, int]] = collections.Counter()
    for shard in manifest["shards"]:
        problem = files.file_problem(directory, shard, "shard")
        if problem:
            problems.append(problem)
            continue
        problems.extend(_shard_content_problems(directory / shard["name"], shard, manifest, tally))
    if manifest["complete"] and not problems:
        problems.extend(tally_problems(manifest, tally))
    problems.extend(chunk_table_problems(directory, manifest))
    return problems


def _shard_content_problems(path: Path, shard: dict[str, Any], manifest: dict[str, Any],
                            tally: collections.Counter[tuple[str, str, int]]) -> list[str]:
    """A whole shard's schema and row ids against its manifest entry (row ids row_start..row_stop-1 in order);
    its rows per (split, site, layer) are added to `tally`."""
    try:
        parquet = pq.ParquetFile(path)
        row_ids = parquet.read(columns=["row_id"]).column("row_id").to_numpy()
        problem = schema_problem(shard["name"], parquet.schema_arrow, manifest)
        if not problem:
            tally.update(shard_tally(parquet))
    except (pa.ArrowInvalid, OSError) as exc:
        return [f"shard {shard['name']} is not a readable Parquet file ({files.first_line(exc)})"]
    problems = [problem] if problem else []
    if not np.array_equal(row_ids, np.arange(shard["row_start"], shard["row_stop"])):
        problems.append(f"shard {shard['name']} does not hold rows {shard['row_start']}-{shard['row_stop'] - 1} in order")
    return problems


def read_text_column(path: Path, column: str, batch_rows: int = 4096) -> Iterator[str]:
    """Stream one string column of a user's Parquet file (a text source): its non-empty texts (`_text_rows`)."""
    yield from (text for text, in _text_rows(path, (column,), batch_rows))


def _text_rows(path: Path, columns: tuple[str, ...], batch_rows: int) -> Iterator[tuple[Any, ...]]:
    """The given columns of each row of a user's Parquet file whose text (the first column) is neither null nor empty.

    A text column that is not of a string type (a struct, a list, a number) is refused at once, and a text that is
    not UTF-8 (a lone surrogate) at its row (counted from 1): one line each, never a tokenizer's traceback.
    """
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None
    schema = parquet.schema_arrow
    for column in columns:
        if column not in schema.names:
            flag = "--text-column" if column == columns[0] else "--split-column/--key-column"
            raise InputError(f"{path} has no column '{column}'; columns are: {', '.join(schema.names)} "
                             f"(choose one with {flag})")
    kind = schema.field(columns[0]).type
    if not _is_text_type(kind):
        raise InputError(f"{path}: column '{columns[0]}' is of type {kind}, not a string (choose the text column "
                         "with --text-column)")
    first_row = 1
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns)):
        texts = _batch_texts(batch.column(0), path, columns[0], first_row)
        yield from (row for row in zip(texts, *(c.to_pylist() for c in batch.columns[1:])) if row[0])
        first_row += batch.num_rows


def _is_text_type(kind: pa.DataType) -> bool:
    """Whether a Parquet column holds strings (plain, large, view or dictionary-encoded)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _batch_texts(texts: pa.Array, path: Path, column: str, first_row: int) -> list[str | None]:
    """One batch's texts as str; a value that is not UTF-8 (Parquet's string type does not guarantee it) is refused
    naming its row."""
    try:
        return texts.to_pylist()
    except UnicodeDecodeError:
        row = first_row + next(i for i in range(len(texts)) if not _decodes(texts[i]))
        raise InputError(f"{path} row {row}: '{column}' is not valid UTF-8 text (a lone surrogate, or bytes of "
                         "another encoding)") from None


def _decodes(value: pa.Scalar) -> bool:
    """Whether a Parquet string value decodes as UTF-8."""
    try:
        value.as_py()
    except UnicodeDecodeError:
        return False
    return True


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
        pq.write_table(table, files.new_tmp(final), row_group_size=max(1, table.num_rows), compression="zstd",
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
    if manifest["complete"] and not problems:
        held: collections.Counter[str] = collections.Counter()
        for entry in entries:
            try:
                split = pq.read_table(directory / entry["name"], columns=["split"]).column("split").combine_chunks()
            except (pa.ArrowInvalid, OSError, KeyError) as exc:
                problems.append(f"chunk table {entry['name']} is not a readable Parquet file ({files.first_line(exc)})")
                continue
            held.update(_column_numpy(split).tolist())
        claimed = manifest["counts"]["chunks"]
        problems += [f"'counts.chunks' counts {claimed.get(split, 0):,} {split} chunks but the chunk tables hold "
                     f"{held[split]:,}" for split in sorted(set(claimed) | set(held))
                     if not problems and claimed.get(split, 0) != held[split]]
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
    """(text, label as a string) of each row of a user's Parquet file with a non-empty text (`_text_rows`)."""
    yield from ((text, str(label)) for text, label in _text_rows(path, (text_column, label_column), batch_rows))
