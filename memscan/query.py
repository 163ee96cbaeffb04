"""`memscan query`: nearest-neighbour tables, assumption tests, energies and the cross-entropy floor.

For every layer the dataset holds (the index's layer through the index, the others by
exact blockwise search) a pipeline of small steps runs: the patterns' statistics, their
self-join, A3 (spacing and Ramsauer's separation), the 25/50/75% subsets, then the query
split streamed in blocks (search, energies, retrieval), each block's rows appended to the
`neighbours` and `queries` tables on disk; the `patterns`, `histograms` and `coverage`
tables and the layer's summary come last. When the index is approximate every statistic
goes through an index, its recall, bound or certified interval written beside it (the
largest nearest-other distances, which dominate log Z_t, are searched again exactly; Delta
and E_mchn are exact below `tuning.FLAT_MAX` patterns, where an inner-product index would
be Flat); `--exact` (or a Flat index) keeps every statistic exact. One budget, `--memory`,
sizes every block: nothing proportional to d x d or to the whole query split is held, only
a few numbers a pattern and one a query. summary.json, written last and signed (`self_sha256`), lists
every table with its size and sha256: a folder whose summary does not vouch for its
tables is an incomplete run. Queries from the index's own dataset and split leave their
own row out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from memscan import analysis, files, folders, store, theory
from memscan.engines import knn as knn_engine
from memscan.errors import DataError, InputError
from memscan.knn import exact, tuning
from memscan.knn.index import DEVICES, RECALL_RTOL, KnnIndex, at_least, dataset_blocks, manifest_sha256, recall_at
from memscan.knn.mips import CANDIDATE_SLACK, RECALL_QUERIES, MipsIndex, Sample, choose_factory

log = logging.getLogger(__name__)

SUMMARY = folders.QUERY_RUN.record
TABLES = ("neighbours", "queries", "patterns", "histograms", "coverage")
TABLE_FILES = tuple(f"{name}.parquet" for name in TABLES)
STEPS = ("patterns", "self-join", "inner-product join", "subsets", "searches", "energies", "retrieval")
MIN_MEMORY = 1 << 20     # bytes: below this a block would hold a handful of rows
MAX_BLOCK_ROWS = 65536   # the store's batch: more rows per block buy no speed
MIN_PATTERN_ROWS = 64    # a floor for tiny budgets: smaller blocks cost more per block than they save
# log Z_t is a log-sum dominated by the largest radii s_i / 2, and a missed neighbour only makes
# an s_i larger: the largest 1%, at most VERIFY_MAX, are searched again exactly (each row a pass
# over the d patterns: the cap keeps this linear in d; the terms beyond the largest thousand of
# a log-sum over radii^n hardly move it, and the interval it certifies says how much) ...
VERIFY_FRACTION = 0.01
VERIFY_MAX = 1_000
VERIFY_ROUNDS = 4        # ... and again while corrections bring unverified s_i among the largest;
VERIFY_MARGIN = 1.25     # the first round takes a quarter more, which those would come from (each round is a pass)
SUBSET_MISS = 1e-4       # the chance that a subset member's deeper neighbour list holds no other member

Sink = Callable[[str, dict[str, np.ndarray]], None]   # appends rows (columns (m,)) to the named table


def _positive_finite(flag: str, value: float, given: Any = None) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be positive and finite; got {value if given is None else given}")


def memory_bytes(text: str) -> int:
    """--memory in bytes (`tuning.parse_memory`: 512MB, 2GiB, 1.5G, ...), refused below 1 MiB."""
    size = tuning.parse_memory(text)
    if size < MIN_MEMORY:
        raise InputError(f"--memory must be at least 1MiB; got '{text}'")
    return size


@dataclass(frozen=True)
class QuerySettings:
    """What `memscan query` computes (see `memscan query --help`)."""

    split: str = "test"
    k: int = 10
    exact: bool = False
    beta: float = 1.0
    radius: str = "r*"               # r* | typical | a positive number
    epsilon: float | None = None     # retrieval tolerance; None: 1% of the median nearest-other distance
    max_steps: int = 100
    bins: int = 50
    subsets: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0))
    seed: int = 0
    device: str = "auto"
    memory: str = "2GB"              # the working-memory budget every block is sized from (the index aside)
    sites: str | None = None         # None: the index's site; `all` or names: those sites too, searched exactly

    def check(self) -> None:
        """Every value against its range, once, naming the flag: NaN and Inf are refused."""
        for flag, value, minimum in (("--k", self.k, 1), ("--max-steps", self.max_steps, 1),
                                     ("--bins", self.bins, 1), ("--seed", self.seed, 0)):
            at_least(flag, value, minimum)
        _positive_finite("--beta", self.beta)
        if self.epsilon is not None:
            _positive_finite("--epsilon", self.epsilon)
        if self.radius not in ("r*", "typical"):
            try:
                value = float(self.radius)
            except ValueError:
                raise InputError(f"--radius must be r*, typical or a positive number; got '{self.radius}'") from None
            _positive_finite("--radius", value, self.radius)
        if not self.subsets or not all(0 < fraction <= 1 for fraction in self.subsets):
            raise InputError(f"subsets must be fractions in (0, 1]; got {list(self.subsets)}")
        if self.device not in DEVICES:
            raise InputError(f"--device must be auto, cpu or gpu; got '{self.device}'")
        memory_bytes(self.memory)


# ---------------------------------------------------------------- one layer: its sizes and what its steps read


@dataclass(frozen=True)
class Blocks:
    """Rows handled at once, each derived from the --memory budget (written into the summary)."""

    memory_bytes: int
    pattern_rows: int    # patterns streamed at once: exact searches, the MCHN pass, the inner-product index
    query_rows: int      # queries searched, scored and written at once
    join_rows: int       # patterns per batch of the index's self-join
    knn_rows: int        # queries held per exact k-NN pass over the patterns (verification, the subsets' rest)


def mips_budget(budget: int) -> int:
    """The share of --memory the inner-product index may hold: the quarter the blocks leave free
    (pattern blocks take a quarter, query blocks half), so it gets compressed codes before it
    would double the working memory of a large layer."""
    return budget // 4


def block_sizes(budget: int, n: int, k: int, d: int, full_pass: bool, candidates: int | None = None) -> Blocks:
    """The largest blocks whose working sets fit the budget.

    A quarter of it holds a block of patterns (float32 and a float64 copy: 12 n bytes a
    row). Half holds a block of queries, whose largest working set is a gather of
    neighbour vectors: 8 n (3k + 8) bytes a query bounds retrieval's k float32 vectors
    with two float64 copies (20 k n) and the exact re-ranking of k + 9 candidates (float32,
    scored in chunks); exact runs add the MCHN pass's float64 products against a pattern
    block (24 bytes a pattern), as does every exact search of queries against the patterns
    Half holds a batch of the index's self-join (its candidates gathered as float32 vectors
    and a copy, 8 n bytes each: k + 1 a pattern, or `candidates` where an index of compressed
    codes fetches k_factor times as many); a query's re-ranking grows by the candidates beyond
    k + 1 likewise. An exact k-NN pass holds its queries (float32 and a
    centred copy, 8 n bytes) and their candidates, so a quarter holds far more of them than
    an MCHN pass: the patterns are streamed once per pass, not once per few hundred queries.
    Blocks never go below one row (MIN_PATTERN_ROWS patterns) nor above MAX_BLOCK_ROWS.
    """
    def rows(share: int, per_row: int, most: int, least: int = 1) -> int:
        return int(min(max(share // per_row, least), most))

    pattern_rows = rows(budget // 4, 12 * n, min(MAX_BLOCK_ROWS, d), MIN_PATTERN_ROWS)
    extra = max(0, (candidates or k + 1) - (k + 1))   # candidates a compressed index fetches beyond k + 1
    per_query = 8 * n * (3 * k + CANDIDATE_SLACK + extra)
    mchn_rows = rows(budget // 2, per_query + 24 * pattern_rows, MAX_BLOCK_ROWS)
    query_rows = mchn_rows if full_pass else rows(budget // 2, per_query, MAX_BLOCK_ROWS)
    knn_rows = rows(budget // 4, 8 * n + 24 * (k + CANDIDATE_SLACK), MAX_BLOCK_ROWS)
    return Blocks(budget, pattern_rows, query_rows, rows(budget // 2, 8 * n * (k + 1 + extra), MAX_BLOCK_ROWS),
                  knn_rows)


@dataclass(frozen=True)
class Layer:
    """What every step of one layer reads."""

    index: KnnIndex
    queries: store.ActivationDataset
    patterns: store.ActivationDataset   # the index's dataset at this layer's site
    layer: int
    settings: QuerySettings
    leave_one_out: bool     # the queries are the indexed patterns: each leaves its own row out
    d: int                  # patterns
    nq: int                 # queries
    use_index: bool         # searched through the index (its own site and layer, no --exact)
    approximate: bool       # ... and the index is approximate: the statistics go through indexes
    exact_products: bool    # Delta and E_mchn exact: not approximate, or the inner-product index would be Flat
    blocks: Blocks
    device: str             # torch device of the retrieval: cpu or cuda

    @property
    def pattern_split(self) -> str:
        return self.index.info["dataset"]["split"]

    @property
    def engine(self) -> knn_engine.Engine:
        return self.index.engine

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Patterns' vectors (m, n) float32 by row id: from the index where it holds this site and layer (an O(m)
        lookup when its codes are exact), else read from the dataset."""
        own = self.patterns.site == self.index.dataset.site and self.layer == self.index.info["dataset"]["layer"]
        return self.index.vectors(rows) if own else self.patterns.take(rows)

    @property
    def pattern_blocks(self) -> Callable[[], Iterator[exact.Block]]:
        """The patterns of this layer as a re-startable iterator of (row ids, X) blocks of `pattern_rows`."""
        return dataset_blocks(self.patterns, self.pattern_split, self.layer, self.blocks.pattern_rows)


