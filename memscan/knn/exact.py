"""Exact k-nearest-neighbour search and self-join over iterators of blocks.

Work larger than memory is a loop over (query block, database block) pairs: each pair's
candidates come from a backend (faiss on CPU or GPU, or torch on any device), their
distances are recomputed exactly from the vectors (float64 accumulation), the pattern
itself is removed by id, and the survivors merge into a per-query heap. A duplicate of
a pattern is a neighbour at distance 0; only the pattern itself is excluded.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import faiss
import numpy as np
import torch

from memscan import checks
from memscan.errors import DataError, InputError

log = logging.getLogger(__name__)

Block = tuple[np.ndarray, np.ndarray]  # (ids int64 (m,), X float32 (m, n))
METRICS = ("l2", "ip")
GPU_MAX_K = 2048  # faiss-gpu's limit on k (and nprobe) per search
RECOMPUTE_ROWS = 512  # query rows per exact recomputation: (512, k, n) float32 stays near the cache
# RMS vector norms accepted: float32 squared distances of vectors at these scales neither
# underflow (1e-30 vectors: every neighbour at distance 0) nor overflow (1e20: Inf).
NORM_RANGE = (1e-12, 1e12)


class Backend:
    """Candidate search within one block pair: (nq, k) scores and local indices."""

    name = "abstract"

    def candidates(self, k: int) -> int:
        """How many candidates to fetch so the exact re-ranking still finds the true k best."""
        return k

    def search(self, xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def faiss_metric_of(metric: str) -> int:
    """FAISS's constant for a metric of METRICS."""
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def faiss_reason(exc: RuntimeError) -> str:
    """The informative part of a FAISS error: its message's last line (the rest is a C++ trace)."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


@functools.cache
def gpu_resources() -> Any:
    """One faiss.StandardGpuResources per process: each holds its own scratch memory on the GPU."""
    return faiss.StandardGpuResources()


class FaissBackend(Backend):
    """faiss.knn on the CPU; faiss.knn_gpu when `gpu` is set (k above 2048 falls back to the CPU)."""

    def __init__(self, gpu: bool = False):
        self.gpu = gpu
        self.resources = gpu_resources() if gpu else None
        self.name = "faiss-gpu" if gpu else "faiss-cpu"

    def search(self, xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        faiss_metric = faiss_metric_of(metric)
        if self.gpu and k <= GPU_MAX_K:
            return faiss.knn_gpu(self.resources, xq, xb, k, metric=faiss_metric)
        if self.gpu:
            log.info("k=%d is above faiss-gpu's limit of %d: this block pair runs on the CPU", k, GPU_MAX_K)
        return faiss.knn(xq, xb, k, metric=faiss_metric)


class TorchBackend(Backend):
    """Blocked matrix product plus top-k in torch: for CUDA torch without faiss-gpu, or the CPU.

    `dtype` float32, bfloat16 or float16 sets the product's inputs; it accumulates in fp32
    and the exact recomputation afterwards repairs the rounding of the candidates' scores.
    """

    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.name = f"torch-{self.device.type}-{dtype}"

    def candidates(self, k: int) -> int:
        """16-bit products misorder near-ties: fetch 2k + 8 and let the exact re-ranking decide."""
        return k if self.dtype == torch.float32 else 2 * k + 8

    def search(self, xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Ranking scores, not distances: l2 ranks by ||y||^2 - 2 x.y (||x||^2 is the same for a row)."""
        q = torch.from_numpy(xq).to(self.device, self.dtype)
        b = torch.from_numpy(xb).to(self.device, self.dtype)
        if metric == "l2":
            norms = (b.float() ** 2).sum(1).to(self.dtype)
            scores = torch.addmm(norms[None, :], q, b.T, beta=1, alpha=-2)      # (nq, nb), one fused pass
        else:
            scores = torch.mm(q, b.T)
        values, indices = torch.topk(scores, k, dim=1, largest=(metric == "ip"), sorted=True)
        return values.float().cpu().numpy(), indices.cpu().numpy()


def choose_backend(device: str = "auto", torch_dtype: str = "float32") -> Backend:
    """auto: faiss-gpu if it sees a GPU, else torch on CUDA, else faiss on the CPU; cuda[:N] (or gpu) the same,
    but without a GPU an error, not a fallback."""
    checks.device("--device", device)
    if device == "cpu":
        return FaissBackend(gpu=False)
    if faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False:
        return FaissBackend(gpu=True)
    if torch.cuda.is_available():
        return TorchBackend("cuda" if device == "auto" else checks.torch_device_name(device), torch_dtype)
    if device != "auto":
        raise InputError(f"--device {device} was asked for, but neither faiss nor torch sees a GPU "
                         "(use --device cpu or auto)")
    return FaissBackend(gpu=False)


