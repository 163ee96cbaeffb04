"""Choosing an index: its kind for a memory budget and a time budget, its search parameter for a recall target.

`auto_factory` picks the FAISS factory string from the number of vectors, their width and
the memory budget; `sweep` raises nprobe (IVF) or efSearch (HNSW) until a measured recall
reaches the target, as autofaiss does. Both are small pure functions: the caller supplies
the measurement (a search and its recall against exact search), so they run anywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from memscan.errors import InputError

FLAT_MAX = 50_000          # below this, exact search costs less than training an IVF
MIN_TRAIN_PER_LIST = 39    # FAISS warns below 39 training points per centroid
TRAIN_PER_LIST = 64        # default k-means sample per list: enough for stable centroids, a quarter of FAISS's cap
LIST_SIZE = 256            # mean vectors per inverted list: the work of one probe stays the same as d grows
KMEANS_ITERATIONS = 25     # faiss.ClusteringParameters().niter, at each level of `kmeans.train`
# k-means flops (2 x iterations x sample x nlist x n) a CPU build may spend: about 4 minutes
# on a 2-core CPU at the ~80 GFLOP/s its BLAS reaches; a GPU does 50x that in less time.
TRAIN_FLOPS = {False: 2e13, True: 1e15}
ID_BYTES = 16              # per vector beside its code: FAISS's int64 id in an inverted list and memscan's row-id map
GPU_PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)   # what faiss-gpu's IVFPQ takes
# The coarse quantizer from this many lists on: an HNSW graph over the centroids (FAISS's
# IVF{nlist}_HNSW32), whose assignment of a vector costs about the same at any nlist, instead of a
# flat scan of every centroid (2 nlist n flops a vector added or searched). Measured on this
# repository's 2-core CPU, shared (load 1-3), n = 256, centroids drawn from 5,000 clusters, time to
# assign one vector to its nearest list (faiss 1.15.1, 2 threads; 100k vectors at nlist <= 4,096,
# 50k-20k above; HNSW's agreement with the flat scan's nearest list in parentheses):
#     nlist     flat    HNSW32 efSearch 16    efSearch 32    graph build
#     1,024     7.8 us       16 us (0.94)     27 us (0.99)      0.7 s
#     2,048      14 us       20 us (0.89)     32 us (0.96)      0.2 s
#     4,096      31 us       24 us (0.87)     45 us (0.95)      0.9 s
#     8,192      75 us       29 us (0.87)     51 us (0.94)      1.6 s
#    16,384     156 us       22 us (0.91)     51 us (0.96)      1.0 s
#    32,768     254 us       80 us (0.96)    128 us (0.98)      6.7 s
#    65,536     614 us       79 us (0.98)    156 us (1.00)     16.8 s
# The graph wins from ~3,000 lists at FAISS's efSearch of 16, but misassigns 1 vector in 8
# there, which the tuned nprobe pays back; at the efSearch 32 that matches the flat scan's
# assignments to ~0.95 it wins from ~6,000 lists: 8,192 is the first power of 2 where it pays
# either way (the graph's build, a second or two, is spread over 256 vectors a list).
# (benchmarks/bench_query.py --quantizers reruns this table.) Only on a CPU: faiss-gpu's IVF
# searches its centroids by a flat GPU scan whatever the CPU index holds.
HNSW_QUANTIZER_MIN = 8192
HNSW_QUANTIZER_M = 32      # graph neighbours per centroid: FAISS's usual HNSW32
EF_SEARCH_MIN = 16         # HNSW's efSearch sweep starts here (FAISS's own default)
EF_SEARCH_MAX = 4096       # and ends here: deeper than any graph search worth its time
# Compressed codes misorder near neighbours: re-ranking 4x the candidates exactly brings PQ with
# 4 dimensions a byte from ~0.84 to ~0.99 1-recall@1 on clustered data; 16x leaves room for harder data.
RERANK_MAX = 16
# Recall is tuned on searches for TUNE_K neighbours (the query's default k); with a k_factor a
# search for fewer fetches as many candidates, so the tuned 1-recall@1 holds for every k.
TUNE_K = 10
RESOLUTION = 8             # the sweep narrows the chosen value to within 1/8 of the last value that missed

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)


def parse_memory(text: str, flag: str = "--memory") -> int:
    """Bytes of a size written like 512MB, 2GiB, 1.5G or 4000000 (K, M, G, T: powers of 1000;
    Ki, Mi, Gi, Ti: powers of 1024)."""
    match = _SIZE.fullmatch(str(text))
    size = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()] if match else 0.0
    if size < 1:
        raise InputError(f"{flag} must be a size like 512MB, 2GiB or 1.5G; got '{text}'")
    return int(size)


def _gb(size: float) -> str:
    return f"{size / 1e9:.3g} GB"


def _power_of_2_at_most(value: float) -> int:
    return 2 ** math.floor(math.log2(max(value, 1.0)))


def nlist_for(count: int, n: int | None = None, budget: int | None = None, gpu: bool = False) -> tuple[int, str]:
    """The number of IVF lists for `count` vectors of width `n`, and why.

    A power of 2 near count / LIST_SIZE, so a probe scans about 256 vectors at every d and
    the search grows linearly with d (FAISS's guideline of 4-16 sqrt(count) would make
    each probe, and so the self-join, grow with sqrt(d)); then capped three ways:
    - every list gets MIN_TRAIN_PER_LIST training points: nlist <= count / 39;
    - the flat coarse quantizer compares every vector added or searched with every centroid,
      work quadratic in nlist as d grows with it; nlist is capped where one-level k-means
      on TRAIN_PER_LIST points per list (2 x 25 x 64 nlist x nlist x n flops) would pass
      TRAIN_FLOPS (about 4 minutes on a 2-core CPU), although training itself is two-level
      from `kmeans.TWO_LEVEL_MIN` lists (nlist^1.5);
    - with a `budget`, a training sample of 39 points per list (float32) fits half of it.
    """
    wanted = 2 ** round(math.log2(max(count / LIST_SIZE, 1.0)))
    caps = {"count / 39": count / MIN_TRAIN_PER_LIST}
    if n is not None:
        caps["k-means time"] = math.sqrt(TRAIN_FLOPS[gpu] / (2 * KMEANS_ITERATIONS * TRAIN_PER_LIST * n))
    if n is not None and budget is not None:
        caps["training sample in half the memory budget"] = budget / 2 / (4 * n * MIN_TRAIN_PER_LIST)
    binding = min(caps, key=caps.__getitem__)
    nlist = min(wanted, _power_of_2_at_most(caps[binding]))
    why = f"{nlist} lists, a power of 2 near count / {LIST_SIZE}"
    if nlist < wanted:
        why += f", capped by {binding} ({caps[binding]:,.0f})"
    return nlist, why


def index_bytes(count: int, code_bytes: int, lists: int, n: int) -> int:
    """Memory of an index of `count` codes of `code_bytes` each, their ids and `lists` float32 centroids of width n."""
    return count * (code_bytes + ID_BYTES) + lists * n * 4


def pq_subquantizers(count: int, n: int, lists: int, budget: int, gpu: bool = False) -> int | None:
    """The most PQ sub-quantizers m (n % m == 0, m <= n / 4: 8 bits for 4 or more dimensions;
    on a GPU one of GPU_PQ_SUBQUANTIZERS) whose codes fit the budget; None when none does."""
    fitting = [m for m in range(max(1, n // 4), 0, -1)
               if n % m == 0 and (not gpu or m in GPU_PQ_SUBQUANTIZERS) and index_bytes(count, m, lists, n) <= budget]
    return fitting[0] if fitting else None


def coarse_quantizer(lists: int, gpu: bool = False) -> str:
    """The factory suffix of the IVF's coarse quantizer: "_HNSW32" (a graph over the centroids) from
    HNSW_QUANTIZER_MIN lists on a CPU, "" (a flat scan of every centroid) below that and on a GPU."""
    return f"_HNSW{HNSW_QUANTIZER_M}" if lists >= HNSW_QUANTIZER_MIN and not gpu else ""


def auto_factory(count: int, n: int | None = None, budget: int | None = None, gpu: bool = False) -> tuple[str, str]:
    """The FAISS factory string for `count` vectors of width `n` in `budget` bytes, and why (with the numbers).

    Structure by count: exact (Flat) below FLAT_MAX vectors, where a scan costs less than
    training; IVF above (lists: `nlist_for`). Codes by memory, when `n` and `budget` are
    given: float32 (4n bytes a vector) while the index fits the budget, else SQ8 (n bytes),
    else PQ with the most sub-quantizers that fit (`pq_subquantizers`); the exact re-ranking
    of every candidate from the dataset (`KnnIndex.search`) keeps the distances exact
    whatever the codes, and a k_factor tuned with nprobe re-ranks enough candidates for
    the target recall. Without a budget the codes are float32. From HNSW_QUANTIZER_MIN lists on
    a CPU the coarse quantizer is an HNSW graph over the centroids (`IVF{nlist}_HNSW32,...`),
    so assigning a vector no longer costs a scan of every centroid (`coarse_quantizer`).

    Why this fits `memscan index` + `memscan query` of a million n = 256 vectors into 30
    minutes on a 2-core CPU (measured there: k-means at ~80 GFLOP/s, IVF scans of ~5 million
    256-wide vectors a second, both while the machine was shared): 4096 lists (count / 256;
    the k-means cap allows 4,940); two-level k-means on 64 x 4096 = 262,144 points takes
    about 3 s (one level: 1.4e13 flops, 40 s; FAISS's usual 256 per list and 8 sqrt(count)
    = 8,000 lists would be 16x that); adding is 2e12 flops (under a minute); the tuning sample's exact
    truth 1,000 x 1M x 256 x 2 = 5e11 flops (seconds). A self-join at nprobe p then scans
    p x 244 vectors per pattern, ~50 p seconds, so at the tuned p of 1-8 the query's two
    or three self-joins take 1-20 minutes, and the whole grows linearly with d.
    """
    lists, why = nlist_for(count, n, budget, gpu) if count >= FLAT_MAX else (0, "")
    structure = f"IVF{lists}{coarse_quantizer(lists, gpu)}," if lists else ""
    if coarse_quantizer(lists, gpu):
        why += (f", the centroids searched by an HNSW{HNSW_QUANTIZER_M} graph "
                f"(from {HNSW_QUANTIZER_MIN:,} lists on a CPU)")
    kind = (f"{count:,} vectors: IVF with {why}" if lists
            else f"{count:,} vectors: below {FLAT_MAX:,}, a full scan is cheaper than training IVF")
    if n is None or budget is None:
        return f"{structure}Flat", kind
    needed = {"float32": index_bytes(count, 4 * n, lists, n), "SQ8": index_bytes(count, n, lists, n)}
    memory = f"--memory {_gb(budget)}"
    if needed["float32"] <= budget:
        return f"{structure}Flat", f"{kind}; float32 codes and ids ({_gb(needed['float32'])}) fit {memory}"
    if needed["SQ8"] <= budget:
        return f"{structure}SQ8", (f"{kind}; float32 codes and ids ({_gb(needed['float32'])}) exceed {memory}: "
                                   f"SQ8 codes, {n} bytes a vector ({_gb(needed['SQ8'])} with ids), "
                                   "distances exact after re-ranking")
    m = pq_subquantizers(count, n, lists, budget, gpu)
    if m is None:
        raise InputError(f"--memory {_gb(budget)} cannot hold an index of {count:,} vectors even as 1-byte PQ codes "
                         f"({_gb(index_bytes(count, 1, lists, n))} with ids); raise --memory")
    return f"{structure}PQ{m}", (f"{kind}; SQ8 codes and ids ({_gb(needed['SQ8'])}) exceed {memory}: PQ{m} codes, "
                                 f"{m} bytes a vector ({_gb(index_bytes(count, m, lists, n))} with ids), "
                                 "distances exact after re-ranking")


def train_rows(lists: int | None, n: int, budget: int | None) -> int:
    """The default k-means sample: TRAIN_PER_LIST per list (or per PQ centroid without lists),
    fewer where float32 rows would pass half the budget, never under MIN_TRAIN_PER_LIST per list."""
    wanted = TRAIN_PER_LIST * (lists or 256)
    if budget is None:
        return wanted
    return max(MIN_TRAIN_PER_LIST * (lists or 1), min(wanted, budget // 2 // (4 * n)))


def search_values(parameter: str, limit: int) -> list[int]:
    """The values a sweep tries, increasing: nprobe (or k_factor) 1, 2, 4, ... up to `limit`
    (nlist, included); efSearch 16, 32, ... up to `limit`."""
    value, values = (EF_SEARCH_MIN if parameter == "efSearch" else 1), []
    while value < limit:
        values.append(value)
        value *= 2
    return values + [limit]


def sweep(parameter: str, values: Sequence[int], measure: Callable[[int], float], target: float) -> dict[str, Any]:
    """The smallest value reaching `target`: doubling through `values`, then bisecting the last gap.

    `measure(value)` sets the parameter and returns the recall then (1-recall@1 on a sample),
    assumed to grow with the value, as IVF's nprobe and HNSW's efSearch do up to noise. The
    bisection stops within 1/RESOLUTION of the last value that missed. Returns the record for
    index.json: {"parameter", "curve": {parameter: [...], "recall": [...]} (every value
    measured, increasing), "chosen", "reached"}; without any value reaching the target, the
    largest is chosen and "reached" is false.
    """
    curve: dict[int, float] = {}
    missed, hit = 0, None
    for value in values:
        curve[value] = measure(value)
        if curve[value] >= target:
            hit = value
            break
        missed = value
    while hit is not None and missed and hit - missed > max(1, missed // RESOLUTION):
        middle = (missed + hit) // 2
        curve[middle] = measure(middle)
        missed, hit = (missed, middle) if curve[middle] >= target else (middle, hit)
    measured = sorted(curve)
    return {"parameter": parameter, "curve": {parameter: measured, "recall": [curve[value] for value in measured]},
            "chosen": hit if hit is not None else measured[-1], "reached": hit is not None}
