"""The Ray engine: every stage's scale-out on Ray, behind the local engine's interface (same inputs, same outputs).

Exact kNN runs as tasks over block pairs and index shards in actors (`ray_knn`); extraction
plans its chunks in tasks per piece of the source (`ray_planning`) and runs its forward
passes in capture actors (`ray_capture`); the driver merges and writes in the local order, so
the tables equal the local ones. Connects to `address` (a running cluster) or starts a local
instance (`ray_options`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from memscan import corpus, preflight
from memscan.engines import knn as knn_engine
from memscan.engines.capture import CaptureSpec, Deliver, ModelRequest, OpenedModel
from memscan.engines.planning import ChunkPlan, ChunkRequest
from memscan.engines.ray_capture import RayCapturePool, open_on_workers
from memscan.engines.ray_knn import RayShards, pair_on_worker, request_on_worker
from memscan.engines.ray_options import RayOptions, connect, ray_get_all
from memscan.engines.ray_planning import plan_on_ray
from memscan.errors import InputError
from memscan.knn import exact
from memscan.knn.shards import Shard, Shards

__all__ = ["RayEngine", "RayOptions", "connect"]   # RayOptions and connect: where callers found them before the split
K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True)
class RayEngine(knn_engine.Engine):
    """Exact kNN as one Ray task per (query block, database block), merged on the driver like the local
    run; index shards each in a Ray actor (`RayShards`); extraction planned in Ray tasks and captured in
    Ray actors."""

    options: RayOptions = RayOptions()
    device: str = "auto"             # as in exact.choose_backend, on each worker
    name: ClassVar[str] = "ray"

    def open_shards(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str,
                    ) -> tuple[Shards, RayEngine]:
        """One actor per shard; exact searches in tasks beside them, on CPUs where the shards hold every GPU."""
        shards = RayShards(makers, metric, device, self.options)
        search = shards.search_options
        return shards, RayEngine(search, search.worker_device(device))

    def knn(self, query_blocks: Iterable[exact.Block], database_blocks: Callable[[], Iterable[exact.Block]], k: int,
            *, metric: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Equal to `exact.knn`; each database block is put in the object store once."""
        ray = connect(self.options)
        # max_calls=0: GPU tasks reuse their worker process, so its backend and GPU memory pool stay
        pair = ray.remote(max_calls=0, **self.options.task_resources())(pair_on_worker)
        database = [ray.put(block) for block in database_blocks()]
        parts = []
        for query_ids, xq in query_blocks:
            query = ray.put((query_ids, xq))
            candidates = ray_get_all([pair.remote(query, block, k, metric, exclude_self, self.device)
                                      for block in database])
            parts.append((query_ids, *exact.merge(candidates, k, metric, len(xq))))  # database order, as locally
        if not parts:
            return np.empty(0, np.int64), np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def knn_each(self, requests: Sequence[exact.Request], database_blocks: Callable[[], Iterable[exact.Block]], *,
                 block_rows: int = 65536) -> list[tuple[np.ndarray, np.ndarray]]:
        """Equal to `exact.knn_each`: one task per (database block, request), merged in database order."""
        ray = connect(self.options)
        task = ray.remote(max_calls=0, **self.options.task_resources())(request_on_worker)
        queued = [ray.put(request) for request in requests]
        found: list[list[Any]] = [[] for _ in requests]
        for block in database_blocks():
            database = ray.put(block)
            for refs, request in zip(found, queued):
                refs.append(task.remote(request, database, block_rows, self.device))
        return [exact.merge([part for part in ray_get_all(refs) if part is not None], request.k, request.metric,
                            len(request.ids)) for refs, request in zip(found, requests)]

    def map_blocks(self, function: Callable[..., T], blocks: Callable[[], Iterable[exact.Block]], *args: Any,
                   ) -> Iterator[T]:
        """One Ray task (on a CPU) per block; arrays among `args` are put in the object store once."""
        ray = connect(self.options)
        task = ray.remote(num_cpus=self.options.cpus_per_worker)(function)
        shared = [ray.put(arg) if isinstance(arg, np.ndarray) else arg for arg in args]
        return iter(ray_get_all([task.remote(block, *shared) for block in blocks()]))

    def check_model(self, request: ModelRequest) -> None:
        """Refuses --device-map: each Ray worker loads a whole model."""
        if request.device_map is not None:
            raise InputError("--device-map auto runs with --engine local (each Ray worker loads a whole model)")

    def open_model(self, request: ModelRequest) -> OpenedModel:
        """The model resolved on a worker and described here without weights (`ray_capture.open_on_workers`)."""
        return open_on_workers(request, self.options)

    def plan(self, source: corpus.Source, rule: corpus.SplitRule, request: ChunkRequest,
             tokenizer: PreTrainedTokenizerBase) -> ChunkPlan:
        """Planned by Ray tasks, one per piece of the source, streamed in order; each loads its own tokenizer."""
        return plan_on_ray(source, rule, request, self.options)

    def capture_pool(self, spec: CaptureSpec, model: OpenedModel, deliver: Deliver[K],
                     clock: preflight.FirstBatchClock) -> RayCapturePool[K]:
        """`num_workers` capture actors, each loading the model on its first batch; batches overlap, so the
        first is not timed."""
        return RayCapturePool(spec, self.options, deliver)