def _torch_device(device: str) -> str:
    """cuda where torch sees a GPU and --device is not cpu; else cpu."""
    import torch

    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def _layer(index: KnnIndex, queries: store.ActivationDataset, layer: int, settings: QuerySettings,
           leave_one_out: bool, patterns: store.ActivationDataset | None = None) -> Layer:
    """The layer's sizes and search mode, after refusing a --k or a query split it cannot serve.

    `patterns`: the index's dataset at the queries' site (None: the index's own site)."""
    patterns = patterns or index.dataset
    d = patterns.count(index.info["dataset"]["split"], layer)
    if not settings.k <= d - 1:
        raise InputError(f"--k must be at most the {d - 1:,} patterns other than the query itself; got {settings.k:,}")
    nq = queries.count(settings.split, layer)
    if not nq:
        raise InputError(f"split '{settings.split}' of '{queries.directory}' has no rows at layer {layer}")
    own = patterns.site == index.dataset.site and layer == index.info["dataset"]["layer"]
    use_index = own and not settings.exact
    approximate = use_index and not index.exact
    budget = memory_bytes(settings.memory)
    # a Flat inner-product index scans every pattern: an exact join costs as much and is exact
    exact_products = not approximate or choose_factory(d, patterns.n, mips_budget(budget))[0] == "Flat"
    blocks = block_sizes(budget, patterns.n, settings.k, d, full_pass=exact_products,
                         candidates=index.candidates(settings.k, exclude_self=True) if use_index else None)
    return Layer(index, queries, patterns, layer, settings, leave_one_out, d, nq, use_index, approximate, exact_products,
                 blocks, _torch_device(settings.device))


@contextlib.contextmanager
def _step(progress: Any, layer: int, name: str, done: bool = True) -> Iterator[None]:
    """One step of STEPS on the progress bar: named while it runs, counted when `done`
    (a step repeated per query block counts once, with the last block)."""
    progress.set_postfix_str(f"layer {layer}: {name}")
    yield
    if done:
        progress.update()


# ---------------------------------------------------------------- the patterns' steps


class PatternMeta(NamedTuple):
    """Per pattern, in row order (d,): row id, next token, loss and squared norm (float64)."""

    row_id: np.ndarray
    next_token_id: np.ndarray
    nll: np.ndarray
    sq_norm: np.ndarray


def _pattern_meta(layer: Layer) -> PatternMeta:
    """Row id, next token, loss and squared norm of every pattern, streamed (vectors not kept)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in PatternMeta._fields}
    batches = layer.patterns.iter_batches(split=layer.pattern_split, layer=layer.layer,
                                          columns=("row_id", "next_token_id", "nll"),
                                          batch_rows=layer.blocks.pattern_rows)
    for X, meta in batches:
        for name in ("row_id", "next_token_id", "nll"):
            parts[name].append(meta[name])
        X64 = X.astype(np.float64)
        parts["sq_norm"].append(np.einsum("ij,ij->i", X64, X64))
    patterns = PatternMeta(*(np.concatenate(parts[name]) for name in PatternMeta._fields))
    exact.check_rms(math.sqrt(float(patterns.sq_norm.mean())), f"split '{layer.pattern_split}' at layer {layer.layer}")
    return patterns


class SelfJoin(NamedTuple):
    """Every pattern's k nearest other patterns: D (d, k) squared distances, I (d, k) row ids, s (d,) nearest."""

    D: np.ndarray
    I: np.ndarray
    s: np.ndarray


def _missing(found: np.ndarray, k: int) -> None:
    """Refuses neighbour lists (m, k) holding -1: an approximate index that found fewer than k."""
    missing = int((found < 0).any(axis=1).sum())
    if missing:
        raise InputError(f"the approximate index found fewer than k={k} neighbours for {missing:,} vectors; "
                         "raise the index's nprobe / efSearch, lower --k, or pass --exact")


def _self_join(layer: Layer, patterns: PatternMeta) -> SelfJoin:
    """The patterns' self-join: through the index at its own layer (unless --exact), exactly elsewhere."""
    k = layer.settings.k
    if layer.use_index:
        pid, D, I = layer.index.self_join(k, batch_rows=layer.blocks.join_rows)
    else:
        pid, D, I = layer.engine.self_join(layer.pattern_blocks, k)
    assert np.array_equal(pid, patterns.row_id)   # both stream the same split and layer in row order
    _missing(I, k)
    return SelfJoin(D, I, np.sqrt(D[:, 0]))