def exact_scores(xq: np.ndarray, xb: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray:
    """Scores of each query against its candidates: (nq, c) float64, nan where a candidate is -1.

    xq (nq, n), xb (nb, n), candidates (nq, c) local indices into xb. l2: squared distances
    from float32 differences summed in float64 (relative error ~1e-7, 8x cheaper than
    float64 throughout); ip: inner products in float64.
    """
    out = np.full(candidates.shape, np.nan)
    for start in range(0, len(xq), RECOMPUTE_ROWS):
        rows = slice(start, start + RECOMPUTE_ROWS)
        valid = candidates[rows] >= 0
        y = xb[np.where(valid, candidates[rows], 0)]                              # (r, c, n) float32
        if metric == "l2":
            np.subtract(y, xq[rows, None, :], out=y)
            np.square(y, out=y)
            scores = y.sum(-1, dtype=np.float64)
        else:
            scores = np.einsum("rn,rcn->rc", xq[rows].astype(np.float64), y.astype(np.float64))
        out[rows] = np.where(valid, scores, np.nan)
    return out


@dataclass
class _Heap:
    """Best k (id, score) per query, merged block by block (faiss.ResultHeap)."""

    k: int
    metric: str
    nq: int

    def __post_init__(self) -> None:
        self.heap = faiss.ResultHeap(self.nq, self.k, keep_max=(self.metric == "ip"))

    def add(self, scores: np.ndarray, ids: np.ndarray) -> None:
        worst = -np.inf if self.metric == "ip" else np.inf
        self.heap.add_result(np.where(ids >= 0, scores, worst).astype(np.float32), ids)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) best first; empty slots (fewer than k candidates) are id -1 at +inf (-inf for ip)."""
        self.heap.finalize()
        worst = -np.inf if self.metric == "ip" else np.inf
        return np.where(self.heap.I >= 0, self.heap.D, worst).astype(np.float32), self.heap.I


def _centred(xq: np.ndarray, xb: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """For l2, both sides moved by the database block's mean: distances stay, but the matrix-product
    form ||x||^2 + ||y||^2 - 2 x.y no longer cancels at the activations' large norms."""
    if metric != "l2":
        return xq, xb
    centre = xb.mean(axis=0, dtype=np.float64).astype(np.float32)
    return xq - centre, xb - centre


