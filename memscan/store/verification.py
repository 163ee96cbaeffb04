"""`memscan verify`: every problem in a dataset folder, each file it lists checked by size, sha256, schema and rows."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memscan import files, folders
from memscan.store.chunks import chunk_table_problems
from memscan.store.manifest import read_manifest
from memscan.store.tally import schema_problem, shard_tally, tally_problems


def verify(directory: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a dataset folder: manifest (signature, shape, its own counts), completeness,
    shards (size, sha256, schema, row ids), the rows per split and per site and layer that the shards'
    `split`, `site` and `layer` columns hold against the manifest's counts, and the chunk tables."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = [] if manifest["complete"] else ["the dataset is incomplete (extraction did not finish)"]
    tally: collections.Counter[tuple[str, str, int]] = collections.Counter()
    for shard in manifest["shards"]:
        problem = folders.file_problem(directory, folders.DATASET, shard, "shard")
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
