"""Where a run starts from what its manifest lists, and the writers that carry on from there.

Batches are aligned to fixed chunk ranges, so a resumed run recomputes exactly the batches an
uninterrupted run computes, and writes only the rows and per-chunk table pieces not yet listed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan import corpus, models, store
from memscan.extract import rows
from memscan.extract.writing import BackgroundWriter

BatchKey = tuple[int, list[corpus.Chunk]]   # a batch's number and its chunks: the key a capture pool hands back


@dataclass(frozen=True)
class ResumePoint:
    """The rows and per-chunk table chunks a dataset lists, and the batches that still have something to write."""

    batch_size: int
    rows_per_chunk: int
    rows_done: int
    all_written: bool                # a listed partial shard is the last: all rows are written, only counts missing
    chunks_done: int
    table_written: bool              # likewise for the per-chunk table (or the dataset has none)

    @classmethod
    def of(cls, manifest: dict[str, Any], batch_size: int, shard_rows: int) -> ResumePoint:
        """The point a run with `manifest` (new or resumed) starts from."""
        rows_done = manifest["shards"][-1]["row_stop"] if manifest["shards"] else 0
        tables = manifest["chunk_tables"]
        chunks_done = tables[-1]["chunk_stop"] if tables else 0
        table_written = tables is None or chunks_done % (manifest["chunk_table_chunks"] or 1) != 0
        return cls(batch_size, manifest["rows_per_chunk"], rows_done, rows_done % shard_rows != 0, chunks_done,
                   table_written)

    @property
    def first_batch(self) -> int:
        """The batch whose rows are written first."""
        return self.rows_done // (self.batch_size * self.rows_per_chunk)

    @property
    def skip_rows(self) -> int:
        """Rows of `first_batch` already written."""
        return self.rows_done % (self.batch_size * self.rows_per_chunk)

    def rows_wanted(self, b: int) -> bool:
        return not self.all_written and b >= self.first_batch

    def table_wanted(self, b: int) -> bool:
        return not self.table_written and b >= self.chunks_done // self.batch_size   # pieces hold whole batches

    def wanted(self, b: int) -> bool:
        """Whether batch `b` has rows or per-chunk table rows still to write."""
        return self.rows_wanted(b) or self.table_wanted(b)

    def batches(self, total_chunks: int | None) -> int | None:
        """How many batches of a run of `total_chunks` (None: unknown) are computed."""
        return None if total_chunks is None else sum(map(self.wanted, range(-(-total_chunks // self.batch_size))))


@dataclass(frozen=True)
class RowLayout:
    """What each chunk's rows hold: the targets, the kept positions, and the stored vector type."""

    targets: list[models.Target]
    widths: list[int]
    positions: list[int]
    vec_dtype: str


class DatasetWriters:
    """The shard writer (in a thread) and the per-chunk table writer of one run, from `point` on; each file they
    finish is listed in the manifest at once."""

    def __init__(self, out: Path, manifest: dict[str, Any], point: ResumePoint, layout: RowLayout, shard_rows: int,
                 tokenizer: Any):
        self.out, self.manifest, self.point, self.layout = out, manifest, point, layout
        self.tokenizer = tokenizer   # decodes each chunk's text (format version 4)
        version = self.version = manifest["format_version"]   # a dataset begun in version 3 is finished in its layout
        self._recording = threading.Lock()  # shards are recorded from the writer's thread, table pieces from this one
        self.schema = store.shard_schema(manifest)
        start = point.rows_done - point.rows_done % shard_rows
        self.rows = BackgroundWriter(store.ShardWriter(out, self.schema, shard_rows, start, self._record_shard,
                                                       widest=max(layout.widths), format_version=version))
        piece_chunks = manifest["chunk_table_chunks"] or 1
        self.table = store.ChunkTableWriter(out, piece_chunks, point.chunks_done - point.chunks_done % piece_chunks,
                                            lambda entry: self._record("chunk_tables", entry), version)

    def _record(self, key: str, entry: dict[str, Any]) -> None:
        with self._recording:
            self.manifest[key].append(entry)
            store.write_manifest(self.out, self.manifest)

    def _record_shard(self, info: store.ShardInfo) -> None:
        self._record("shards", info.to_dict())

    def write(self, key: BatchKey, captured: models.BatchCapture) -> None:
        """One captured batch's rows and per-chunk table rows, where still wanted."""
        b, batch = key
        vec, nll, *stats = captured
        point, layout = self.point, self.layout
        if point.rows_wanted(b):
            table = rows.batch_table(batch, vec, nll, layout.targets, layout.positions,
                                     b * point.batch_size * point.rows_per_chunk, self.schema, layout.vec_dtype)
            self.rows.put(table.slice(point.skip_rows) if b == point.first_batch and point.skip_rows else table)
        if point.table_wanted(b):
            self.table.write(rows.chunk_rows(batch, stats[0] if stats else None, self.version, self.tokenizer))

    def close(self) -> None:
        self.rows.close()
        self.table.close()

    def abort(self) -> None:
        self.rows.abort()
        self.table.abort()
