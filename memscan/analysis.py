"""The assumption tests and summary statistics over kNN results: arrays and blocks in, arrays out.

A1 (memorization): retrieval to the nearest pattern and next-token agreement.
A2 (coverage): held-out activations inside a pattern's ball of a given radius.
A3 (well-separated): balls of radius r disjoint (s_i > 2 r), and Ramsauer's separation test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.special import logsumexp

from memscan import theory

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
    """A2: the fraction of queries whose nearest pattern lies within each radius (len(radii),)."""
    ordered = np.sort(np.asarray(nearest_dist, np.float64))
    return np.searchsorted(ordered, np.asarray(radii, np.float64), side="right") / max(len(ordered), 1)


def disjoint(nearest_other_dist: np.ndarray, radius: float) -> np.ndarray:
    """A3 per pattern: its ball of `radius` meets no other pattern's ball of the same radius (s_i > 2 r)."""
    return np.asarray(nearest_other_dist) > 2 * radius


def histogram(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Counts of finite values per bin (len(bins) - 1,)."""
    values = np.asarray(values, np.float64)
    return np.histogram(values[np.isfinite(values)], bins=bins)[0]


def shared_bins(*samples: np.ndarray, count: int = 50) -> np.ndarray:
    """Equal-width bins covering every sample, so histograms of several sets line up."""
    finite = np.concatenate([np.asarray(s, np.float64)[np.isfinite(s)] for s in samples])
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return np.linspace(low, high if high > low else low + 1.0, count + 1)


MCHNPartial = tuple[np.ndarray, int, float]  # (log-sum-exp of beta rho.x (nq,), patterns, max ||rho||^2)


def mchn_partial(block: tuple[np.ndarray, np.ndarray], X: np.ndarray, beta: float) -> MCHNPartial:
    """One pattern block's share of Ramsauer's energy of queries X (nq, n); see `mchn_combine`."""
    P = np.asarray(block[1], np.float64)
    return logsumexp(beta * np.asarray(X, np.float64) @ P.T, axis=1), len(P), float((P * P).sum(1).max())


def mchn_combine(X: np.ndarray, partials: Iterable[MCHNPartial], beta: float) -> np.ndarray:
    """Ramsauer's energy of queries X (nq, n) over all patterns, from every block's `mchn_partial`: (nq,).

    The log-sum-exps, the count d and M = max ||rho|| combine across blocks, so patterns
    never need to fit in memory and blocks can be computed anywhere (Ray tasks).
    """
    X = np.asarray(X, np.float64)
    lse, count, max_sq_norm = np.full(len(X), -np.inf), 0, 0.0
    for block_lse, block_count, block_max in partials:
        lse, count, max_sq_norm = np.logaddexp(lse, block_lse), count + block_count, max(max_sq_norm, block_max)
    return -lse / beta + 0.5 * (X * X).sum(1) + math.log(count) / beta + 0.5 * max_sq_norm


def retrieval(X: np.ndarray, neighbours: np.ndarray, beta: float, epsilon: float, tol: float,
              max_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A1: iterate the retrieval update of each query over its k nearest patterns.

    X (nq, n), neighbours (nq, k, n) nearest first. Returns converged (nq,) bool, steps
    (nq,) int, retrieved (nq,) bool: converged within epsilon of its nearest pattern.
    """
    converged = np.zeros(len(X), bool)
    steps = np.zeros(len(X), np.int32)
    retrieved = np.zeros(len(X), bool)
    for i, (x, patterns) in enumerate(zip(X, neighbours)):
        fixed, steps[i], converged[i] = theory.retrieve(x, patterns, beta, tol, max_steps)
        retrieved[i] = converged[i] and np.linalg.norm(fixed - patterns[0]) <= epsilon
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