class Verified(NamedTuple):
    """Which s_i of an approximate self-join were searched again exactly (`_verify_largest`)."""

    exact: np.ndarray     # (d,) bool: s_i (and the pattern's whole list) is exact
    largest: int          # how many of the largest s_i were to be exact (VERIFY_FRACTION of d, at most VERIFY_MAX)
    largest_exact: bool   # ... and are: no unverified s_i is among them
    corrected: int        # verified s_i the index had too large (a nearer pattern was missed)
    rounds: int


def _exact_neighbours(layer: Layer, ids: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest other patterns (D squared, I) of the patterns `ids`, whose k-th nearest other lies
    within `radius`: through the lists of an IVF-Flat index that can hold one, else a blockwise exact search."""
    X = layer.vectors(ids)
    found = layer.index.exact_within(X, layer.settings.k, ids, radius) if layer.use_index else None
    if found is not None:
        return found
    queries = exact.array_blocks(ids, X, layer.blocks.knn_rows)
    _, D, I = layer.engine.knn(queries(), layer.pattern_blocks, layer.settings.k, exclude_self=True)
    return D, I


def _verify_largest(layer: Layer, patterns: PatternMeta, joined: SelfJoin) -> tuple[SelfJoin, Verified | None]:
    """An approximate layer's self-join with the lists of its largest s_i replaced by exact ones.

    A missed neighbour only makes s_i larger, so the misses gather among the largest s_i,
    which also dominate log Z_t: the VERIFY_FRACTION largest (at most VERIFY_MAX; in the
    first round VERIFY_MARGIN times as many) are searched exactly against every pattern
    (own row excluded), then the largest again, up to VERIFY_ROUNDS times, while corrected
    values let unverified ones in. (joined, None) in exact layers.
    """
    if not layer.approximate:
        return joined, None
    D, I, s = joined.D.copy(), joined.I.copy(), joined.s.copy()
    exact_rows = np.zeros(layer.d, bool)
    largest, corrected, rounds = min(math.ceil(VERIFY_FRACTION * layer.d), VERIFY_MAX), 0, 0
    while True:
        wanted = largest if rounds else min(layer.d, math.ceil(VERIFY_MARGIN * largest))
        top = np.argpartition(-s, wanted - 1)[:wanted]
        todo = np.sort(top[~exact_rows[top]])
        if not todo.size or rounds == VERIFY_ROUNDS:
            break
        ids = patterns.row_id[todo]
        D_exact, I_exact = _exact_neighbours(layer, ids, np.sqrt(D[todo, -1]))
        corrected += int((D_exact[:, 0] < D[todo, 0] * (1 - RECALL_RTOL)).sum())   # float rounding is no miss
        D[todo], I[todo], s[todo] = D_exact, I_exact, np.sqrt(D_exact[:, 0])
        exact_rows[todo] = True
        rounds += 1
    log.info("layer %d: the %d largest nearest-other distances searched exactly in %d rounds: %d corrected",
             layer.layer, int(exact_rows.sum()), rounds, corrected)
    return SelfJoin(D, I, s), Verified(exact_rows, largest, not todo.size, corrected, rounds)


class Radii(NamedTuple):
    """The radii of A2/A3 and the retrieval's tolerances, all from the spacing s."""

    r_star: float
    typical: float
    radius: float       # the --radius value
    scale: float        # median positive s: the spacing tolerances scale with
    epsilon: float      # retrieval: converged this close to the nearest pattern


def _radius(mode: str, r_star: float, typical: float) -> float:
    return r_star if mode == "r*" else typical if mode == "typical" else float(mode)


def _radii(layer: Layer, joined: SelfJoin) -> Radii:
    s = joined.s
    r_star, typical = theory.unit_volume_radius(layer.patterns.n), float(np.median(s) / 2)
    scale = float(np.median(s[s > 0])) if (s > 0).any() else 1.0   # duplicates give s = 0
    return Radii(r_star, typical, _radius(layer.settings.radius, r_star, typical), scale,
                 layer.settings.epsilon or 0.01 * scale)


class Mips(NamedTuple):
    """The inner-product index of an approximate layer and its measured recall (`MipsIndex.tune`)."""

    index: MipsIndex
    recall: dict[str, Any]


def _query_sample(layer: Layer) -> Sample:
    """A seeded sample of the queries, each searched for its k largest inner products (the MCHN interval's)."""
    ids = layer.queries.row_ids(layer.settings.split, layer.layer)
    rng = np.random.default_rng(layer.settings.seed)
    ids = np.sort(rng.choice(ids, size=min(RECALL_QUERIES, len(ids)), replace=False))
    return Sample(ids, layer.queries.take(ids), layer.settings.k, exclude_self=False)


def _mips(layer: Layer, patterns: PatternMeta) -> Mips | None:
    """The inner-product index of an approximate layer, its nprobe tuned so that the patterns' maxima
    (Delta) and the queries' top k (E_mchn) reach the target recall; None where the products are exact."""
    if layer.exact_products:
        return None
    blocks, max_sq_norm = layer.pattern_blocks, float(patterns.sq_norm.max())
    # an approximate layer is the index's own site and layer: its lists hold these patterns
    index = (MipsIndex.over_lists(layer.index.shards, layer.vectors, max_sq_norm, layer.index.info["factory"])
             or MipsIndex.build(layer.patterns, blocks, layer.d, max_sq_norm, mips_budget(layer.blocks.memory_bytes),
                                layer.settings.seed, vectors=layer.vectors))
    samples = {"patterns": index.sample(seed=layer.settings.seed), "queries": _query_sample(layer)}
    return Mips(index, index.tune(layer.engine, blocks, samples))


class Separation(NamedTuple):
    """A3 by Ramsauer: Delta_i (d,) float64, the threshold, M, and how Delta's inner products were found."""

    delta: np.ndarray
    threshold: float
    max_norm: float
    search: dict[str, Any]


def _paired_products(layer: Layer, partners: np.ndarray) -> np.ndarray:
    """rho_i . rho_partner(i) in float64 for every pattern i (d,), streamed: the exact join's scores are
    float32, whose rounding at ||rho||^2 would swamp a small Delta_i."""
    parts, start = [], 0
    for _, X in layer.pattern_blocks():
        other = layer.vectors(partners[start:start + len(X)])
        parts.append(np.einsum("ij,ij->i", X.astype(np.float64), other.astype(np.float64)))
        start += len(X)
    return np.concatenate(parts)


def _separation(layer: Layer, patterns: PatternMeta, mips: Mips | None) -> Separation:
    """Delta_i = rho_i.rho_i - max_{j != i} rho_i.rho_j: through the inner-product index, or an exact join.

    Through the index Delta_i is an upper bound: a maximum found is never above the true one.
    """
    if mips is None:
        pid, _, partner = layer.engine.self_join(layer.pattern_blocks, 1, metric="ip")
        best = _paired_products(layer, partner[:, 0])
        search: dict[str, Any] = {"search": "exact", "recall_1_at_1": None}
    else:
        pid, best = mips.index.max_other(layer.pattern_blocks)
        recall = mips.recall["samples"]["patterns"]["recall_1_at_1"]
        search = {"search": f"approximate: {mips.index.factory} {mips.index.search_params}",
                  "factory_reason": mips.index.reason, "recall_1_at_1": recall,
                  "bound": f"upper: ramsauer_delta and ramsauer_well_separated are upper bounds (a maximum inner "
                           f"product found is never above the true one); the maxima's 1-recall@1 is {recall:.3f}",
                  **mips.recall}
    assert np.array_equal(pid, patterns.row_id)
    M = math.sqrt(float(patterns.sq_norm.max()))
    return Separation(theory.ramsauer_separation(patterns.sq_norm, best),
                      theory.ramsauer_threshold(layer.d, layer.settings.beta, M), M, search)


class SubsetNearest(NamedTuple):
    """A seeded subset's members (m,) in row order, their nearest-other distances within it (m,) float32,
    how many of those the self-join's lists gave (the rest were searched), and the searched ones'
    1-recall@1 against an exact search on a sample (None where the search was exact)."""

    fraction: float
    row_ids: np.ndarray
    values: np.ndarray
    from_lists: int
    recall: dict[str, Any] | None


def _filtered(blocks: Callable[[], Iterator[exact.Block]], keep: np.ndarray) -> Callable[[], Iterator[exact.Block]]:
    """The blocks' rows whose row ids are in `keep` (ascending), as a re-startable iterator."""
    def subset() -> Iterator[exact.Block]:
        for ids, X in blocks():
            mask = np.isin(ids, keep, assume_unique=True)
            if mask.any():
                yield ids[mask], X[mask]
    return subset


def rest_depth(fraction: float, d: int) -> int:
    """How many nearest patterns to search so that one is a member of a `fraction` subset but for a
    SUBSET_MISS chance: (1 - fraction)^depth <= SUBSET_MISS (33 for a quarter), at most d - 1."""
    return min(d - 1, math.ceil(math.log(SUBSET_MISS) / math.log1p(-fraction)))


def _first_members(I: np.ndarray, D: np.ndarray, member: np.ndarray, row_id: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per list (rows of I, sorted by distance): whether it holds a member, and that first member's D (else NaN)."""
    hits = (I >= 0) & member[np.searchsorted(row_id, np.maximum(I, 0))]
    listed = hits.any(axis=1)
    return listed, np.where(listed, D[np.arange(len(I)), hits.argmax(axis=1)], np.nan)


def _exact_within_subset(layer: Layer, ids: np.ndarray, members: np.ndarray) -> np.ndarray:
    """The squared distances (m,) from the patterns `ids` to their nearest other member, by an exact pass."""
    queries = exact.array_blocks(ids, layer.vectors(ids), layer.blocks.knn_rows)
    _, D, _ = layer.engine.knn(queries(), _filtered(layer.pattern_blocks, members), 1, exclude_self=True)
    return D[:, 0]


def _members_through_index(layer: Layer, member: np.ndarray, row_id: np.ndarray, ids: np.ndarray,
                           depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Whether each of the patterns `ids` has a member among its `depth` nearest through the index, and the
    first one's squared distance (NaN where none), in blocks that hold their candidates in the budget."""
    listed, sq = np.zeros(len(ids), bool), np.full(len(ids), np.nan)
    # the self-join's batches hold its candidates in the budget: these hold as many candidate vectors
    step = max(1, layer.blocks.join_rows * layer.index.candidates(layer.settings.k, True)
               // layer.index.candidates(depth, True))
    for start in range(0, len(ids), step):
        block = ids[start:start + step]
        D, I = layer.index.search(layer.vectors(block), depth, block)
        listed[start:start + step], sq[start:start + step] = _first_members(I, D, member, row_id)
    return listed, sq


def _searched_members(layer: Layer, patterns: PatternMeta, member: np.ndarray, ids: np.ndarray,
                      fraction: float) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Squared distances (m,) from the patterns `ids` to their nearest other member, and their recall.

    Exact layers (and a Flat index) search the members exactly. Approximate ones take the
    first member among each one's `rest_depth` nearest through the index, with its nprobe
    (efSearch) raised to the smallest value at which that reaches the index's target
    1-recall@1 on a seeded sample against an exact search (deeper neighbours are missed
    more often than the nearest the index was tuned for; an index with neither, a scan of
    compressed codes, searches once at its own settings); those still without one are
    searched exactly (in the sample: their exact values are at hand).
    """
    members = patterns.row_id[member]
    if not layer.approximate:
        return _exact_within_subset(layer, ids, members), None
    depth, knob = rest_depth(fraction, layer.d), layer.index.recall_knob()
    sample = np.sort(np.random.default_rng(layer.settings.seed).choice(
        len(ids), size=min(RECALL_QUERIES, len(ids)), replace=False))
    truth = _exact_within_subset(layer, ids[sample], members)

    def through_index(rows: np.ndarray, value: int | None) -> tuple[np.ndarray, np.ndarray]:
        with layer.index.searching_with(**({knob[0]: value} if knob else {})):
            return _members_through_index(layer, member, patterns.row_id, rows, depth)

    def measure(value: int | None) -> float:
        listed, sq = through_index(ids[sample], value)
        return recall_at(np.where(listed, sq, truth)[:, None], truth[:, None], "l2")[0]

    record: dict[str, Any] = {"queries": len(sample), "depth": depth}
    if knob is None:   # a scan of every (compressed) code: no parameter buys recall
        chosen, record["recall_1_at_1"] = None, measure(None)
    else:
        parameter, limit = knob
        start = layer.index.info["search"][parameter]
        values = [start] + [value for value in tuning.search_values(parameter, limit) if value > start]
        swept = tuning.sweep(parameter, values, measure, layer.index.target_recall)
        chosen, curve = swept["chosen"], swept["curve"]
        record.update({parameter: chosen, "curve": curve,
                       "recall_1_at_1": curve["recall"][curve[parameter].index(chosen)]})
    listed, sq = through_index(ids, chosen)
    if not listed.all():
        sq[~listed] = _exact_within_subset(layer, ids[~listed], members)
    return sq, record


def _subset(layer: Layer, patterns: PatternMeta, joined: SelfJoin, fraction: float) -> SubsetNearest:
    """The paper's 25/50/75%: nearest-other distances within a seeded random `fraction` of the patterns.

    A member whose self-join list holds another member takes the first such one: the
    list is sorted by distance, so that member is its nearest within the subset (exact
    where the list is). The members whose lists hold none are searched (`_searched_members`).
    """
    d = layer.d
    chosen = np.random.default_rng(layer.settings.seed).choice(d, size=max(2, int(fraction * d)), replace=False)
    member = np.zeros(d, bool)
    member[chosen] = True
    rows = np.flatnonzero(member)
    listed, sq = _first_members(joined.I[rows], joined.D[rows], member, patterns.row_id)
    recall = None
    if not listed.all():
        sq[~listed], recall = _searched_members(layer, patterns, member, patterns.row_id[rows[~listed]], fraction)
    return SubsetNearest(fraction, patterns.row_id[rows], np.sqrt(sq).astype(np.float32), int(listed.sum()), recall)


# ---------------------------------------------------------------- the queries' steps, one block at a time


def _search_block(layer: Layer, ids: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block's k nearest patterns (D (b, k), I (b, k)): through the index or exactly, as the self-join."""
    k, own = layer.settings.k, ids if layer.leave_one_out else None
    if layer.use_index:
        D, I = layer.index.search(X, k, own)
    else:
        _, D, I = layer.engine.knn(iter([(ids, X)]), layer.pattern_blocks, k, exclude_self=layer.leave_one_out)
    _missing(I, k)
    return D, I


class Energies(NamedTuple):
    """Per query (b,) float64: E's certified interval, E_mchn (exact runs; NaN otherwise) and its interval."""

    lower: np.ndarray
    upper: np.ndarray
    mchn: np.ndarray
    mchn_lower: np.ndarray
    mchn_upper: np.ndarray


def _energies(layer: Layer, mips: Mips | None, max_sq_norm: float, X: np.ndarray, D: np.ndarray) -> Energies:
    """E from the k nearest; E_mchn from the k largest inner products, with an interval over the d - k others.

    Exact runs take E_mchn over all patterns and its top k in the same pass; approximate
    ones take the top k from the inner-product index (the interval's lower end is then
    certified as far as those k are the true top k) and never pass over every pattern.
    """
    k, beta = layer.settings.k, layer.settings.beta
    lower, upper = theory.energy_interval(D.astype(np.float64), layer.d, beta)   # certified when the k are exact
    if mips is None:
        mchn, top = analysis.mchn_combine(
            X, layer.engine.map_blocks(analysis.mchn_partial, layer.pattern_blocks, X, beta, k), beta, k)
    else:
        found = mips.index.search(X, k)
        _missing(found.ids, k)
        mchn, top = np.full(len(X), np.nan), found.ip
    X64 = X.astype(np.float64)
    mchn_lower, mchn_upper = theory.mchn_energy_interval(top, np.einsum("ij,ij->i", X64, X64), layer.d,
                                                         max_sq_norm, beta)
    return Energies(lower, upper, mchn, mchn_lower, mchn_upper)


class Retrieval(NamedTuple):
    """A1 per query (b,): converged, steps taken, retrieved (converged within epsilon of the nearest)."""

    converged: np.ndarray
    steps: np.ndarray
    retrieved: np.ndarray


def _retrieval(layer: Layer, radii: Radii, X: np.ndarray, I: np.ndarray) -> Retrieval:
    """The retrieval update of the whole block at once over each query's k nearest patterns."""
    neighbours = layer.vectors(I.ravel()).reshape(*I.shape, -1)                       # (b, k, n)
    return Retrieval(*analysis.retrieval(X, neighbours, layer.settings.beta, radii.epsilon, tol=1e-6 * radii.scale,
                                         max_steps=layer.settings.max_steps, device=layer.device))


@dataclass
class QueryTotals:
    """What the summary needs of the queries, accumulated block by block: the nearest distances
    (one float32 a query, for quantiles and coverage) and running sums."""

    nearest: list[np.ndarray] = field(default_factory=list)
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    loss_sum: float = 0.0
    loss_count: int = 0

    def add(self, nearest: np.ndarray, energies: Energies, retrieval: Retrieval, next_token: np.ndarray,
            next_match: np.ndarray, nll: np.ndarray) -> None:
        self.nearest.append(nearest)
        self.count += len(nearest)
        for name, values in (*energies._asdict().items(), ("retrieved", retrieval.retrieved),
                             ("converged", retrieval.converged), ("next_known", next_token >= 0),
                             ("next_match", next_match)):
            self.sums[name] = self.sums.get(name, 0.0) + float(np.sum(values, dtype=np.float64))
        finite = np.isfinite(nll)
        self.loss_sum += float(np.sum(nll[finite], dtype=np.float64))
        self.loss_count += int(finite.sum())

    def mean(self, name: str, over: str | None = None) -> float:
        """The mean of a summed column over the queries, or over those where the column `over` holds;
        NaN over none (null in summary.json: undefined, not 0)."""
        count = self.count if over is None else self.sums[over]
        return self.sums[name] / count if count else math.nan

    @property
    def test_loss(self) -> float | None:
        return self.loss_sum / self.loss_count if self.loss_count else None


def _query_rows(layer: Layer, ids: np.ndarray, D: np.ndarray, I: np.ndarray, energies: Energies,
                retrieval: Retrieval, next_match: np.ndarray, nll: np.ndarray, radius: float,
                ) -> dict[str, dict[str, np.ndarray]]:
    """The block's rows of the neighbours (b k) and queries (b) tables."""
    k, b = layer.settings.k, len(ids)
    nearest = np.sqrt(D[:, 0])
    return {
        "neighbours": {"layer": np.full(I.size, layer.layer, np.int16), "query_row_id": np.repeat(ids, k),
                       "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), b),
                       "neighbour_row_id": I.ravel(), "dist": np.sqrt(D).ravel(), "sqdist": D.ravel()},
        "queries": {"layer": np.full(b, layer.layer, np.int16), "query_row_id": ids,
                    "nearest_dist": nearest, "nearest_sqdist": D[:, 0], "energy_lower": energies.lower,
                    "energy_upper": energies.upper, "mchn_energy": energies.mchn,
                    "mchn_energy_lower": energies.mchn_lower, "mchn_energy_upper": energies.mchn_upper,
                    "retrieval_converged": retrieval.converged, "retrieval_steps": retrieval.steps,
                    "retrieved": retrieval.retrieved, "next_token_match": next_match, "nll": nll,
                    "inside_radius": nearest <= radius},
    }


def _stream_queries(layer: Layer, patterns: PatternMeta, radii: Radii, mips: Mips | None, sink: Sink,
                    progress: Any) -> tuple[QueryTotals, int]:
    """Every query block searched, scored and written: (the totals, the number of blocks)."""
    from tqdm.auto import tqdm

    settings, totals, blocks = layer.settings, QueryTotals(), 0
    max_sq_norm = float(patterns.sq_norm.max())
    batches = layer.queries.iter_batches(split=settings.split, layer=layer.layer,
                                         columns=("row_id", "next_token_id", "nll"),
                                         batch_rows=layer.blocks.query_rows)
    with tqdm(total=layer.nq, desc="queries", unit="vec", unit_scale=True, disable=None, leave=False) as bar:
        for X, meta in batches:
            started = time.perf_counter()
            last = totals.count + len(X) == layer.nq
            exact.check_scale(X, f"the queries (split '{settings.split}' at layer {layer.layer})")
            ids = meta["row_id"]
            with _step(progress, layer.layer, "searches", last):
                D, I = _search_block(layer, ids, X)
            with _step(progress, layer.layer, "energies", last):
                energies = _energies(layer, mips, max_sq_norm, X, D)
            with _step(progress, layer.layer, "retrieval", last):
                retrieval = _retrieval(layer, radii, X, I)
            nearest_next = patterns.next_token_id[np.searchsorted(patterns.row_id, I[:, 0])]
            next_match = (meta["next_token_id"] >= 0) & (nearest_next == meta["next_token_id"])
            for name, rows in _query_rows(layer, ids, D, I, energies, retrieval, next_match, meta["nll"],
                                          radii.radius).items():
                sink(name, rows)
            totals.add(np.sqrt(D[:, 0]), energies, retrieval, meta["next_token_id"], next_match, meta["nll"])
            blocks += 1
            bar.update(len(X))
            log.debug("layer %d: query block %d, %d queries, %.2f s", layer.layer, blocks, len(X),
                      time.perf_counter() - started)
    return totals, blocks


# ---------------------------------------------------------------- the layer's last tables and its summary


def _pattern_rows(layer: Layer, patterns: PatternMeta, joined: SelfJoin, radii: Radii,
                  separation: Separation) -> dict[str, np.ndarray]:
    s, delta = joined.s, separation.delta
    return {"layer": np.full(layer.d, layer.layer, np.int16), "row_id": patterns.row_id, "nearest_other_dist": s,
            "disjoint_radius": s / 2, "ramsauer_delta": delta,
            "well_separated_r_star": analysis.disjoint(s, radii.r_star),
            "well_separated_ramsauer": delta >= separation.threshold}


def _histogram_rows(layer: Layer, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every sample's histogram over bins shared by all (subsets spread wider: bin them all)."""
    count = layer.settings.bins
    bins = analysis.shared_bins(*samples.values(), count=count)
    return {"layer": np.full(len(samples) * count, layer.layer, np.int16), "table": np.repeat(list(samples), count),
            "bin_left": np.tile(bins[:-1], len(samples)), "bin_right": np.tile(bins[1:], len(samples)),
            "count": np.concatenate([analysis.histogram(values, bins) for values in samples.values()])}


def _coverage_rows(layer: Layer, nearest: np.ndarray, radius: float) -> dict[str, np.ndarray]:
    radii = np.linspace(0, float(max(nearest.max(), 2 * radius)) * 1.05, 101)
    return {"layer": np.full(len(radii), layer.layer, np.int16), "radius": radii,
            "coverage": analysis.coverage(nearest, radii)}


def _floor_bounds(layer: Layer, joined: SelfJoin, verified: Verified, log_z: float) -> dict[str, Any]:
    """How far an approximate layer's log Z_t and floor can be from the exact ones.

    Every s_i is at least the true one and log Z_t grows with each, so log_z is an upper
    bound; the sum over the verified (exact) s_i alone is a lower bound. The floor
    log Z + 1/Z is convex in log Z, least (1) at 0: its interval follows from log Z's.
    """
    lower = theory.log_partition(layer.patterns.n, joined.s[verified.exact] / 2)
    floors = [theory.cross_entropy_floor(value) for value in (lower, log_z)]
    least = theory.cross_entropy_floor(min(max(0.0, lower), log_z))
    return {"log_z": "upper bound: an approximate nearest-other distance s_i is never below the true one",
            "log_z_interval": [lower, log_z], "predicted_floor_interval": [least, max(floors)],
            "verified_exact": int(verified.exact.sum()), "corrected": verified.corrected,
            "largest": verified.largest, "largest_exact": verified.largest_exact, "rounds": verified.rounds}


def _radius_rules(n: int, s: np.ndarray, a2: dict[str, float], a3: dict[str, float]) -> dict[str, Any]:
    """log Z_t and the floor under both radius rules, each with its premises' shares: r_i = s_i / 2 (the balls
    never meet; A2 measured at the typical radius, median s_i / 2) and the paper's common radius r*."""
    log_z_star = math.log(len(s)) + float(theory.log_ball_integral(n, theory.unit_volume_radius(n)))
    return {"half_nearest": {"coverage": a2["coverage_at_typical"], "disjoint": 1.0},
            "r_star": {"log_z": log_z_star, "predicted_floor": theory.cross_entropy_floor(log_z_star),
                       "coverage": a2["coverage_at_r_star"], "disjoint": a3["disjoint_at_r_star"]}}


def _unit_scale(n: int, s: np.ndarray) -> dict[str, Any]:
    """log Z_t and the floor with every activation scaled by c* = 2 r* / median(s_i) (theory.unit_scale):
    unchanged when the activations are rescaled, which the raw ones are not."""
    scale = theory.unit_scale(s, n)
    if not math.isfinite(scale):
        return {"scale": None, "log_z": None, "predicted_floor": None}
    log_z = theory.log_partition(n, scale * s / 2)
    return {"scale": scale, "log_z": log_z, "predicted_floor": theory.cross_entropy_floor(log_z)}


def _floor_and_size(layer: Layer, joined: SelfJoin, verified: Verified | None, test_loss: float | None,
                    a2: dict[str, float], a3: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The partition function and the floor (r_i = s_i / 2), with their bounds in approximate layers
    (`_floor_bounds`; None in exact ones), both radius rules, the share of Z_t its largest 1% of
    terms carry, the floor at the unit scale, and the verdict on Proposition 4's premises; the size
    condition where the model is known."""
    n, s = layer.patterns.n, joined.s
    log_z = theory.log_partition(n, s / 2)
    rules = _radius_rules(n, s, a2, a3)
    top = theory.top_share(theory.log_ball_integral(n, s / 2))
    half = rules["half_nearest"]
    floor = {"log_z": log_z, "predicted_floor": theory.cross_entropy_floor(log_z), "measured_test_loss": test_loss,
             "verdict": analysis.floor_verdict(half["coverage"], half["disjoint"], top, "r_i = s_i / 2"),
             "top_1pct_share": top, "radius_rules": rules, "at_unit_scale": _unit_scale(n, s),
             "approximate": None if verified is None else _floor_bounds(layer, joined, verified, log_z)}
    manifest = layer.patterns.manifest
    parameters, chunk_tokens = manifest["model"]["num_parameters"], manifest["chunk_tokens"]
    if not (parameters and chunk_tokens):   # imported vectors: no model or chunk length
        return floor, None
    data_size, ratio = theory.size_ratio(parameters, chunk_tokens, layer.d)
    return floor, {"N": parameters, "D": data_size, "N_over_D2": ratio, "chunk_tokens": chunk_tokens}


def _summary(layer: Layer, patterns: PatternMeta, joined: SelfJoin, verified: Verified | None, radii: Radii,
             separation: Separation, mips: Mips | None, subsets: list[SubsetNearest], totals: QueryTotals,
             nearest: np.ndarray, query_blocks: int) -> dict[str, Any]:
    """The layer's summary.json entry (docs/formats.md)."""
    settings, index, s = layer.settings, layer.index, joined.s
    delta = separation.delta
    train_loss, test_loss = analysis.nan_mean(patterns.nll), totals.test_loss
    a2 = {"coverage_at_r_star": float(analysis.coverage(nearest, [radii.r_star])[0]),
          "coverage_at_typical": float(analysis.coverage(nearest, [radii.typical])[0]),
          "coverage_at_radius": float(analysis.coverage(nearest, [radii.radius])[0])}
    a3_disjoint = {"disjoint_at_radius": float(analysis.disjoint(s, radii.radius).mean()),
                   "disjoint_at_r_star": float(analysis.disjoint(s, radii.r_star).mean())}
    floor, size = _floor_and_size(layer, joined, verified, test_loss, a2, a3_disjoint)
    blocks = layer.blocks
    return {
        "site": layer.patterns.site, "layer": layer.layer, "n": layer.patterns.n, "d": layer.d, "d_prime": layer.nq, "k": settings.k,
        "search": f"approximate: {index.info['factory']} {index.info['search']}" if layer.approximate else "exact",
        "recall": (index.info["recall"] or index.recall(200, settings.k, settings.seed)) if layer.approximate else None,
        "query_nearest_dist": analysis.describe(nearest), "pattern_nearest_dist": analysis.describe(s),
        "r_star": radii.r_star, "typical_radius": radii.typical, "typical_over_r_star": radii.typical / radii.r_star,
        "radius": {"mode": settings.radius, "value": radii.radius},
        "A2": a2,
        "A3": {**a3_disjoint, "ramsauer_well_separated": float((delta >= separation.threshold).mean()),
               "ramsauer_threshold": separation.threshold, "max_norm": separation.max_norm,
               "ramsauer_delta": analysis.describe(delta), "inner_products": separation.search},
        "A1": {"retrieval_rate": totals.mean("retrieved"), "converged_rate": totals.mean("converged"),
               "epsilon": radii.epsilon, "next_token_agreement": totals.mean("next_match", over="next_known"),
               "train_loss": train_loss, "test_loss": test_loss,
               "loss_gap": None if train_loss is None or test_loss is None else test_loss - train_loss},
        "energy": {"beta": settings.beta, "mean_lower": totals.mean("lower"), "mean_upper": totals.mean("upper"),
                   "mean_mchn": totals.mean("mchn"), "mean_mchn_lower": totals.mean("mchn_lower"),
                   "mean_mchn_upper": totals.mean("mchn_upper"),
                   "mchn_top_k_recall": None if mips is None else mips.recall["samples"]["queries"]},
        "floor": floor,
        "size": size,
        "subsets": [{"fraction": subset.fraction, "patterns": len(subset.values), "from_lists": subset.from_lists,
                     "searched": len(subset.values) - subset.from_lists, "searched_recall": subset.recall}
                    for subset in subsets],
        "blocks": {"memory": settings.memory, "memory_bytes": blocks.memory_bytes,
                   "pattern_rows": blocks.pattern_rows, "query_rows": blocks.query_rows,
                   "join_rows": blocks.join_rows, "knn_rows": blocks.knn_rows, "query_blocks": query_blocks},
    }


def analyse_layer(index: KnnIndex, queries: store.ActivationDataset, layer: int, settings: QuerySettings,
                  sink: Sink, leave_one_out: bool = False, progress: Any = None,
                  patterns: store.ActivationDataset | None = None) -> dict[str, Any]:
    """One layer's pipeline: its rows go to `sink` (table name, columns), its summary is returned.

    `queries` and `patterns` (None: the index's dataset) are opened at the same site;
    `progress` (a tqdm bar) advances once per step of STEPS.
    """
    from tqdm.auto import tqdm

    progress = progress if progress is not None else tqdm(disable=True)
    started = time.perf_counter()
    context = _layer(index, queries, layer, settings, leave_one_out, patterns)
    with _step(progress, layer, "patterns"):
        patterns = _pattern_meta(context)
    with _step(progress, layer, "self-join"):
        joined, verified = _verify_largest(context, patterns, _self_join(context, patterns))
    radii = _radii(context, joined)
    with _step(progress, layer, "inner-product join"):
        mips = _mips(context, patterns)
        separation = _separation(context, patterns, mips)
    with _step(progress, layer, "subsets"):
        subsets = [_subset(context, patterns, joined, fraction) for fraction in settings.subsets if fraction < 1]
    totals, query_blocks = _stream_queries(context, patterns, radii, mips, sink, progress)
    nearest = np.concatenate(totals.nearest)
    sink("patterns", _pattern_rows(context, patterns, joined, radii, separation))
    samples = {"query_nearest": nearest}
    for fraction in settings.subsets:
        samples[f"pattern_nearest_{round(100 * fraction)}"] = next(
            (subset.values for subset in subsets if subset.fraction == fraction), joined.s)
    sink("histograms", _histogram_rows(context, samples))
    sink("coverage", _coverage_rows(context, nearest, radii.radius))
    summary = _summary(context, patterns, joined, verified, radii, separation, mips, subsets, totals, nearest,
                       query_blocks)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    log.info("layer %d: %d patterns, %d queries in %d blocks, typical radius %.3g vs r* %.3g (%.1f s)",
             layer, context.d, context.nq, query_blocks, radii.typical, radii.r_star, summary["seconds"])
    return summary


def queries_are_patterns(index: KnnIndex, queries_dir: str | Path, split: str) -> bool:
    """Whether the queries are the indexed patterns themselves: the same dataset (manifest sha256) and split."""
    built = index.info["dataset"]
    return split == built["split"] and manifest_sha256(Path(queries_dir)) == built["manifest_sha256"]


def run(index_dir: str | Path, queries_dir: str | Path, out_dir: str | Path,
        settings: QuerySettings = QuerySettings(), engine: knn_engine.Engine | None = None,
        overwrite: bool = False, allow_other_files: bool = False) -> dict[str, Any]:
    """Analyse every layer shared by the index's dataset and the queries; returns summary.json.

    Layers are those of the index's site, and with `settings.sites` those of other sites too
    (searched exactly: the index holds one site and layer); every table gets a `site` column.
    The job holds `out_dir` (one job at a time) and claims it by the folder model's rules
    (memscan.folders.claim): the same query finds its finished run and returns it, another
    needs `overwrite`, files memscan did not write need `allow_other_files` and stay untouched.
    `engine` (default: this process) holds the index's shards
    and runs the exact searches; with `ray_runner.RayEngine` the shards sit in Ray actors and
    the exact searches run as Ray tasks; the tables are the same.
    """
    from tqdm.auto import tqdm

    settings.check()
    out_dir = Path(out_dir)
    with files.job_folder(out_dir):
        index = KnnIndex.load(index_dir, device=settings.device, engine=engine)
        queries = index.open_queries(queries_dir)
        index.check_queries(queries)
        identity = folders.job_fingerprint(settings=asdict(settings), index=index.info[files.SELF_SHA256],
                                           queries=manifest_sha256(Path(queries_dir)))
        claimed = folders.claim(out_dir, folders.QUERY_RUN, TABLE_FILES, identity, overwrite=overwrite,
                                allow_other_files=allow_other_files)
        if claimed.done:
            log.info("%s already holds this query's finished run", out_dir)
            return claimed.previous
        leave_one_out = queries_are_patterns(index, queries_dir, settings.split)
        if leave_one_out:
            log.info("the queries are the indexed patterns (split '%s'): each leaves its own row out", settings.split)
        pairs = _site_pairs(index, queries, queries_dir, settings.sites)
        with _table_writers(out_dir) as writers:
            steps = sum(len(layers) for _, _, layers in pairs) * len(STEPS)
            with tqdm(total=steps, desc="query", unit="step", disable=None) as progress:
                summaries = [analyse_layer(index, site_queries, layer, settings, _site_sink(writers, patterns.site),
                                           leave_one_out, progress, patterns)
                             for patterns, site_queries, layers in pairs for layer in layers]
            header = {"fingerprint": identity, "index": str(Path(index_dir).resolve()),
                      "queries": str(Path(queries_dir).resolve()), "settings": asdict(settings),
                      "queries_are_patterns": leave_one_out, "site": index.dataset.site,
                      "index_info": {key: index.info[key] for key in ("factory", "metric", "n", "ntotal", "search",
                                                                       files.SELF_SHA256)}}
            return _commit(out_dir, writers, header, summaries, claimed.previous)


def _site_pairs(index: KnnIndex, queries: store.ActivationDataset, queries_dir: str | Path, sites: str | None,
                ) -> list[tuple[store.ActivationDataset, store.ActivationDataset, list[int]]]:
    """(patterns, queries, shared layers) per site to analyse: the index's own, then --sites (`all`: every site
    both datasets hold), in the patterns dataset's order."""
    own = index.dataset.site
    stored = index.dataset.sites
    wanted = [own] if sites is None else stored if sites == "all" else [name.strip() for name in sites.split(",")]
    unknown = [name for name in wanted if name not in stored]
    if unknown:
        raise InputError(f"--sites: '{unknown[0]}' is not in the index's dataset (sites: {', '.join(stored)})")
    chosen = [name for name in stored if name in wanted or name == own]
    if sites == "all":
        chosen = [name for name in chosen if name in queries.sites]
    pairs = []
    for name in chosen:
        patterns = index.dataset if name == own else store.ActivationDataset(index.dataset.directory, name)
        site_queries = queries if name == own else store.ActivationDataset(queries_dir, name)
        pairs.append((patterns, site_queries, [layer for layer in patterns.layers if layer in site_queries.layers]))
    return pairs


def _site_sink(writers: dict[str, store.TableWriter], site: str) -> Sink:
    """A sink that writes one site's rows, each table with its `site` column."""
    def sink(name: str, rows: dict[str, np.ndarray]) -> None:
        count = len(next(iter(rows.values())))
        writers[name].write({"site": np.full(count, site, dtype=object), **rows})
    return sink


@contextlib.contextmanager
def _table_writers(out_dir: Path) -> Iterator[dict[str, store.TableWriter]]:
    """One streaming writer per table, under its temporary name; a job that fails removes them all
    (a run already in the folder stays whole: its tables are replaced only at the commit)."""
    writers = {name: store.TableWriter(out_dir / path) for name, path in zip(TABLES, TABLE_FILES)}
    try:
        yield writers
    except BaseException:
        for writer in writers.values():
            with contextlib.suppress(OSError):
                writer.discard()
        raise


def _commit(out_dir: Path, writers: dict[str, store.TableWriter], header: dict[str, Any],
            summaries: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The tables renamed into place, then the signed summary listing them; a pending record replaces the old
    summary first, so a run killed (or out of disk) while committing leaves no summary vouching for a mix of
    old and new tables, and a rerun resumes."""
    pending = folders.begin(out_dir, folders.QUERY_RUN, header["fingerprint"], TABLE_FILES, previous)
    entries = [writers[name].commit() for name in TABLES]
    body = analysis.finite_or_none({**header, "tables": entries, "layers": summaries})
    return folders.write_record(out_dir, folders.QUERY_RUN, body, pending)


# ---------------------------------------------------------------- reading a run folder


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json, refused in one line unless it is a signed record of this format of sound shape."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY
    if not path.exists():
        if any((run_dir / name).exists() or files.tmp_path(run_dir / name).exists() for name in TABLE_FILES):
            raise DataError(f"'{run_dir}' holds an incomplete run (no {SUMMARY} vouches for its tables): "
                            "rerun `memscan query`")
        raise DataError(f"'{run_dir}' is not a memscan run folder: it has no {SUMMARY} (run `memscan query`)")
    summary = folders.read_record(run_dir, folders.QUERY_RUN)
    _check_shape(summary, path)
    return summary


def _check_shape(summary: dict[str, Any], path: Path) -> None:
    """Every field that loading and the report use, of its type (the signature says memscan wrote it)."""
    fields = {"index": str, "queries": str, "settings": dict, "queries_are_patterns": bool, "tables": list,
              "layers": list}
    for key, kinds in fields.items():
        files.require(summary, key, kinds, path)
    for key, kinds in {"split": str, "k": int, "beta": (int, float)}.items():
        files.require(summary["settings"], key, kinds, path)
    for entry in summary["tables"]:
        if not isinstance(entry, dict):
            raise DataError(f"{path}: a table entry must be an object; got {entry!r:.60}")
        files.plain_name(files.require(entry, "name", str, path), path)
        files.require(entry, "bytes", int, path)
        files.require(entry, "sha256", str, path)
    if sorted(entry["name"] for entry in summary["tables"]) != sorted(TABLE_FILES):
        raise DataError(f"{path} lists the tables {[e['name'] for e in summary['tables']]}; "
                        f"a run has {list(TABLE_FILES)}")
    if not summary["layers"]:
        raise DataError(f"{path} lists no layers")
    for layer in summary["layers"]:
        if not isinstance(layer, dict):
            raise DataError(f"{path}: a layer's summary must be an object; got {layer!r:.60}")
        for key, kinds in {"layer": int, "r_star": (int, float), "typical_radius": (int, float)}.items():
            files.require(layer, key, kinds, path)


def verify(run_dir: str | Path) -> list[str]:
    """Every problem found in a run folder: its summary, and each table's size and sha256."""
    try:
        summary = read_summary(run_dir)
    except DataError as exc:
        return [str(exc)]
    problems = [files.file_problem(Path(run_dir), entry, "table") for entry in summary["tables"]]
    return [problem for problem in problems if problem]


@dataclass
class RunTables:
    """A run folder's tables as pandas DataFrames, and its summary."""

    summary: dict[str, Any]
    neighbours: Any
    queries: Any
    patterns: Any
    histograms: Any
    coverage: Any

    kind = folders.QUERY_RUN.name

    @property
    def record(self) -> dict[str, Any]:
        return self.summary

    @property
    def tables(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TABLES}

    def at_site(self, site: str) -> RunTables:
        """The tables' rows of one site (a run from before sites has no site column: all of them)."""
        def rows(table: Any) -> Any:
            return table[table.site == site] if "site" in table else table
        return RunTables(self.summary, *(rows(getattr(self, name)) for name in TABLES))


def load(run_dir: str | Path) -> RunTables:
    """Open a `memscan query` run folder for analysis in pandas, every table checked against its summary entry."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    paths = {entry["name"]: files.check_file(run_dir, entry, "table") for entry in summary["tables"]}
    return RunTables(summary, *(store.read_table(paths[name]).to_pandas() for name in TABLE_FILES))
