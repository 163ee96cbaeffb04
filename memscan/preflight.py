"""Before an extraction starts: what it will write and whether the disk holds it; after its first batch,
how long it will take.

The estimate is the uncompressed size of what `store` writes: each row's vector (the vec
column is stored without compression) plus its metadata columns, and each chunk's row in
the per-chunk table. Parquet's footers and the compression of the metadata columns make
the files a little smaller at real widths; the check refuses a run only when even the
estimate's bytes are not free.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memscan.errors import InputError

log = logging.getLogger(__name__)

ROW_METADATA_BYTES = 40     # row_id, doc_id, chunk_id (int64), position, token ids, nll (32-bit), layer, split
TOKEN_ID_BYTES = 4          # per-chunk table: token_ids int32, per token
TOKEN_LOSS_BYTES = 12       # and nll, mu, var float32, per token (null lists with --no-loss)
PER_CHUNKS = 1000           # the unit of the estimate when the number of chunks is not known in advance


@dataclass(frozen=True)
class Estimate:
    """Bytes an extraction writes for `chunks` chunks: all of them (`known`), or PER_CHUNKS of an open-ended run."""

    chunks: int
    known: bool
    rows_per_chunk: int
    chunk_row_bytes: int     # the bytes of one chunk's rows in the shards
    shard_rows: int
    table_bytes: int         # the per-chunk table's bytes for all `chunks`

    @property
    def rows(self) -> int:
        return self.chunks * self.rows_per_chunk

    @property
    def shards(self) -> int:
        return math.ceil(self.rows / self.shard_rows)

    @property
    def shard_bytes(self) -> int:
        """Bytes of one full shard (the last one may be smaller)."""
        return min(self.rows, self.shard_rows) * self.chunk_row_bytes // self.rows_per_chunk

    @property
    def total_bytes(self) -> int:
        return self.chunks * self.chunk_row_bytes + self.table_bytes

    def describe(self) -> str:
        """One line: rows, shards and bytes, for the run or per PER_CHUNKS chunks."""
        scope = f"{self.chunks:,} chunks" if self.known else f"every {self.chunks:,} chunks (the total is not known)"
        return (f"{scope}: {self.rows:,} rows in {self.shards:,} shards of up to {size_text(self.shard_bytes)}, "
                f"{size_text(self.total_bytes)} in all with the per-chunk table")


def estimate(chunks: int | None, widths: list[int], positions: int, vec_dtype: str, chunk_tokens: int,
             shard_rows: int, loss: bool) -> Estimate:
    """What `chunks` chunks (None: PER_CHUNKS of them) write, each with `positions` rows per width in `widths`
    (one width per stored layer or site).

    vec_dtype: float16 | float32; a row of width n is n x its bytes + ROW_METADATA_BYTES,
    a chunk's row of the per-chunk table chunk_tokens x 16 bytes (x 4 with `loss` False).
    """
    count = PER_CHUNKS if chunks is None else chunks
    chunk_row_bytes = positions * (sum(widths) * np.dtype(vec_dtype).itemsize + len(widths) * ROW_METADATA_BYTES)
    token_bytes = TOKEN_ID_BYTES + (TOKEN_LOSS_BYTES if loss else 0)
    return Estimate(chunks=count, known=chunks is not None, rows_per_chunk=positions * len(widths),
                    chunk_row_bytes=chunk_row_bytes, shard_rows=shard_rows,
                    table_bytes=count * chunk_tokens * token_bytes)


def written_bytes(manifest: Mapping[str, Any] | None) -> int:
    """Bytes of the shards and per-chunk table pieces a resumed run's manifest lists (0 for a fresh start)."""
    if manifest is None:
        return 0
    return sum(entry["bytes"] for entry in [*manifest["shards"], *(manifest["chunk_tables"] or [])])


def check_space(out: Path, plan: Estimate, manifest: Mapping[str, Any] | None, freed: int = 0) -> None:
    """Log what the run will write; refuse (InputError, one line) when `out`'s file system lacks the space.

    What a resumed run's manifest already lists counts as written; the `freed` bytes of the
    files the run removes before writing (an extraction it replaces) count as free. Only a
    run of known size can be refused; an open-ended one logs how many chunks the space holds.
    """
    free = shutil.disk_usage(out).free + freed
    log.info("will write %s; %s free", plan.describe(), size_text(free))
    if not plan.known:
        log.info("the free space holds about %s chunks", f"{free * plan.chunks // max(plan.total_bytes, 1):,}")
        return
    needed = max(plan.total_bytes - written_bytes(manifest), 0)
    if needed > free:
        raise InputError(f"--out '{out}' needs about {size_text(needed)} for {plan.rows:,} rows of {plan.chunks:,} "
                         f"chunks, but its file system has {size_text(free)} free"
                         f"{f' with the {size_text(freed)} it would replace' if freed else ''}; "
                         "free space, lower --num-chunks or choose another --out (nothing was removed)")


def time_line(batches: int | None, seconds_per_batch: float, batch_size: int) -> str:
    """The expected time of `batches` batches (None: of PER_CHUNKS chunks) at the first batch's pace."""
    if batches is None:
        per_chunks = seconds_per_batch * PER_CHUNKS / batch_size
        return f"first batch took {seconds_per_batch:.2f} s: about {duration(per_chunks)} per {PER_CHUNKS:,} chunks"
    return (f"first batch took {seconds_per_batch:.2f} s: about {duration(batches * seconds_per_batch)} "
            f"for the {batches:,} batches of this run")


class FirstBatchClock:
    """Times the first batch a run computes and logs `time_line` once, after it."""

    def __init__(self, batches: int | None, batch_size: int):
        self.batches, self.batch_size = batches, batch_size
        self._began: float | None = None
        self._logged = False

    def start(self) -> None:
        if not self._logged:
            self._began = time.perf_counter()

    def stop(self) -> None:
        if self._logged or self._began is None:
            return
        self._logged = True
        log.info(time_line(self.batches, time.perf_counter() - self._began, self.batch_size))


def size_text(size: float) -> str:
    """Bytes in the largest of GB, MB, kB that keeps a whole number in front: 117.8 kB, 2.4 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size:,.0f} B"


def duration(seconds: float) -> str:
    """H:MM:SS, rounded to the second."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
