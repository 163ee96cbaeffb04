"""Ray's nearest-neighbour work: exact search of one (query block, database block) pair in a task, index
shards each held by an actor (`RayShards`), and views of those shards kept beside them (`RayShardViews`:
the inner-product view of each shard's own lists).

Each runs the local engine's unit of work (`exact.pair_candidates`, `shards.Shard`); the driver merges
in the local order, so the answers equal the local ones.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from memscan.engines.ray_options import RayOptions, connect, gpu_slots, ray_get_all
from memscan.errors import InputError
from memscan.knn import exact
from memscan.knn.shards import Shard, Shards

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)


@functools.cache
def _worker_backend(device: str) -> exact.Backend:
    """The worker's own backend for `device` (auto: faiss-gpu where the task was given a GPU)."""
    return exact.choose_backend(device)


def pair_on_worker(query: exact.Block, database: exact.Block, k: int, metric: str, exclude_self: bool, device: str,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One block pair's candidates (`exact.pair_candidates`) with the worker's backend: a Ray task's body."""
    (query_ids, xq), (db_ids, xb) = query, database
    return exact.pair_candidates(query_ids, xq, db_ids, xb, k, metric, exclude_self, _worker_backend(device))


def request_on_worker(request: exact.Request, database: exact.Block, block_rows: int, device: str,
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """One request's candidates in one database block (`exact.request_candidates`): a Ray task's body."""
    return exact.request_candidates(request, database, block_rows, _worker_backend(device))


class _ShardHolder:
    """A Ray actor holding one `shards.Shard`, made on the worker (and on its GPU when it has one)."""

    def make(self, make: Callable[[], Shard], threads: int) -> np.ndarray:
        """Make the shard with `threads` FAISS threads (the actor reserves no CPU); returns its row ids."""
        faiss.omp_set_num_threads(threads)
        self.shard = make()
        self.views: dict[int, Shard] = {}
        return self.shard.row_ids

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.shard, method)(*args)

    def view(self, key: int, make: Callable[[Shard], Shard | None]) -> bool:
        """Make `make(shard)`, a view of the shard held here (its lists, no copy), kept under `key` beside it;
        False where `make` declines the shard."""
        made = make(self.shard)
        if made is not None:
            self.views[key] = made
        return made is not None

    def call_view(self, key: int, method: str, *args: Any) -> Any:
        return getattr(self.views[key], method)(*args)


def _call_all(calls: Sequence[Any], arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
    """`calls[i].remote(*arguments[i])` for every actor method i, gathered in order; an array passed to
    several is put in the object store once."""
    import ray

    shared: dict[int, ObjectRef[np.ndarray]] = {}

    def put(value: Any) -> Any:
        if not isinstance(value, np.ndarray):
            return value
        if id(value) not in shared:
            shared[id(value)] = ray.put(value)
        return shared[id(value)]
    return ray_get_all([call.remote(*map(put, args)) for call, args in zip(calls, arguments)])


class RayShards(Shards):
    """Index shards held by Ray actors, one actor per shard with `gpus_per_worker` GPUs and no reserved CPU.

    Every actor makes its own shard (`fill_shard` reads its own rows; `load_shard` reads its
    own files from a shared file system), so only queries and top-k lists cross the network.
    `search_options` are the options for the exact-search tasks beside the shards: the same,
    or without GPUs when the shards hold every GPU slot (tasks would otherwise wait forever).
    """

    def __init__(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str = "auto",
                 options: RayOptions = RayOptions()):
        ray = connect(options)
        slots = gpu_slots(options)
        if options.gpus_per_worker and len(makers) > slots:
            raise InputError(f"{len(makers)} index shards of {options.gpus_per_worker:g} GPU each do not fit the "
                             f"Ray cluster's {slots} places for them; use fewer shards or a smaller --gpus-per-worker")
        self.search_options = options
        if options.gpus_per_worker and len(makers) == slots:
            log.warning("the %d index shards hold every GPU: exact searches run on CPUs "
                        "(a --gpus-per-worker of 1/m lets m workers share each GPU)", len(makers))
            self.search_options = replace(options, gpus_per_worker=0.0)
        holder = ray.remote(num_cpus=0, num_gpus=options.gpus_per_worker or None)(_ShardHolder)
        self.holders: list[ActorHandle] = [holder.remote() for _ in makers]
        worker_device = options.worker_device(device)
        row_ids = ray_get_all([h.make.remote(functools.partial(make, device=worker_device), options.cpus_per_worker)
                               for h, make in zip(self.holders, makers)])
        super().__init__(row_ids, metric)

    def _map(self, method: str, arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
        return _call_all([h.call for h in self.holders], [(method, *args) for args in arguments])

    def views(self, make: Callable[[Shard], Shard | None], metric: str) -> Shards | None:
        """Each actor makes its shard's view and keeps it beside the shard (`_ShardHolder.view`): nothing but
        `make` crosses the network; None where any actor's shard declines."""
        key = next(_view_keys)
        if not all(_call_all([h.view for h in self.holders], [(key, make)] * len(self.holders))):
            return None
        return RayShardViews(self, key, metric)


_view_keys = itertools.count()


class RayShardViews(Shards):
    """Views of the shards of a `RayShards`, each held by its shard's actor (`RayShards.views`): every search,
    parameter and question goes to the actors' views, and the driver merges the shards' best (`Shards.search`)
    by `metric`."""

    def __init__(self, shards: RayShards, key: int, metric: str):
        super().__init__(shards._row_id_parts(), metric)
        self.holders, self.key = shards.holders, key

    def _map(self, method: str, arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
        return _call_all([h.call_view for h in self.holders], [(self.key, method, *args) for args in arguments])
