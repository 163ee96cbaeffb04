"""Ray: the exact kNN and self-join as tasks over block pairs, and extraction in stateful actors.

Both run the local engine's units of work (`exact.pair_candidates`, `models.capture`) and
merge or write on the driver in the local order, so their tables equal the local ones.
Connects to `address` (a running cluster) or starts a local instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from memscan.knn import exact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: `address` None starts a local instance."""

    address: str | None = None
    num_workers: int = 2
    gpus_per_worker: float = 0.0


def connect(options: RayOptions) -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if options.address else options.num_workers)
    return ray


def _pair(query: exact.Block, database: exact.Block, k: int, metric: str, exclude_self: bool,
          ) -> tuple[np.ndarray, np.ndarray]:
    (query_ids, xq), (db_ids, xb) = query, database
    return exact.pair_candidates(query_ids, xq, db_ids, xb, k, metric, exclude_self, exact.FaissBackend())


def knn(query_blocks: Iterable[exact.Block], database_blocks: Callable[[], Iterable[exact.Block]], k: int, *,
        metric: str = "l2", exclude_self: bool = False, options: RayOptions = RayOptions(),
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact kNN as one Ray task per (query block, database block); each database block is put once."""
    ray = connect(options)
    pair = ray.remote(_pair)
    database = [ray.put(block) for block in database_blocks()]
    parts = []
    for query_ids, xq in query_blocks:
        query = ray.put((query_ids, xq))
        candidates = ray.get([pair.remote(query, block, k, metric, exclude_self) for block in database])
        parts.append((query_ids, *exact.merge(candidates, k, metric, len(xq))))  # database order, as locally
    return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]


def self_join(blocks: Callable[[], Iterable[exact.Block]], k: int, *, metric: str = "l2",
              options: RayOptions = RayOptions()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pattern its k nearest OTHER patterns, on Ray; equal to `exact.self_join`."""
    return knn(blocks(), blocks, k, metric=metric, exclude_self=True, options=options)


class _CaptureActor:
    """Loads the model once per actor and runs the capturing forward pass on whole batches."""

    def __init__(self, model: str, dtype: str, revision: str | None, trust_remote_code: bool, layers: list[int],
                 positions: list[int], with_loss: bool):
        import torch

        from memscan import models

        self.torch, self.models = torch, models
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = models.load(model, dtype=models.DTYPES[dtype], device=self.device, revision=revision,
                                  trust_remote_code=trust_remote_code)
        self.layers, self.with_loss = layers, with_loss
        self.positions = torch.tensor(positions, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        tokens = torch.from_numpy(np.asarray(batch["tokens"][0])).to(self.device, torch.long)
        following = torch.from_numpy(np.asarray(batch["next_tokens"][0])).to(self.device, torch.long)
        vec, nll = self.models.capture(self.loaded.model, tokens, following, self.layers, self.positions,
                                       self.with_loss)
        out = {"index": batch["index"], "vec": vec.float().cpu().numpy()[None]}
        out["nll"] = (nll.cpu().numpy() if nll is not None else np.full(tokens.shape[:1] + self.positions.shape, np.nan,
                                                                         np.float32))[None]
        return out


def capture_batches(work: list[tuple[int, np.ndarray, np.ndarray]], model: str, dtype: str, revision: str | None,
                    trust_remote_code: bool, layers: list[int], positions: list[int], with_loss: bool,
                    options: RayOptions) -> Iterator[tuple[int, Any, np.ndarray | None]]:
    """(batch index, vec (B, L, P, n) float32 tensor, nll (B, P) or None) in batch order, from Ray Data actors."""
    ray = connect(options)
    import ray.data
    import torch

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    items = [{"index": index, "tokens": tokens, "next_tokens": following} for index, tokens, following in work]
    results = ray.data.from_items(items).map_batches(
        _CaptureActor, batch_size=1, batch_format="numpy", concurrency=options.num_workers,
        num_gpus=options.gpus_per_worker or None,
        fn_constructor_args=(model, dtype, revision, trust_remote_code, layers, positions, with_loss))
    for row in results.iter_rows():
        yield int(row["index"]), torch.from_numpy(np.array(row["vec"])), np.asarray(row["nll"]) if with_loss else None


class _IndexShard:
    """One shard of an index: a copy of the trained (empty) index, filled with its share of the rows."""

    def __init__(self, trained: np.ndarray, search: dict[str, int]):
        import faiss

        self.index = faiss.deserialize_index(trained)
        space = faiss.ParameterSpace()
        for name, value in search.items():
            space.set_index_parameter(self.index, name, value)
        self.row_ids: list[np.ndarray] = []

    def add(self, X: np.ndarray, row_ids: np.ndarray) -> int:
        self.index.add(X)
        self.row_ids.append(row_ids)
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate(self.row_ids) if self.row_ids else np.empty(0, np.int64)
        D, local = self.index.search(queries, min(k, max(1, self.index.ntotal)))
        return D, np.where(local >= 0, ids[np.maximum(local, 0)], -1)


@dataclass
class ShardedIndex:
    """An index split by rows over Ray actors that share one trained quantizer; searches merge their results."""

    shards: list[Any]
    metric: str

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) FAISS scores, I (nq, k) row ids): the best k over every shard."""
        import ray

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return exact.merge(ray.get([shard.search.remote(queries, k) for shard in self.shards]), k, self.metric,
                           len(queries))


def shard_index(trained: Any, blocks: Iterable[exact.Block], search: dict[str, int], metric: str, shards: int,
                options: RayOptions = RayOptions()) -> ShardedIndex:
    """Fill `shards` actors, each holding a copy of the trained index, with the blocks round-robin."""
    import faiss

    ray = connect(options)
    actor = ray.remote(_IndexShard)
    serialized = faiss.serialize_index(trained)
    holders = [actor.remote(serialized, search) for _ in range(shards)]
    ray.get([holders[i % shards].add.remote(np.ascontiguousarray(X, np.float32), ids)
             for i, (ids, X) in enumerate(blocks)])
    return ShardedIndex(holders, metric)


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

    Pieces are contiguous ranges of the document stream, so their chunks in piece order are
    the stream's; bottom-k samples merge by keeping the k smallest keys, so the merged sample
    is the local one.
    """
    from memscan import corpus

    ray = connect(options)
    pieces = source.partitions(settings.max_documents, 4 * options.num_workers)
    if len(pieces) == 1:
        log.info("this source streams from its start only: its chunks are planned by one task")
    task = ray.remote(_plan_piece)
    results = ray.get([task.remote(piece, settings.model, settings.revision, settings.trust_remote_code,
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
