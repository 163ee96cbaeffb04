"""Ray: exact kNN as tasks over block pairs, index shards in actors, extraction streamed through stateful actors.

Each runs the local engine's unit of work (`exact.pair_candidates`, `shards.Shard`,
`models.capture`) and merges or writes on the driver in the local order, so its tables
equal the local ones. Connects to `address` (a running cluster) or starts a local instance.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import numpy as np

from memscan.engines import knn as knn_engine
from memscan.errors import InputError, MemscanError
from memscan.knn import exact
from memscan.knn.shards import Shard, Shards

log = logging.getLogger(__name__)
T = TypeVar("T")


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
class RayEngine(knn_engine.Engine):
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


@dataclass(frozen=True)
class CaptureSpec:
    """What every capture actor runs: the model, where the workers resolved it to run, and what to keep per batch."""

    model: str
    revision: str | None
    trust_remote_code: bool
    device: str                      # as `resolve_on_workers` returned it: cpu, cuda, ...
    dtype: str                       # bf16 | fp16 | fp32, likewise
    targets: Any                     # handed as is to models.capture / capture_statistics
    positions: list[int]
    with_loss: bool


def resolve_on_workers(device: str, dtype: str, options: RayOptions) -> tuple[Any, Any]:
    """--device and --dtype (torch.device, torch.dtype) as a worker with the capture actors' resources resolves
    them: the model runs there, so a driver without a GPU can extract on workers with one."""
    ray = connect(options)
    probe = ray.remote(**options.task_resources())(_resolve_here)
    return _get(probe.remote(device, dtype, bool(options.gpus_per_worker)))


def _resolve_here(device: str, dtype: str, given_gpus: bool) -> tuple[Any, Any]:
    """models.resolve_device and resolve_dtype on this worker, using no GPU that Ray did not give it."""
    from memscan import models

    if not given_gpus:  # Ray leaves GPUs it did not give a worker visible
        if device.startswith("cuda"):
            raise InputError(f"--device {device} with --engine ray needs --gpus-per-worker: "
                             "the Ray workers are given no GPU")
        device = "cpu" if device == "auto" else device
    resolved = models.resolve_device(device)
    return resolved, models.resolve_dtype(dtype, resolved)


class _CaptureActor:
    """Runs the capturing forward pass on whole batches; loads the model on its first batch, so a model that does
    not load on a worker is a one-line error there (Ray keeps only the text of an error in a constructor)."""

    def __init__(self, spec: CaptureSpec):
        self.spec = spec

    @functools.cached_property
    def model(self) -> Any:
        from memscan import models

        spec = self.spec
        return models.load(spec.model, dtype=models.DTYPES[spec.dtype], device=self.device, revision=spec.revision,
                           trust_remote_code=spec.trust_remote_code).model

    @functools.cached_property
    def device(self) -> Any:
        import torch

        return torch.device(self.spec.device)

    def capture(self, tokens: np.ndarray, following: np.ndarray) -> tuple[Any, ...]:
        """What the local runner's call returns for one batch of (B, T) token ids, on the CPU: with the loss
        `models.capture_statistics` (vec, nll, per-token stats), else `models.capture` without it (vec, None)."""
        import torch

        from memscan import models

        spec = self.spec
        positions = torch.tensor(spec.positions, device=self.device)
        return _on_cpu(models.capture_batch(self.model, tokens, following, spec.targets, positions, spec.with_loss,
                                            self.device))


def _on_cpu(value: Any) -> Any:
    """`value` with every tensor in it (nested in tuples and lists) moved to the CPU, to travel to the driver."""
    if isinstance(value, (tuple, list)):
        return type(value)(_on_cpu(item) for item in value)
    return value.cpu() if hasattr(value, "cpu") else value


IN_FLIGHT_PER_ACTOR = 2   # one batch running, one queued behind it: an actor never waits for the driver
ACTOR_RESTARTS = 4        # a capture actor whose process dies is restarted and its batches retried (they are pure)


class CapturePool:
    """Capture actors fed as batches are produced; results reach `deliver(key, result)` in submission order.

    At most IN_FLIGHT_PER_ACTOR x num_workers batches are in flight (`window`), so the driver
    holds those batches and their results, never the corpus. Actors start on the first
    batch; `close` ends them, freeing their slots.
    """

    def __init__(self, spec: CaptureSpec, options: RayOptions, deliver: Callable[[Any, tuple[Any, ...]], None]):
        self.spec, self.options, self.deliver = spec, options, deliver
        self.window = IN_FLIGHT_PER_ACTOR * options.num_workers
        self._actors: list[Any] = []
        self._in_flight: collections.deque[tuple[Any, Any]] = collections.deque()
        self._submitted = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, key: Any, tokens: np.ndarray, following: np.ndarray) -> None:
        """Hand one batch of (B, T) token ids to the next actor, first delivering the oldest result if the window
        is full. Actors take batches in turn, so each has at most IN_FLIGHT_PER_ACTOR."""
        if len(self._in_flight) == self.window:
            self._deliver_oldest()
        actor = self._next_actor()
        self._in_flight.append((key, actor.capture.remote(tokens, following)))

    def finish(self) -> None:
        """Deliver every result still in flight."""
        while self._in_flight:
            self._deliver_oldest()

    def close(self) -> None:
        """End the actors (also after an error: their slots are free for the next job)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._in_flight.clear()

    def _deliver_oldest(self) -> None:
        key, ref = self._in_flight.popleft()
        self.deliver(key, _get(ref))

    def _next_actor(self) -> Any:
        if not self._actors:
            ray = connect(self.options)
            actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
                               **self.options.task_resources())(_CaptureActor)
            self._actors = [actor.remote(self.spec) for _ in range(self.options.num_workers)]
        actor = self._actors[self._submitted % len(self._actors)]
        self._submitted += 1
        return actor


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


