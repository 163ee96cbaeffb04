"""Where work runs: the engine a caller builds at the edge and passes into index, query and extract.

`LocalEngine` holds the shards, runs the exact searches, plans the chunks and runs the model in this process;
`ray_runner.RayEngine` does each on Ray. Both answer exactly as `knn.exact.knn` and write the same datasets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from memscan import corpus, preflight
from memscan.engines import capture, planning
from memscan.engines.capture import CapturePool, CaptureSpec, Deliver, ModelRequest, OpenedModel
from memscan.engines.planning import ChunkPlan, ChunkRequest
from memscan.knn.exact import Block, Request
from memscan.knn.shards import InProcess, Shard, Shards

K = TypeVar("K")
T = TypeVar("T")


class Engine:
    """Where work runs: index shards are held, exact searches run, chunks are planned and the model runs in
    this process (`LocalEngine`) or on Ray (`memscan.engines.ray_runner.RayEngine`). The caller builds one
    and passes it in."""

    name: ClassVar[str] = "abstract"   # recorded in index.json and the dataset's manifest

    def open_shards(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str,
                    ) -> tuple[Shards, Engine]:
        """The shards `makers` make (each called with `device=`, where this engine keeps them) and
        the engine that runs exact searches beside them on `device`."""
        raise NotImplementedError

    def knn(self, query_blocks: Iterable[Block], database_blocks: Callable[[], Iterable[Block]], k: int, *,
            metric: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query ids (nq,), D (nq, k), I (nq, k)) exactly as the module's `knn`."""
        raise NotImplementedError

    def knn_each(self, requests: Sequence[Request], database_blocks: Callable[[], Iterable[Block]], *,
                 block_rows: int = 65536) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every request's (D, I) exactly as the module's `knn_each`, from one pass over the database."""
        raise NotImplementedError

    def self_join(self, blocks: Callable[[], Iterable[Block]], k: int, *, metric: str = "l2",
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every pattern its k nearest OTHER patterns: (row ids, D, I)."""
        return self.knn(blocks(), blocks, k, metric=metric, exclude_self=True)

    def map_blocks(self, function: Callable[..., T], blocks: Callable[[], Iterable[Block]], *args: Any) -> Iterator[T]:
        """`function(block, *args)` for every block, in block order (for statistics that stream over patterns)."""
        return (function(block, *args) for block in blocks())

    def check_model(self, request: ModelRequest) -> None:
        """Refuse, before any work, a model request this engine cannot run (every engine runs what it opens)."""

    def open_model(self, request: ModelRequest) -> OpenedModel:
        """The model as the driver holds it, on the device and dtype where this engine runs it."""
        raise NotImplementedError

    def plan(self, source: corpus.Source, rule: corpus.SplitRule, request: ChunkRequest,
             tokenizer: PreTrainedTokenizerBase) -> ChunkPlan:
        """The chunks of `source` in row order, labelled by `rule`, as `planning.plan_here` gives them."""
        raise NotImplementedError

    def capture_pool(self, spec: CaptureSpec, model: OpenedModel, deliver: Deliver[K],
                     clock: preflight.FirstBatchClock) -> CapturePool[K]:
        """A pool that runs `spec`'s capture of each submitted batch and hands the results to `deliver` in
        submission order; close it when done."""
        raise NotImplementedError


@dataclass(frozen=True)
class LocalEngine(InProcess, Engine):
    """Shards held and block pairs searched one after another in this process, as knn's own default
    (`knn.shards.InProcess`, with `backend`; None: faiss on the CPU); chunks planned and the model run here too."""

    def open_model(self, request: ModelRequest) -> OpenedModel:
        """The model loaded in this process (`capture.open_here`)."""
        return capture.open_here(request)

    def plan(self, source: corpus.Source, rule: corpus.SplitRule, request: ChunkRequest,
             tokenizer: PreTrainedTokenizerBase) -> ChunkPlan:
        """The chunks read and tokenized in this process (`planning.plan_here`)."""
        return planning.plan_here(source, rule, request, tokenizer)

    def capture_pool(self, spec: CaptureSpec, model: OpenedModel, deliver: Deliver[K],
                     clock: preflight.FirstBatchClock) -> CapturePool[K]:
        """Each batch captured in this process as it is submitted (`capture.LocalCapturePool`)."""
        return capture.LocalCapturePool(spec, model, deliver, clock)
