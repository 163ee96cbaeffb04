"""A1 and the energies, over the query split streamed in blocks: each block searched, its energies and
retrieval computed, its rows appended to the neighbours and queries tables, its totals kept for the summary."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from memscan import analysis, theory
from memscan.knn import exact
from memscan.query.context import Layer, refuse_missing, step
from memscan.query.distances import PatternMeta, Radii
from memscan.query.folder import Sink
from memscan.query.separation import Mips
from memscan.query.summary import Energy, Retrieved

log = logging.getLogger(__name__)


def _search_block(layer: Layer, ids: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block's k nearest patterns (D (b, k), I (b, k)): through the index or exactly, as the self-join."""
    k, own = layer.settings.k, ids if layer.leave_one_out else None
    if layer.use_index:
        D, I = layer.index.search(X, k, own)
    else:
        _, D, I = layer.engine.knn(iter([(ids, X)]), layer.pattern_blocks, k, exclude_self=layer.leave_one_out)
    refuse_missing(I, k)
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
        refuse_missing(found.ids, k)
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


def retrieval(layer: Layer, radii: Radii, X: np.ndarray, I: np.ndarray) -> Retrieval:
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
        """One block's queries added to the sums."""
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
        """The queries' mean loss (None where none was computed)."""
        return self.loss_sum / self.loss_count if self.loss_count else None

    def retrieved(self, epsilon: float, train_loss: float | None) -> Retrieved:
        """The summary's A1: retrieval and convergence rates, next-token agreement and the loss gap."""
        test_loss = self.test_loss
        return Retrieved(retrieval_rate=self.mean("retrieved"), converged_rate=self.mean("converged"),
                         epsilon=epsilon, next_token_agreement=self.mean("next_match", over="next_known"),
                         train_loss=train_loss, test_loss=test_loss,
                         loss_gap=None if train_loss is None or test_loss is None else test_loss - train_loss)

    def energy(self, beta: float, mips: Mips | None) -> Energy:
        """The summary's mean energies, with the MCHN top k's recall where an inner-product index found it."""
        return Energy(beta=beta, mean_lower=self.mean("lower"), mean_upper=self.mean("upper"),
                      mean_mchn=self.mean("mchn"), mean_mchn_lower=self.mean("mchn_lower"),
                      mean_mchn_upper=self.mean("mchn_upper"),
                      mchn_top_k_recall=None if mips is None else mips.recall["samples"]["queries"])


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


def _query_block(layer: Layer, patterns: PatternMeta, radii: Radii, mips: Mips | None, sink: Sink, progress: Any,
                 totals: QueryTotals, X: np.ndarray, meta: dict[str, np.ndarray]) -> None:
    """One block of queries searched, scored, written to `sink` and added to `totals`."""
    settings = layer.settings
    last = totals.count + len(X) == layer.nq
    exact.check_scale(X, f"the queries (split '{settings.split}' at layer {layer.layer})")
    ids = meta["row_id"]
    with step(progress, layer.layer, "searches", last):
        D, I = _search_block(layer, ids, X)
    with step(progress, layer.layer, "energies", last):
        energies = _energies(layer, mips, float(patterns.sq_norm.max()), X, D)
    with step(progress, layer.layer, "retrieval", last):
        found = retrieval(layer, radii, X, I)
    nearest_next = patterns.next_token_id[np.searchsorted(patterns.row_id, I[:, 0])]
    next_match = (meta["next_token_id"] >= 0) & (nearest_next == meta["next_token_id"])
    for name, rows in _query_rows(layer, ids, D, I, energies, found, next_match, meta["nll"], radii.radius).items():
        sink(name, rows)
    totals.add(np.sqrt(D[:, 0]), energies, found, meta["next_token_id"], next_match, meta["nll"])


def stream_queries(layer: Layer, patterns: PatternMeta, radii: Radii, mips: Mips | None, sink: Sink,
                   progress: Any) -> tuple[QueryTotals, int]:
    """Every query block searched, scored and written: (the totals, the number of blocks)."""
    totals, blocks = QueryTotals(), 0
    batches = layer.queries.iter_batches(split=layer.settings.split, layer=layer.layer,
                                         columns=("row_id", "next_token_id", "nll"),
                                         batch_rows=layer.blocks.query_rows)
    with tqdm(total=layer.nq, desc="queries", unit="vec", unit_scale=True, disable=None, leave=False) as bar:
        for X, meta in batches:
            started = time.perf_counter()
            _query_block(layer, patterns, radii, mips, sink, progress, totals, X, meta)
            blocks += 1
            bar.update(len(X))
            log.debug("layer %d: query block %d, %d queries, %.2f s", layer.layer, blocks, len(X),
                      time.perf_counter() - started)
    return totals, blocks
