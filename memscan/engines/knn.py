"""Where nearest-neighbour work runs: the engine a caller builds at the edge and passes into index and query.

`LocalEngine` holds the shards and runs the exact searches in this process; `ray_runner.RayEngine` holds each
shard in a Ray actor. Both answer exactly as `knn.exact.knn`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from memscan.knn import exact
from memscan.knn.exact import Block
from memscan.knn.shards import LocalShards, Shard, Shards

T = TypeVar("T")


class Engine:
    """Where work runs: index shards are held and exact searches run in this process (`LocalEngine`)
    or on Ray (`memscan.engines.ray_runner.RayEngine`). The caller builds one and passes it in."""

    name: ClassVar[str] = "abstract"   # recorded in index.json

    def open_shards(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str,
                    ) -> tuple[Shards, Engine]:
        """The shards `makers` make (each called with `device=`, where this engine keeps them) and
        the engine that runs exact searches beside them on `device`."""
        raise NotImplementedError

    def knn(self, query_blocks: Iterable[Block], database_blocks: Callable[[], Iterable[Block]], k: int, *,
            metric: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query ids (nq,), D (nq, k), I (nq, k)) exactly as the module's `knn`."""
        raise NotImplementedError

    def self_join(self, blocks: Callable[[], Iterable[Block]], k: int, *, metric: str = "l2",
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every pattern its k nearest OTHER patterns: (row ids, D, I)."""
        return self.knn(blocks(), blocks, k, metric=metric, exclude_self=True)

    def map_blocks(self, function: Callable[..., T], blocks: Callable[[], Iterable[Block]], *args: Any) -> Iterator[T]:
        """`function(block, *args)` for every block, in block order (for statistics that stream over patterns)."""
        return (function(block, *args) for block in blocks())


@dataclass(frozen=True)
class LocalEngine(Engine):
    """Block pairs searched one after another in this process, with `backend` (None: faiss on the CPU)."""

    backend: exact.Backend | None = None
    name: ClassVar[str] = "local"

    def open_shards(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str,
                    ) -> tuple[Shards, Engine]:
        """The shards made here, one after another; exact searches with `choose_backend(device)`."""
        return LocalShards([make(device=device) for make in makers], metric), LocalEngine(exact.choose_backend(device))

    def knn(self, query_blocks: Iterable[Block], database_blocks: Callable[[], Iterable[Block]], k: int, *,
            metric: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return exact.knn(query_blocks, database_blocks, k, metric=metric, exclude_self=exclude_self, backend=self.backend)
