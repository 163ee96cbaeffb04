"""One layer of a query run: its sizes, its search mode and what every step reads (`Layer`), and the progress
bar's steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import memscan.store as store
from memscan.errors import InputError
from memscan.knn import exact
from memscan.knn.index import KnnIndex, dataset_blocks
from memscan.knn.mips import choose_factory
from memscan.knn.shards import Engine
from memscan.query.settings import Blocks, QuerySettings, block_sizes, memory_bytes, mips_budget

STEPS = ("patterns", "self-join", "inner-product join", "subsets", "searches", "energies", "retrieval")


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
        """The split the index was built over: the patterns at every site."""
        return self.index.split

    @property
    def engine(self) -> Engine:
        """Where the exact searches run: the index's engine."""
        return self.index.engine

    @property
    def own(self) -> bool:
        """Whether this is the index's own site and layer (the index holds these patterns)."""
        return holds(self.index, self.patterns, self.layer)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Patterns' vectors (m, n) float32 by row id: from the index where it holds this site and layer (an O(m)
        lookup when its codes are exact), else read from the dataset."""
        return self.index.vectors(rows) if self.own else self.patterns.take(rows)

    @property
    def pattern_blocks(self) -> Callable[[], Iterator[exact.Block]]:
        """The patterns of this layer as a re-startable iterator of (row ids, X) blocks of `pattern_rows`: from
        the index where it holds them (`KnnIndex.pattern_blocks`), else from the dataset."""
        if self.own:
            return self.index.pattern_blocks(self.blocks.pattern_rows)
        return dataset_blocks(self.patterns, self.pattern_split, self.layer, self.blocks.pattern_rows)


def holds(index: KnnIndex, patterns: store.ActivationDataset, layer: int) -> bool:
    """Whether `index` holds the patterns of this site and layer."""
    return patterns.site == index.site and layer == index.layer


def torch_device(device: str) -> str:
    """cuda where torch sees a GPU and --device is not cpu; else cpu."""
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def open_layer(index: KnnIndex, queries: store.ActivationDataset, layer: int, settings: QuerySettings,
               leave_one_out: bool, patterns: store.ActivationDataset | None = None) -> Layer:
    """The layer's sizes and search mode, after refusing a --k or a query split it cannot serve.

    `patterns`: the index's dataset at the queries' site (None: the index's own site)."""
    patterns = patterns or index.dataset
    d = patterns.count(index.split, layer)
    if not settings.k <= d - 1:
        raise InputError(f"--k must be at most the {d - 1:,} patterns other than the query itself; got {settings.k:,}")
    nq = queries.count(settings.split, layer)
    if not nq:
        raise InputError(f"split '{settings.split}' of '{queries.directory}' has no rows at layer {layer}")
    use_index = holds(index, patterns, layer) and not settings.exact
    approximate = use_index and not index.exact
    budget = memory_bytes(settings.memory)
    # a Flat inner-product index scans every pattern: an exact join costs as much and is exact
    exact_products = not approximate or choose_factory(d, patterns.n, mips_budget(budget))[0] == "Flat"
    blocks = block_sizes(budget, patterns.n, settings.k, d, full_pass=exact_products,
                         candidates=index.candidates(settings.k, exclude_self=True) if use_index else None)
    return Layer(index, queries, patterns, layer, settings, leave_one_out, d, nq, use_index, approximate, exact_products,
                 blocks, torch_device(settings.device))


@contextlib.contextmanager
def step(progress: Any, layer: int, name: str, done: bool = True) -> Iterator[None]:
    """One step of STEPS on the progress bar: named while it runs, counted when `done`
    (a step repeated per query block counts once, with the last block)."""
    progress.set_postfix_str(f"layer {layer}: {name}")
    yield
    if done:
        progress.update()


def refuse_missing(found: np.ndarray, k: int) -> None:
    """Refuses neighbour lists (m, k) holding -1: an approximate index that found fewer than k."""
    missing = int((found < 0).any(axis=1).sum())
    if missing:
        raise InputError(f"the approximate index found fewer than k={k} neighbours for {missing:,} vectors; "
                         "raise the index's nprobe / efSearch, lower --k, or pass --exact")