def search_blocks(query_blocks: Iterable[Block], database_blocks: Callable[[], Iterable[Block]], k: int, *,
                  metric: str = "l2", exclude_self: bool = False, backend: Backend | None = None,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact kNN of every query block against the whole database, streamed twice over.

    Yields (query ids (m,), D (m, k) float32, I (m, k) int64) per query block: D holds
    exact squared L2 distances (metric l2) or inner products (ip), best first; I global
    database ids, -1 where the database has fewer than k candidates. With `exclude_self`,
    a database row whose id equals the query's id is never returned.
    """
    backend = backend or choose_backend("cpu")
    for query_ids, xq in query_blocks:
        started, heap, rows = time.perf_counter(), _Heap(k, metric, len(xq)), 0
        for db_ids, xb in database_blocks():
            heap.add(*pair_candidates(query_ids, xq, db_ids, xb, k, metric, exclude_self, backend))
            rows += len(xb)
        D, I = heap.result()
        log.debug("searched %d queries against %d rows in %.2f s (%s)", len(xq), rows,
                  time.perf_counter() - started, backend.name)
        yield query_ids, D, I


def pair_candidates(query_ids: np.ndarray, xq: np.ndarray, db_ids: np.ndarray, xb: np.ndarray, k: int,
                    metric: str, exclude_self: bool, backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """One block pair's candidates: exact scores (m, c) and global ids (m, c), the query itself as -1.

    The unit of work of every engine: local and distributed runs merge the same candidates.
    """
    wanted = min(backend.candidates(k + int(exclude_self)), len(xb))
    _, local = backend.search(*_centred(xq, xb, metric), wanted, metric)
    scores = exact_scores(xq, xb, local, metric)
    ids = np.where(local >= 0, db_ids[np.maximum(local, 0)], -1)
    if exclude_self:
        ids = np.where(ids == query_ids[:, None], -1, ids)
    return scores, ids


class Request(NamedTuple):
    """One exact search riding a shared pass (`knn_each`): queries ids (m,) and X (m, n), their k, the metric,
    whether each query's own row is left out, and the database rows it may find (`among`, ascending; None: all)."""

    ids: np.ndarray
    X: np.ndarray
    k: int
    metric: str = "l2"
    exclude_self: bool = False
    among: np.ndarray | None = None


def within(database: Block, among: np.ndarray | None) -> Block:
    """The database block's rows a request may find: all, or those whose ids are in `among` (ascending)."""
    if among is None:
        return database
    db_ids, xb = database
    # a binary search into `among` per row: np.isin would sort millions of members again for every block
    at = np.minimum(np.searchsorted(among, db_ids), max(len(among) - 1, 0))
    keep = among[at] == db_ids if len(among) else np.zeros(len(db_ids), bool)
    return db_ids[keep], xb[keep]


def request_candidates(request: Request, database: Block, block_rows: int, backend: Backend,
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """One request's candidates in one database block (`pair_candidates` over its queries, `block_rows` at a
    time): scores and ids (m, c), or None where the block holds no row the request may find."""
    db_ids, xb = within(database, request.among)
    if not len(db_ids):
        return None
    parts = [pair_candidates(request.ids[start:start + block_rows], request.X[start:start + block_rows], db_ids,
                             xb, request.k, request.metric, request.exclude_self, backend)
             for start in range(0, len(request.ids), block_rows)]
    return np.concatenate([scores for scores, _ in parts]), np.concatenate([ids for _, ids in parts])


def knn_each(requests: Sequence[Request], database_blocks: Callable[[], Iterable[Block]], *,
             block_rows: int = 65536, backend: Backend | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every request's exact (D, I), as `knn` gives them, from ONE pass over the database: the searches a
    stage needs at one point share the reading of the patterns (each a few hundred queries: reading dominates)."""
    backend = backend or choose_backend("cpu")
    heaps = [_Heap(request.k, request.metric, len(request.ids)) for request in requests]
    for database in database_blocks():
        for request, heap in zip(requests, heaps):
            found = request_candidates(request, database, block_rows, backend) if len(request.ids) else None
            if found is not None:
                heap.add(*found)
    return [heap.result() for heap in heaps]


def merge(candidates: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str, nq: int,
          ) -> tuple[np.ndarray, np.ndarray]:
    """Merge block pairs' candidates into the best k per query: (D, I)."""
    heap = _Heap(k, metric, nq)
    for scores, ids in candidates:
        heap.add(scores, ids)
    return heap.result()


def knn(query_blocks: Iterable[Block], database_blocks: Callable[[], Iterable[Block]], k: int, *,
        metric: str = "l2", exclude_self: bool = False, backend: Backend | None = None,
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All of `search_blocks` concatenated: (query ids (nq,), D (nq, k), I (nq, k))."""
    parts = list(search_blocks(query_blocks, database_blocks, k, metric=metric, exclude_self=exclude_self,
                               backend=backend))
    if not parts:
        return np.empty(0, np.int64), np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]


def self_join(blocks: Callable[[], Iterable[Block]], k: int, *, metric: str = "l2",
              backend: Backend | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pattern its k nearest OTHER patterns (excluded by id, not by distance 0)."""
    return knn(blocks(), blocks, k, metric=metric, exclude_self=True, backend=backend)


def check_finite(X: np.ndarray, where: str) -> None:
    """Refuses vectors holding NaN or Inf, naming how many and where they come from."""
    if not np.isfinite(X).all():
        rows = int((~np.isfinite(X)).any(axis=1).sum())
        raise DataError(f"{rows} vectors of {where} hold NaN or Inf; they cannot be indexed")


def rms_norm(X: np.ndarray) -> float:
    """sqrt(mean ||x||^2) of the rows of X (m, n), computed without overflow or underflow at any scale."""
    largest = float(np.abs(X).max()) if X.size else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return largest
    scaled = X / np.float32(largest)   # in [-1, 1]: squares neither overflow nor lose the vectors' scale
    return largest * math.sqrt(float(np.einsum("ij,ij->i", scaled, scaled, dtype=np.float64).mean()))


def check_scale(X: np.ndarray, where: str) -> None:
    """Refuses vectors whose RMS norm lies outside NORM_RANGE: float32 squared distances would
    underflow to 0 (every neighbour at distance 0) or overflow to Inf there."""
    check_rms(rms_norm(X), where)


def check_rms(rms: float, where: str) -> None:
    """Refuses an RMS vector norm outside NORM_RANGE, saying the value and the factor that fixes it."""
    low, high = NORM_RANGE
    if not low <= rms <= high:
        fix = f"multiply them by about {1 / rms:.0e}" if rms > 0 else "all of them are zero"
        raise DataError(f"the vectors of {where} have RMS norm {rms:.3g}; memscan computes distances in float32 "
                        f"and needs it in [{low:g}, {high:g}]; rescale the vectors ({fix})")


def array_blocks(ids: np.ndarray, X: np.ndarray, block_rows: int) -> Callable[[], Iterator[Block]]:
    """In-memory arrays as a re-startable iterator of blocks (for tests and small sets)."""
    def blocks() -> Iterator[Block]:
        for start in range(0, len(X), block_rows):
            yield ids[start:start + block_rows], X[start:start + block_rows]
    return blocks
