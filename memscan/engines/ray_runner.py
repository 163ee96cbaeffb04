"""Ray: exact kNN as tasks over block pairs, index shards in actors, extraction in stateful actors.

Each runs the local engine's unit of work (`exact.pair_candidates`, `shards.Shard`,
`models.capture`) and merges or writes on the driver in the local order, so its tables
equal the local ones. Connects to `address` (a running cluster) or starts a local instance.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from memscan.errors import InputError, MemscanError
from memscan.knn import exact
from memscan.knn.shards import Shard, Shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: `address` None starts a local instance of num_workers x cpus_per_worker CPUs.

    gpus_per_worker is 0, a whole number, or 1/m (0.5, 0.25, ...): Ray packs fractions of
    one GPU, so only those shares fill every GPU without waiting forever for a place.
    """

    address: str | None = None
    num_workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1         # CPUs Ray reserves per task or extraction actor; FAISS threads of a shard actor

    def __post_init__(self) -> None:
        g = self.gpus_per_worker
        if g < 0 or (g > 0 and not (_whole(g) or _whole(1 / g))):
            raise InputError(f"--gpus-per-worker must be 0, a whole number or 1/m (0.5, 0.25, ...); got {g:g}")
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise InputError(f"--num-workers and --cpus-per-worker must be at least 1; got {self.num_workers} and "
                             f"{self.cpus_per_worker}")

    def task_resources(self) -> dict[str, Any]:
        """Ray's num_cpus and num_gpus for one task or extraction actor."""
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker or None}

    def worker_device(self, device: str) -> str:
        """The search device on a worker: without GPUs of its own, the CPU (Ray leaves unrequested GPUs visible)."""
        if self.gpus_per_worker:
            return device
        if device == "gpu":
            raise InputError("--device gpu with --engine ray needs --gpus-per-worker")
        return "cpu"

    def engine(self) -> RayEngine:
        """The engine that runs on these options (for callers that pass options, not an engine)."""
        return RayEngine(self)


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def gpu_slots(options: RayOptions) -> int:
    """How many workers of `gpus_per_worker` GPUs the live nodes hold at once (0 without GPUs asked for)."""
    import ray

    if not options.gpus_per_worker:
        return 0
    return sum(int(node["Resources"].get("GPU", 0) / options.gpus_per_worker + 1e-9)
               for node in ray.nodes() if node["Alive"])


def connect(options: RayOptions) -> Any:
    """Ray, connected to `options.address` or to a new local instance; refuses GPUs no node has."""
    import ray

    if not ray.is_initialized():
        ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False,
                 num_cpus=None if options.address else options.num_workers * options.cpus_per_worker)
    if options.gpus_per_worker and not gpu_slots(options):
        raise InputError(f"--gpus-per-worker {options.gpus_per_worker:g}: no node of the Ray cluster has that many GPUs")
    return ray


def _get(refs: Any) -> Any:
    """ray.get; a MemscanError raised on a worker comes back as itself (one line, not a remote traceback)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MemscanError):
            raise exc.cause from None
        raise


@functools.cache
def _worker_backend(device: str) -> exact.Backend:
    """The worker's own backend for `device` (auto: faiss-gpu where the task was given a GPU)."""
    return exact.choose_backend(device)


def _pair(query: exact.Block, database: exact.Block, k: int, metric: str, exclude_self: bool, device: str,
          ) -> tuple[np.ndarray, np.ndarray]:
    (query_ids, xq), (db_ids, xb) = query, database
    return exact.pair_candidates(query_ids, xq, db_ids, xb, k, metric, exclude_self, _worker_backend(device))


@dataclass(frozen=True)
class RayEngine(exact.Engine):
    """Exact kNN as one Ray task per (query block, database block), merged on the driver like the local
    run; index shards each in a Ray actor (`RayShards`)."""

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
        pair = ray.remote(max_calls=0, **self.options.task_resources())(_pair)
        database = [ray.put(block) for block in database_blocks()]
        parts = []
        for query_ids, xq in query_blocks:
            query = ray.put((query_ids, xq))
            candidates = _get([pair.remote(query, block, k, metric, exclude_self, self.device) for block in database])
            parts.append((query_ids, *exact.merge(candidates, k, metric, len(xq))))  # database order, as locally
        if not parts:
            return np.empty(0, np.int64), np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def map_blocks(self, function: Callable[..., Any], blocks: Callable[[], Iterable[exact.Block]], *args: Any,
                   ) -> Iterator[Any]:
        """One Ray task (on a CPU) per block; arrays among `args` are put in the object store once."""
        ray = connect(self.options)
        task = ray.remote(num_cpus=self.options.cpus_per_worker)(function)
        shared = [ray.put(arg) if isinstance(arg, np.ndarray) else arg for arg in args]
        return iter(_get([task.remote(block, *shared) for block in blocks()]))


