"""The assumption tests and summary statistics over kNN results: arrays and blocks in, arrays out.

A1 (memorization): retrieval to the nearest pattern and next-token agreement.
A2 (coverage): held-out activations inside a pattern's ball of a given radius.
A3 (well-separated): balls of radius r disjoint (s_i > 2 r), and Ramsauer's separation test.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.special import logsumexp


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def describe(values: np.ndarray) -> dict[str, float]:
    """Mean, median and the 5/25/75/95% quantiles of finite values."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"count": 0}
    q = np.quantile(values, QUANTILES)
    return {"count": int(len(values)), "mean": float(values.mean()), "median": float(q[2]),
            "q05": float(q[0]), "q25": float(q[1]), "q75": float(q[3]), "q95": float(q[4])}


def coverage(nearest_dist: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """A2: the fraction of queries whose nearest pattern lies within each radius (len(radii),); NaN without
    queries (a rate over nothing is undefined, not 0)."""
    ordered, radii = np.sort(np.asarray(nearest_dist, np.float64)), np.asarray(radii, np.float64)
    if not len(ordered):
        return np.full(len(radii), np.nan)
    return np.searchsorted(ordered, radii, side="right") / len(ordered)


def disjoint(nearest_other_dist: np.ndarray, radius: float) -> np.ndarray:
    """A3 per pattern: its ball of `radius` meets no other pattern's ball of the same radius (s_i > 2 r)."""
    return np.asarray(nearest_other_dist) > 2 * radius


# Proposition 4's premises, as memscan judges them (docs/theory.md, "When the floor applies"): the
# proposition assumes every held-out activation in a ball (A2) and the balls disjoint (A3); memscan asks
# for 90% of each, and for Z_t not to be carried by a few outlying patterns.
FLOOR_COVERAGE = 0.9    # A2: least share of held-out activations inside a ball at the floor's radius rule
FLOOR_DISJOINT = 0.9    # A3: least share of patterns whose ball meets no other at that rule
FLOOR_TOP_SHARE = 0.5   # most of Z_t the largest 1% of the patterns' terms may carry


def floor_verdict(coverage_share: float, disjoint_share: float, top_share: float, rule: str) -> dict[str, Any]:
    """Whether Proposition 4's floor applies at a layer, and each premise that fails with its number and
    threshold: {applicable, reasons}. An undefined share (no queries) fails its premise."""
    reasons = []
    if not coverage_share >= FLOOR_COVERAGE:
        reasons.append(f"A2 fails: {_share(coverage_share)} of held-out activations lie in a ball at {rule} "
                       f"(needs {FLOOR_COVERAGE:.0%})")
    if not disjoint_share >= FLOOR_DISJOINT:
        reasons.append(f"A3 fails: {_share(disjoint_share)} of the balls at {rule} meet no other "
                       f"(needs {FLOOR_DISJOINT:.0%})")
    if not top_share <= FLOOR_TOP_SHARE:
        reasons.append(f"the largest 1% of the patterns carry {_share(top_share)} of Z_t "
                       f"(at most {FLOOR_TOP_SHARE:.0%}: a few outliers set the floor)")
    return {"applicable": not reasons, "reasons": reasons}


def _share(value: float) -> str:
    return "an undefined share" if not math.isfinite(value) else f"{value:.1%}"


def histogram(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Counts of finite values per bin (len(bins) - 1,)."""
    values = np.asarray(values, np.float64)
    return np.histogram(values[np.isfinite(values)], bins=bins)[0]


def shared_bins(*samples: np.ndarray, count: int = 50) -> np.ndarray:
    """Equal-width bins covering every sample, so histograms of several sets line up."""
    finite = np.concatenate([np.asarray(s, np.float64)[np.isfinite(s)] for s in samples])
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return np.linspace(low, high if high > low else low + 1.0, count + 1)


class MCHNPartial(NamedTuple):
    """One pattern block's share of Ramsauer's energy of queries X (nq, n); see `mchn_combine`."""

    lse: np.ndarray          # log-sum-exp of beta rho.x over the block (nq,)
    count: int               # patterns in the block
    max_sq_norm: float       # max ||rho||^2 over the block
    top_ip: np.ndarray       # the block's largest inner products rho.x (nq, min(k, count)), descending


class MCHN(NamedTuple):
    """Ramsauer's energy over all patterns (nq,) and the k largest inner products rho.x (nq, k), descending."""

    energy: np.ndarray
    top_ip: np.ndarray


def mchn_partial(block: tuple[np.ndarray, np.ndarray], X: np.ndarray, beta: float, k: int) -> MCHNPartial:
    """One pattern block's share of Ramsauer's energy of queries X (nq, n) and its k largest inner products."""
    P = np.asarray(block[1], np.float64)
    ip = np.asarray(X, np.float64) @ P.T                                          # (nq, m)
    kept = min(k, len(P))
    top = -np.sort(np.partition(-ip, kept - 1, axis=1)[:, :kept], axis=1)         # (nq, kept), descending
    return MCHNPartial(logsumexp(beta * ip, axis=1), len(P), float((P * P).sum(1).max()), top)


def mchn_combine(X: np.ndarray, partials: Iterable[MCHNPartial], beta: float, k: int) -> MCHN:
    """Ramsauer's energy of queries X (nq, n) over all patterns, and their k largest inner products, from
    every block's `mchn_partial`.

    The log-sum-exps, the count d, M = max ||rho|| and the top k combine across blocks, so
    patterns never need to fit in memory and blocks can be computed anywhere (Ray tasks).
    The top k are exact float64 products, for `theory.mchn_energy_interval`.
    """
    X = np.asarray(X, np.float64)
    lse, count, max_sq_norm = np.full(len(X), -np.inf), 0, 0.0
    top = np.empty((len(X), 0))
    for part in partials:
        lse, count, max_sq_norm = np.logaddexp(lse, part.lse), count + part.count, max(max_sq_norm, part.max_sq_norm)
        top = -np.sort(-np.hstack([top, part.top_ip]), axis=1)[:, :k]
    energy = -lse / beta + 0.5 * (X * X).sum(1) + math.log(count) / beta + 0.5 * max_sq_norm
    return MCHN(energy, top)


@contextlib.contextmanager
def _one_thread_on_cpu(torch: Any, device: str) -> Iterator[None]:
    """torch on one CPU thread for the block, then as before. The retrieval is hundreds of small
    element-wise steps: with the CPU shared (FAISS's OpenMP threads, other jobs) every parallel
    region waits for a time slice, and one thread measured 4-12x faster than two on 2 cores."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def retrieve_batch(X: np.ndarray, neighbours: np.ndarray, beta: float, tol: float, max_steps: int,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`theory.retrieve` for a block of queries at once, in float64 torch on `device` (cpu or cuda).

    X (b, n), neighbours (b, k, n) nearest first. Every row iterates the same update as
    theory.retrieve until its own step moves less than `tol`, then stops (a per-row mask);
    rows still moving are compacted once fewer than half of those computed remain.
    Returns (fixed points (b, n) float64, steps (b,) int32, converged (b,) bool).
    """
    with _one_thread_on_cpu(torch, device):
        P = torch.as_tensor(np.array(neighbours, np.float64), device=device)        # (b, k, n)
        xi = torch.as_tensor(np.array(X, np.float64), device=device)                # (b, n)
        fixed = xi.clone()
        steps = torch.full((len(xi),), max_steps, dtype=torch.int32, device=device)
        converged = torch.zeros(len(xi), dtype=torch.bool, device=device)
        rows = torch.arange(len(xi), device=device)        # the original row of each row computed
        moving = torch.ones(len(xi), dtype=torch.bool, device=device)
        for step in range(1, max_steps + 1):
            if 2 * int(moving.sum()) < len(rows):           # compact: stop computing rows that are done
                P, xi, rows, moving = P[moving], xi[moving], rows[moving], moving[moving]
            if not len(rows):
                break
            logits = -beta * ((P - xi[:, None, :]) ** 2).sum(-1)                            # (b', k)
            weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            new = torch.bmm(weights[:, None, :], P)[:, 0] / weights.sum(dim=1, keepdim=True)  # (b', n)
            moved = torch.linalg.vector_norm(new - xi, dim=1)
            xi = torch.where(moving[:, None], new, xi)
            done = moving & (moved < tol)
            steps[rows[done]] = step
            converged[rows[done]] = True
            fixed[rows[done]] = xi[done]
            moving = moving & ~done
        fixed[rows] = xi   # the rows still computed: done ones hold their fixed point, the rest their last step
        return fixed.cpu().numpy(), steps.cpu().numpy(), converged.cpu().numpy()


def retrieval(X: np.ndarray, neighbours: np.ndarray, beta: float, epsilon: float, tol: float,
              max_steps: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A1: iterate the retrieval update of each query over its k nearest patterns (`retrieve_batch`).

    X (nq, n), neighbours (nq, k, n) nearest first. Returns converged (nq,) bool, steps
    (nq,) int32, retrieved (nq,) bool: converged within epsilon of its nearest pattern.
    """
    fixed, steps, converged = retrieve_batch(X, neighbours, beta, tol, max_steps, device)
    nearest = np.asarray(neighbours[:, 0], np.float64)
    retrieved = converged & (np.linalg.norm(fixed - nearest, axis=1) <= epsilon)
    return converged, steps, retrieved


def nan_mean(values: np.ndarray) -> float | None:
    """Mean of the finite values, None when there are none (a loss that was not computed)."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def finite_or_none(value: Any) -> Any:
    """A JSON document with every non-finite number (a statistic undefined for this data, such as the
    floor when every pattern has a duplicate) replaced by None, and numpy scalars by Python ones."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
