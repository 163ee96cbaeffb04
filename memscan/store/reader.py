"""Reading an activation dataset at one site: ActivationDataset streams its rows, each shard checked before use."""

from __future__ import annotations

import collections
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscan import folders
from memscan.errors import DataError, InputError
from memscan.store.formats import DEFAULT_SITE, MANIFEST, column_numpy
from memscan.store.manifest import read_manifest, require_complete, sites_of
from memscan.store.tally import schema_problem, shard_tally, tally_problems


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
        require_complete(self.manifest, directory)
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
            groups = [group for group in range(first, last + 1)
                      if self._may_hold(parquet.metadata.row_group(group), split, layer)]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted, row_groups=groups):
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
        return self.columns(split, layer)["row_id"]

    def columns(self, split: str | None = None, layer: int | None = None,
                columns: Sequence[str] = ("row_id",)) -> dict[str, np.ndarray]:
        """Per-row `columns` (each (m,), row order) of a split and layer, no vectors read: what `iter_batches`
        gives beside X, for a pass that takes the vectors from elsewhere (an index's own codes)."""
        wanted = list(dict.fromkeys([*columns, *self._filter_columns]))
        batches = [self._filter(batch, split, layer, (0, self.total_rows))
                   for shard in self.shards for batch in self._open_checked(shard).iter_batches(columns=wanted)]
        return {name: (np.concatenate([column_numpy(batch.column(name)) for batch in batches]) if batches
                       else np.empty(0, np.int64)) for name in columns}

    def _may_hold(self, group: pq.RowGroupMetaData, split: str | None, layer: int | None) -> bool:
        """Whether a row group's statistics (min and max per column) allow a row of this split, layer and site:
        a split stored apart (a dataset's test rows at its end) is read without decoding the others' vectors."""
        wanted = {"split": split, "layer": layer, "site": None if self._one_site else self.site}
        for number in range(group.num_columns):
            column = group.column(number)
            value = wanted.get(column.path_in_schema)
            statistics = column.statistics if column.is_stats_set else None
            if value is not None and statistics is not None and statistics.has_min_max and not (
                    statistics.min <= value <= statistics.max):
                return False
        return True

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
        """The batches' vectors as one float32 array, converted straight from each batch's buffer (no combined
        copy first), and their `columns`."""
        X = np.empty((sum(batch.num_rows for batch in batches), self.n), np.float32)
        start = 0
        for batch in batches:
            X[start:start + batch.num_rows] = batch.column("vec").flatten().to_numpy(zero_copy_only=False).reshape(
                -1, self.n)
            start += batch.num_rows
        meta = {name: np.concatenate([column_numpy(batch.column(name)) for batch in batches]) for name in columns}
        return X, meta

    def _open_checked(self, shard: dict[str, Any]) -> pq.ParquetFile:
        """Open a shard, checking it is a regular file of its size and sha256 the first time this dataset reads it."""
        path = self.directory / shard["name"]
        if shard["name"] not in self._verified:
            folders.check_file(self.directory, folders.DATASET, shard, "shard")
            parquet = pq.ParquetFile(path, memory_map=True)
            problem = schema_problem(shard["name"], parquet.schema_arrow, self.manifest)
            self._tally.update(shard_tally(parquet))
            whole = len(self._verified) + 1 == len(self.shards)
            problems = [problem] if problem else tally_problems(self.manifest, self._tally, whole)
            if problems:
                raise DataError(f"{self.directory / MANIFEST}: {problems[0]}; run `{shlex.join(['memscan', 'verify', str(self.directory)])}`")
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
            mask = pc.and_(mask, _equals(batch.column("split"), split))
        if layer is not None:
            mask = pc.and_(mask, pc.equal(batch.column("layer"), layer))
        if not self._one_site:
            mask = pc.and_(mask, _equals(batch.column("site"), self.site))
        return batch if pc.all(mask).as_py() else batch.filter(mask)


def _equals(column: pa.DictionaryArray, value: str) -> pa.BooleanArray:
    """Whether each value of a dictionary-encoded column is `value`, compared on the indices (nothing decoded)."""
    where = column.dictionary.index(value).as_py()
    return pc.equal(column.indices, where) if where >= 0 else pa.array(np.zeros(len(column), bool))
