"""What a shard holds against what its manifest says: its schema, and its rows per split, site and layer."""

from __future__ import annotations

import collections
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memscan.store.formats import DEFAULT_SITE
from memscan.store.manifest import kept_positions, shard_schema, sites_of


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
