"""manifest.json of a dataset folder: built, signed and written here, and read back checked once so readers trust it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa

from memscan import files, folders
from memscan.errors import DataError, InputError
from memscan.files import write_json_atomic
from memscan.layout import parse_positions
from memscan.store.formats import (DEFAULT_SITE, FORMAT, FORMAT_VERSION, MANIFEST, READABLE_VERSIONS, SIGNED_SINCE,
                                   VEC_DTYPES, schema)


def new_manifest(*, fingerprint: str | None, settings: dict[str, Any], model: dict[str, Any],
                 source: dict[str, Any], n: int | None = None, layers: list[int] | None = None, positions: str,
                 chunk_tokens: int,
                 dtype: str, vec_dtype: str, seed: int | None, rows_per_chunk: int,
                 versions: dict[str, str] | None = None, split_rule: dict[str, Any] | None = None,
                 chunk_table_chunks: int | None = None, sites: list[dict[str, Any]] | None = None,
                 ) -> dict[str, Any]:
    """The manifest of a dataset being written: incomplete, no shards yet (docs/formats.md, `manifest.json`).

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


def require_complete(manifest: dict[str, Any], directory: str | os.PathLike[str]) -> None:
    """Refuse, in one DataError line, a dataset whose extraction has not finished."""
    if not manifest["complete"]:
        raise DataError(f"dataset '{directory}' is incomplete: rerun the same `memscan extract` command to finish it")


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
        if folders.listed_name(folders.DATASET, shard["name"], path) in names:
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