class _CaptureActor:
    """Loads the model once per actor and runs the capturing forward pass on whole batches."""

    def __init__(self, model: str, dtype: str, revision: str | None, trust_remote_code: bool, layers: list[int],
                 positions: list[int], with_loss: bool, device: str):
        import torch

        from memscan import models

        self.torch, self.models = torch, models
        self.device = torch.device(device)
        self.loaded = models.load(model, dtype=models.DTYPES[dtype], device=self.device, revision=revision,
                                  trust_remote_code=trust_remote_code)
        self.layers, self.with_loss = layers, with_loss
        self.positions = torch.tensor(positions, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch's vec (1, B, L, P, n) float32 and, with the loss, nll (1, B, P) and stats (1, 3, B, T).

        With the loss the LM head runs over every position (`models.capture_statistics`, as the
        local runner does), so the per-chunk table gets the same statistics and the shards the
        same nll; without it, the backbone only.
        """
        torch = self.torch
        tokens = torch.from_numpy(np.asarray(batch["tokens"][0])).to(self.device, torch.long)
        following = torch.from_numpy(np.asarray(batch["next_tokens"][0])).to(self.device, torch.long)
        out = {"index": batch["index"]}
        if self.with_loss:
            vec, nll, stats = self.models.capture_statistics(self.loaded.model, tokens, following, self.layers,
                                                             self.positions)
            out.update(nll=nll.cpu().numpy()[None], stats=stats.cpu().numpy()[None])
        else:
            vec, _ = self.models.capture(self.loaded.model, tokens, following, self.layers, self.positions, False)
        out["vec"] = vec.float().cpu().numpy()[None]
        return out


def capture_batches(work: list[tuple[int, np.ndarray, np.ndarray]], model: str, dtype: str, revision: str | None,
                    trust_remote_code: bool, layers: list[int], positions: list[int], with_loss: bool,
                    options: RayOptions) -> Iterator[tuple[int, Any, np.ndarray | None, Any]]:
    """(batch index, vec (B, L, P, n) float32 tensor, nll (B, P) or None, stats (3, B, T) float32 tensor or None)
    in batch order, from Ray Data actors; stats are the per-chunk table's nll, mu and var (None without the loss)."""
    ray = connect(options)
    import ray.data
    import torch

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    items = [{"index": index, "tokens": tokens, "next_tokens": following} for index, tokens, following in work]
    results = ray.data.from_items(items).map_batches(
        _CaptureActor, batch_size=1, batch_format="numpy", concurrency=options.num_workers,
        **options.task_resources(),
        fn_constructor_args=(model, dtype, revision, trust_remote_code, layers, positions, with_loss,
                             "cuda" if options.gpus_per_worker else "cpu"))  # Ray leaves unrequested GPUs visible
    for row in results.iter_rows():
        if with_loss:
            yield (int(row["index"]), torch.from_numpy(np.array(row["vec"])), np.asarray(row["nll"]),
                   torch.from_numpy(np.array(row["stats"])))
        else:
            yield int(row["index"]), torch.from_numpy(np.array(row["vec"])), None, None


class _ShardHolder:
    """A Ray actor holding one `shards.Shard`, made on the worker (and on its GPU when it has one)."""

    def make(self, make: Callable[[], Shard], threads: int) -> np.ndarray:
        """Make the shard with `threads` FAISS threads (the actor reserves no CPU); returns its row ids."""
        import faiss

        faiss.omp_set_num_threads(threads)
        self.shard = make()
        return self.shard.row_ids

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.shard, method)(*args)


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
        self.holders = [holder.remote() for _ in makers]
        worker_device = options.worker_device(device)
        row_ids = _get([h.make.remote(functools.partial(make, device=worker_device), options.cpus_per_worker)
                        for h, make in zip(self.holders, makers)])
        super().__init__(row_ids, metric)

    def _map(self, method: str, arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
        import ray

        shared: dict[int, Any] = {}  # an array passed to every shard is put once

        def put(value: Any) -> Any:
            if not isinstance(value, np.ndarray):
                return value
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]
        return _get([h.call.remote(method, *map(put, args)) for h, args in zip(self.holders, arguments)])


def _count_documents(piece: Any) -> int:
    return int(piece.count_documents())


def _plan_piece(piece: Any, model: str, revision: str | None, trust_remote_code: bool, chunk_tokens: int,
                test_fraction: float, seed: int, num_chunks: int | None) -> tuple[list[Any], Any]:
    """Tokenize and chunk one piece of the source; keep its bottom-k sample when sampling."""
    from memscan import corpus, models

    tokenizer = models.load_tokenizer(model, revision, trust_remote_code)
    stats = corpus.CorpusStats()
    chunks = corpus.iter_chunks(piece.documents(), tokenizer, chunk_tokens, test_fraction, seed, stats)
    return (corpus.sample_chunks(chunks, num_chunks) if num_chunks else list(chunks)), stats


def plan(source: Any, settings: Any, options: RayOptions) -> tuple[list[Any], Any]:
    """The local runner's chunks (or seeded sample) and corpus counts, computed by Ray tasks per source piece.

    Pieces are contiguous ranges of the document stream (documents of `qf`, files of a folder,
    runs of files of an `hf:` dataset, each counted by its own task to learn its first doc
    id), so their chunks in piece order are the stream's; bottom-k samples merge by keeping
    the k smallest keys, so the merged sample is the local one.
    """
    from memscan import corpus

    ray = connect(options)
    count = ray.remote(_count_documents)
    pieces = source.partitions(settings.max_documents, 4 * options.num_workers,
                               count_documents=lambda runs: _get([count.remote(run) for run in runs]))
    if len(pieces) == 1:
        log.info("this source is one piece (one file, or a stream): its chunks are planned by one task")
    task = ray.remote(_plan_piece)
    results = _get([task.remote(piece, settings.model, settings.revision, settings.trust_remote_code,
                                   settings.chunk_tokens, settings.test_fraction, settings.seed, settings.num_chunks)
                       for piece in pieces])
    chunks = [chunk for piece_chunks, _ in results for chunk in piece_chunks]
    if settings.num_chunks:
        chunks = corpus.sample_chunks(chunks, settings.num_chunks)
    stats = corpus.CorpusStats()
    for _, piece_stats in results:
        for name in ("documents", "documents_too_short", "tokens", "tokens_in_chunks", "chunks_available"):
            setattr(stats, name, getattr(stats, name) + getattr(piece_stats, name))
        stats.longest_document_tokens = max(stats.longest_document_tokens, piece_stats.longest_document_tokens)
    return chunks, stats