PLAN_GROUP = 256   # chunks per object a streaming planning task yields: what the driver holds of a piece at once
PLAN_AHEAD = 4     # objects a planning task yields before it waits for the driver to read them (Ray's backpressure)


def _piece_chunks(piece: Any, settings: Any, stats: Any) -> Iterator[Any]:
    """One piece's chunks, tokenized on this worker as the local runner does, counted into `stats`."""
    from memscan import corpus, models

    tokenizer = models.load_tokenizer(settings.model, settings.revision, settings.trust_remote_code)
    return corpus.iter_chunks(piece.documents(), tokenizer, settings.chunk_tokens, settings.test_fraction,
                              settings.seed, stats)


def _sample_piece(piece: Any, settings: Any) -> tuple[list[Any], Any]:
    """One piece's bottom-k sample of --num-chunks chunks, and its counts."""
    from memscan import corpus

    stats = corpus.CorpusStats()
    return corpus.sample_chunks(_piece_chunks(piece, settings, stats), settings.num_chunks), stats


def _chunk_groups(piece: Any, settings: Any) -> Iterator[Any]:
    """One piece's chunks, PLAN_GROUP at a time, then its counts (a Ray streaming generator)."""
    from memscan import corpus

    stats = corpus.CorpusStats()
    chunks = _piece_chunks(piece, settings, stats)
    while group := list(itertools.islice(chunks, PLAN_GROUP)):
        yield group
    yield stats


def _ahead(items: Iterable[T], width: int) -> Iterator[T]:
    """`items` in order, drawn up to `width` - 1 ahead of the one yielded: drawing an item submits its work,
    so at most `width` are under way (or done and waiting to be read) at once."""
    iterator = iter(items)
    waiting = collections.deque(itertools.islice(iterator, width))
    while waiting:
        yield waiting.popleft()
        waiting.extend(itertools.islice(iterator, 1))


def _add_counts(total: Any, piece: Any) -> None:
    """Add one piece's CorpusStats to the running `total`."""
    for name in ("documents", "documents_too_short", "tokens", "tokens_in_chunks", "chunks_available"):
        setattr(total, name, getattr(total, name) + getattr(piece, name))
    total.longest_document_tokens = max(total.longest_document_tokens, piece.longest_document_tokens)


def plan(source: Any, settings: Any, options: RayOptions) -> tuple[Iterable[Any], Any]:
    """The local runner's chunks (or seeded sample) and corpus counts, computed by Ray tasks per source piece.

    Pieces are contiguous ranges of the document stream (documents of `qf`, files of a folder,
    runs of files of an `hf:` dataset, each counted by its own task to learn its first doc
    id), so their chunks in piece order are the stream's; bottom-k samples merge by keeping
    the k smallest keys, so the merged sample is the local one. Pieces are planned in order,
    `num_workers` at a time. Without --num-chunks the chunks stream: each task yields PLAN_GROUP
    chunks at a time, at most PLAN_AHEAD groups ahead of the driver, and the counts are
    complete once the chunks are read to the end. With --num-chunks the sample is held (at
    most --num-chunks chunks, as in the local runner) and returned with its counts.
    Planning tasks reserve no CPU: they run beside the capture actors, which may hold every slot.
    """
    from memscan import corpus

    ray = connect(options)
    count = ray.remote(_count_documents)
    pieces = source.partitions(settings.max_documents, 4 * options.num_workers,
                               count_documents=lambda runs: _get([count.remote(run) for run in runs]))
    if len(pieces) == 1:
        log.info("this source is one piece (one file, or a stream): its chunks are planned by one task")
    stats = corpus.CorpusStats()
    if settings.num_chunks:
        return _merged_sample(pieces, settings, options, stats), stats
    return _streamed_chunks(pieces, settings, options, stats), stats


def _merged_sample(pieces: list[Any], settings: Any, options: RayOptions, stats: Any) -> list[Any]:
    """The bottom-k sample of all pieces, merged as each piece's sample arrives; counts added to `stats`."""
    import ray

    from memscan import corpus

    task = ray.remote(num_cpus=0)(_sample_piece)
    sample: list[Any] = []
    for ref in _ahead((task.remote(piece, settings) for piece in pieces), options.num_workers):
        piece_sample, piece_stats = _get(ref)
        sample = corpus.sample_chunks(itertools.chain(sample, piece_sample), settings.num_chunks)
        _add_counts(stats, piece_stats)
    return sample


def _streamed_chunks(pieces: list[Any], settings: Any, options: RayOptions, stats: Any) -> Iterator[Any]:
    """Every chunk of the pieces in order, as their tasks yield them; each piece's counts added to `stats`."""
    import ray

    from memscan import corpus

    task = ray.remote(num_cpus=0, _generator_backpressure_num_objects=PLAN_AHEAD)(_chunk_groups)
    for groups in _ahead((task.remote(piece, settings) for piece in pieces), options.num_workers):
        for ref in groups:
            item = _get(ref)
            if isinstance(item, corpus.CorpusStats):
                _add_counts(stats, item)
            else:
                yield from item
