"""The formulas of docs/theory.md as plain, vectorized functions: arrays in, arrays out, no I/O.

Vocabulary: patterns P (d, n), queries X (nq, n), squared distances `sq` (nq, d) or the
k smallest per query (nq, k) sorted ascending. Everything is computed in float64 and in
logs where a quantity under- or overflows (ball volumes, partition functions).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammainc, gammaln, logsumexp


def sq_distances(X: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (nq, d) in float64, from the differences (no cancellation)."""
    X, P = np.asarray(X, np.float64), np.asarray(P, np.float64)
    return ((X[:, None, :] - P[None, :, :]) ** 2).sum(-1)


def nearest_sq(sq: np.ndarray) -> np.ndarray:
    """Eq. 3, the nearest-neighbour function g(x) = min_i sq(x, rho_i): (nq,)."""
    return np.min(sq, axis=-1)


def energy(sq: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Eq. 4, the proposed energy E(x) = -LSE_i(-beta sq(x, rho_i)) / beta over all d patterns: (nq,)."""
    return -logsumexp(-beta * np.asarray(sq, np.float64), axis=-1) / beta


def mchn_energy(X: np.ndarray, P: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Ramsauer et al.'s energy -(1/beta) LSE(beta P x) + x.x/2 + (1/beta) log d + M^2/2: (nq,)."""
    X, P = np.asarray(X, np.float64), np.asarray(P, np.float64)
    M2 = np.max((P * P).sum(1))
    return (-logsumexp(beta * X @ P.T, axis=-1) / beta + 0.5 * (X * X).sum(1)
            + math.log(len(P)) / beta + 0.5 * M2)


def norm_spread(P: np.ndarray) -> float:
    """Delta = max_i ||rho_i||^2 - min_i ||rho_i||^2, the slack of Propositions 2 and 3."""
    norms = (np.asarray(P, np.float64) ** 2).sum(1)
    return float(norms.max() - norms.min())


def proposition1_bounds(g: np.ndarray, d: int, beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Proposition 1: g - log(d)/beta <= E <= g (the paper's beta = 1)."""
    return g - math.log(d) / beta, g


def proposition2_gap(E_beta1: np.ndarray, E_mchn_beta2: np.ndarray, d: int) -> np.ndarray:
    """Proposition 2: |E - (2 E_mchn - log d)|, which is at most Delta (E at beta 1, E_mchn at beta 2)."""
    return np.abs(E_beta1 - (2 * E_mchn_beta2 - math.log(d)))


def proposition3_bounds(d: int, delta: float) -> tuple[float, float]:
    """Corrected Proposition 3: -(Delta + log d) <= g - 2 E_mchn(beta 2) <= 0 (the printed lower bound is false)."""
    return -(delta + math.log(d)), 0.0


def lse_interval(top: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Certified interval for LSE over d values from the k largest (nq, k), in descending order.

    log S_k <= LSE <= log(S_k + (d - k) exp(v_k)), S_k = sum_{i<=k} exp(v_i): each of the d - k
    values left out is at most the k-th largest. Equal ends when k = d. Returns (low, high) (nq,).
    """
    top = np.asarray(top, np.float64)
    k = top.shape[-1]
    low = logsumexp(top, axis=-1)
    if d == k:
        return low, low
    return low, np.logaddexp(low, math.log(d - k) + top[..., -1])


def energy_interval(sq_topk: np.ndarray, d: int, beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Certified interval for E from the k smallest squared distances (nq, k), ascending.

    E_upper = -log(S_k)/beta and E_lower = -log(S_k + (d - k) exp(-beta sq_k))/beta, with
    S_k = sum_{i<=k} exp(-beta sq_i): the true E (over all d patterns) lies in between.
    """
    low, high = lse_interval(-beta * np.asarray(sq_topk, np.float64), d)
    return -high / beta, -low / beta


def mchn_energy_interval(ip_topk: np.ndarray, x_sq_norm: np.ndarray, d: int, max_sq_norm: float,
                         beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Certified interval for Ramsauer's energy from the k largest inner products rho_i . x (nq, k), descending.

    E_mchn = -(1/beta) LSE_i(beta rho_i . x) + x.x/2 + (1/beta) log d + M^2/2 (docs/theory.md), with the
    LSE bounded as in `lse_interval`: the d - k patterns left out each contribute at most
    exp(beta ip_k). x_sq_norm (nq,) is x.x and max_sq_norm is M^2 over all d patterns.
    """
    low, high = lse_interval(beta * np.asarray(ip_topk, np.float64), d)
    rest = 0.5 * np.asarray(x_sq_norm, np.float64) + math.log(d) / beta + 0.5 * max_sq_norm
    return rest - high / beta, rest - low / beta


def global_energy(layer_energies: np.ndarray) -> np.ndarray:
    """Eqs. 7-8, E_global = -LSE_t(-E_t) over per-layer energies (l, nq) or (nq, l) on axis 0: (nq,)."""
    return -logsumexp(-np.asarray(layer_energies, np.float64), axis=0)


def log_ball_volume(n: int, r: np.ndarray | float) -> np.ndarray:
    """log V_n(r) = (n/2) log pi + n log r - lgamma(n/2 + 1); V_n itself over/underflows for large n."""
    return 0.5 * n * math.log(math.pi) + n * np.log(r) - gammaln(0.5 * n + 1)


def unit_volume_radius(n: int) -> float:
    """r* = sqrt(n / (2 pi e)), docs/theory.md's radius of the unit-volume ball (7.74 at n = 1024)."""
    return math.sqrt(n / (2 * math.pi * math.e))


def log_lower_gamma_regularized(a: float, x: np.ndarray | float) -> np.ndarray:
    """log P(a, x), finite where P itself underflows float64 (x far below a, as for radii below r*).

    Where gammainc underflows, P = x^a e^-x / Gamma(a + 1) * sum_j x^j / ((a+1)...(a+j)),
    a series whose terms shrink geometrically there since x < a.
    """
    shape = np.shape(x)
    x = np.atleast_1d(np.asarray(x, np.float64))
    with np.errstate(divide="ignore"):
        out = np.log(gammainc(a, x))
    small = ~np.isfinite(out) & (x > 0)
    if small.any():
        xs = x[small]
        term, total = np.ones_like(xs), np.ones_like(xs)
        for j in range(1, 100_000):
            term *= xs / (a + j)
            total += term
            if (term < 1e-17 * total).all():
                break
        out[small] = a * np.log(xs) - xs - gammaln(a + 1) + np.log(total)
    return out.reshape(shape)


def log_ball_integral(n: int, r: np.ndarray | float) -> np.ndarray:
    """Eq. 12 corrected: log of the integral over B(rho, r) of exp(-||x - rho||^2) dx = pi^(n/2) P(n/2, r^2)."""
    return 0.5 * n * math.log(math.pi) + log_lower_gamma_regularized(0.5 * n, np.square(r))


def ball_integral_log_bounds(n: int, r: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """exp(-r^2) V_n(r) <= integral <= V_n(r), as logs (the printed exp(-r) V_n(r) is wrong for large n)."""
    log_volume = log_ball_volume(n, r)
    return log_volume - np.square(r), log_volume


def log_partition(n: int, radii: np.ndarray) -> float:
    """Eq. 13, log Z_t = log sum_i pi^(n/2) P(n/2, r_i^2), as a log-sum of logs."""
    return float(logsumexp(log_ball_integral(n, np.asarray(radii, np.float64))))


def top_share(log_terms: np.ndarray, fraction: float = 0.01) -> float:
    """The share of Z = sum_i exp(log_terms_i) carried by its largest ceil(fraction d) terms (at least one);
    NaN where Z = 0 (every term -inf: every pattern has a duplicate)."""
    terms = np.asarray(log_terms, np.float64)
    total = logsumexp(terms)
    if not np.isfinite(total):
        return math.nan
    top = max(1, math.ceil(fraction * len(terms)))
    largest = np.partition(terms, len(terms) - top)[len(terms) - top:]
    return float(np.exp(logsumexp(largest) - total))


def unit_scale(s: np.ndarray, n: int) -> float:
    """c* = 2 r* / median(s_i): the factor that puts the median pattern's ball of radius s_i / 2 at r*, the radius
    of the unit-volume ball (docs/theory.md: Z_t is not scale-invariant; this is the scale memscan reports it at).
    inf where the median s_i is 0."""
    median = float(np.median(np.asarray(s, np.float64)))
    return 2 * unit_volume_radius(n) / median if median > 0 else math.inf


def cross_entropy_floor(log_z: float) -> float:
    """Proposition 4: L ~ log Z + 1/Z, at least 1 nat, reached at Z = 1 (inf where 1/Z overflows)."""
    return log_z + math.exp(-log_z) if -log_z < 709 else math.inf


def gpt2_parameter_formula(layers: int, d_emb: int) -> float:
    """N ~ A l d^2 with GPT-2's terms: attention 3 l d^2, projection l (d^2 + 2d), feed-forward 6 l d^2 + 4 l d."""
    return 3 * layers * d_emb**2 + layers * (d_emb**2 + 2 * d_emb) + 6 * layers * d_emb**2 + 4 * layers * d_emb


def size_ratio(parameters: float, chunk_tokens: int, patterns: int) -> tuple[float, float]:
    """(D, N / D^2) with data D ~ T_max * d: the size condition for Z_t = 1 is N = O(D^2)."""
    data = float(chunk_tokens) * patterns
    return data, parameters / data**2


def ramsauer_separation(self_dot: np.ndarray, max_other_dot: np.ndarray) -> np.ndarray:
    """Delta_i = rho_i . rho_i - max_{j != i} rho_i . rho_j (from a maximum-inner-product search)."""
    return np.asarray(self_dot, np.float64) - np.asarray(max_other_dot, np.float64)


def ramsauer_threshold(d: int, beta: float, M: float) -> float:
    """Well separated when Delta_i >= 2/(beta d) + (1/beta) log(2 (d - 1) d beta M^2)."""
    return 2 / (beta * d) + math.log(2 * (d - 1) * d * beta * M**2) / beta


def retrieve(x: np.ndarray, patterns: np.ndarray, beta: float = 1.0, tol: float = 1e-6,
             max_steps: int = 100) -> tuple[np.ndarray, int, bool]:
    """Iterate xi <- sum_i softmax(-beta sq(xi, rho_i)) rho_i from x over its patterns (k, n).

    Returns (fixed point (n,), steps taken, converged: the last step moved less than tol).
    """
    xi, P = np.asarray(x, np.float64), np.asarray(patterns, np.float64)
    for step in range(1, max_steps + 1):
        logits = -beta * ((P - xi) ** 2).sum(1)
        weights = np.exp(logits - logits.max())
        new = weights @ P / weights.sum()
        moved = float(np.linalg.norm(new - xi))
        xi = new
        if moved < tol:
            return xi, step, True
    return xi, max_steps, False
