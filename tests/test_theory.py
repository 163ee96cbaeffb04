"""Every formula of docs/theory.md against a direct float64 evaluation, and its inequalities on random draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import erf, gamma

from memscan import theory

rng = np.random.default_rng(0)


def draw(d: int = 40, n: int = 6, nq: int = 25, scale: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(nq, n)) * scale, rng.normal(size=(d, n)) * scale


def direct_sq(X, P):
    return np.array([[sum((x - p) ** 2) for p in P] for x in X])


def test_distances_g_and_energy_against_direct_sums():
    X, P = draw()
    sq = theory.sq_distances(X, P)
    np.testing.assert_allclose(sq, direct_sq(X, P), rtol=1e-12)
    np.testing.assert_allclose(theory.nearest_sq(sq), sq.min(1))
    for beta in (1.0, 2.0, 0.3):
        direct = -np.log(np.exp(-beta * sq).sum(1)) / beta
        np.testing.assert_allclose(theory.energy(sq, beta), direct, rtol=1e-12)
    big = sq + 5000.0  # exp underflows: the stable form still works
    np.testing.assert_allclose(theory.energy(big), theory.energy(sq) + 5000.0, rtol=1e-12)


def test_mchn_energy_against_its_definition_and_range_on_the_hull():
    X, P = draw()
    d, M2 = len(P), max((p @ p) for p in P)
    for beta in (1.0, 2.0):
        direct = [-np.log(np.exp(beta * P @ x).sum()) / beta + x @ x / 2 + np.log(d) / beta + M2 / 2 for x in X]
        np.testing.assert_allclose(theory.mchn_energy(X, P, beta), direct, rtol=1e-12)
    hull = rng.dirichlet(np.ones(d), size=200) @ P
    values = theory.mchn_energy(hull, P, 1.0)
    assert (values >= -1e-12).all() and (values <= 2 * M2 + 1e-12).all()


@pytest.mark.parametrize("seed", range(5))
def test_propositions_1_2_and_corrected_3_hold_on_random_draws(seed):
    local = np.random.default_rng(seed)
    P = local.normal(size=(30, 5)) * local.uniform(0.2, 2.0, size=(30, 1))
    X = local.normal(size=(50, 5)) * 2
    sq, d = theory.sq_distances(X, P), len(P)
    g, E = theory.nearest_sq(sq), theory.energy(sq, 1.0)
    low, high = theory.proposition1_bounds(g, d)
    assert (low <= E + 1e-12).all() and (E <= high + 1e-12).all()
    delta = theory.norm_spread(P)
    E_mchn = theory.mchn_energy(X, P, beta=2.0)
    assert (theory.proposition2_gap(E, E_mchn, d) <= delta + 1e-9).all()
    lower, upper = theory.proposition3_bounds(d, delta)
    gap = g - 2 * E_mchn
    assert (gap >= lower - 1e-9).all() and (gap <= upper + 1e-9).all()


def test_topk_interval_contains_the_exact_energy():
    X, P = draw(d=200, n=4)
    sq = theory.sq_distances(X, P)
    exact_E = theory.energy(sq, 1.5)
    ordered = np.sort(sq, axis=1)
    for k in (1, 5, 50, 199):
        lower, upper = theory.energy_interval(ordered[:, :k], d=200, beta=1.5)
        assert (lower <= exact_E + 1e-12).all() and (exact_E <= upper + 1e-12).all()
        assert (lower < upper).all()
    lower, upper = theory.energy_interval(ordered, d=200, beta=1.5)
    np.testing.assert_allclose(lower, exact_E, rtol=1e-12)
    np.testing.assert_allclose(upper, exact_E, rtol=1e-12)


def test_topk_mchn_interval_contains_the_exact_energy():
    X, P = draw(d=200, n=4)
    exact_E = theory.mchn_energy(X, P, beta=0.7)
    ip = np.sort(X @ P.T, axis=1)[:, ::-1]
    x_sq, M2 = (X * X).sum(1), float((P * P).sum(1).max())
    for k in (1, 5, 50, 199):
        lower, upper = theory.mchn_energy_interval(ip[:, :k], x_sq, 200, M2, beta=0.7)
        assert (lower <= exact_E + 1e-9).all() and (exact_E <= upper + 1e-9).all()
        assert (lower < upper).all()
    lower, upper = theory.mchn_energy_interval(ip, x_sq, 200, M2, beta=0.7)
    np.testing.assert_allclose(lower, exact_E, rtol=1e-12)
    np.testing.assert_allclose(upper, exact_E, rtol=1e-12)
    wider = theory.mchn_energy_interval(ip[:, :5], x_sq, 200, M2, beta=0.7)
    narrower = theory.mchn_energy_interval(ip[:, :50], x_sq, 200, M2, beta=0.7)
    assert ((narrower[1] - narrower[0]) <= (wider[1] - wider[0]) + 1e-12).all()


def test_layered_global_energy_and_its_bounds():
    E = rng.normal(size=(4, 30)) * 3
    G = theory.global_energy(E)
    np.testing.assert_allclose(G, -np.log(np.exp(-E).sum(0)), rtol=1e-12)
    assert (E.min(0) - math.log(4) <= G + 1e-12).all() and (G < E.min(0)).all()


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_ball_volume_and_exact_ball_integral_at_small_n(n):
    surface = 2 * math.pi ** (n / 2) / gamma(n / 2)
    for r in (0.3, 1.0, 2.5):
        assert math.exp(theory.log_ball_volume(n, r)) == pytest.approx(math.pi ** (n / 2) * r**n / gamma(n / 2 + 1))
        radial = surface * integrate.quad(lambda rho: rho ** (n - 1) * math.exp(-rho * rho), 0, r)[0]
        assert math.exp(theory.log_ball_integral(n, r)) == pytest.approx(radial, rel=1e-9)
        low, high = theory.ball_integral_log_bounds(n, r)
        assert low <= theory.log_ball_integral(n, r) <= high
    assert math.exp(theory.log_ball_integral(1, 1.3)) == pytest.approx(math.sqrt(math.pi) * erf(1.3))


def test_ball_integral_against_a_grid_in_two_dimensions():
    r, h = 1.7, 0.002
    grid = np.arange(-r, r + h, h)
    x, y = np.meshgrid(grid, grid)
    inside = x**2 + y**2 <= r * r
    numeric = (np.exp(-(x**2 + y**2)) * inside).sum() * h * h
    assert math.exp(theory.log_ball_integral(2, r)) == pytest.approx(numeric, rel=2e-3)


def test_log_ball_integral_stays_finite_where_the_integral_underflows():
    from mpmath import gammainc as mp_gammainc, log as mp_log, mpf

    for n, r in ((1024, 7.0), (1024, 5.0), (128, 0.447), (4096, 20.0), (1024, 40.0)):
        a, x = mpf(n) / 2, mpf(r) ** 2
        exact = float(mp_log(mp_gammainc(a, 0, x, regularized=True)))
        got = float(theory.log_lower_gamma_regularized(n / 2, r * r))
        assert got == pytest.approx(exact, rel=1e-10), (n, r)
    assert np.isfinite(theory.log_partition(1024, np.full(1000, 5.0)))
    assert theory.cross_entropy_floor(-800.0) == math.inf


def test_the_printed_lower_bound_fails_and_the_corrected_one_holds_at_large_n():
    n, r = 1024, 10.0
    exact_log = theory.log_ball_integral(n, r)
    log_volume = theory.log_ball_volume(n, r)
    assert log_volume - r > exact_log            # exp(-r) V_n(r) is above the integral: not a lower bound
    assert log_volume - r * r <= exact_log <= log_volume


def test_unit_volume_radius_partition_and_floor():
    assert theory.unit_volume_radius(1024) == pytest.approx(7.74, abs=0.005)
    radii = rng.uniform(0.5, 3.0, size=50)
    direct = math.log(sum(math.pi ** 1.5 * math.exp(theory.log_ball_integral(3, r) - 1.5 * math.log(math.pi))
                          for r in radii))
    assert theory.log_partition(3, radii) == pytest.approx(direct, rel=1e-12)
    assert theory.cross_entropy_floor(0.0) == 1.0
    assert all(theory.cross_entropy_floor(z) > 1.0 for z in (-2.0, -0.1, 0.1, 3.0))
    huge = theory.log_partition(2048, np.full(80_000, 40.0))  # Z = 8e4 pi^1024 overflows float64; log Z does not
    assert huge == pytest.approx(math.log(80_000) + 1024 * math.log(math.pi), rel=1e-12) and huge > 709


def test_size_condition():
    assert theory.gpt2_parameter_formula(24, 1024) == 3 * 24 * 1024**2 + 24 * (1024**2 + 2048) + 6 * 24 * 1024**2 + 4 * 24 * 1024
    D, ratio = theory.size_ratio(355e6, 256, 80_000)
    assert D == 256 * 80_000 and ratio == pytest.approx(355e6 / (256 * 80_000) ** 2)


def test_ramsauer_separation_and_threshold():
    P = rng.normal(size=(60, 8))
    gram = P @ P.T
    other = np.where(np.eye(60, dtype=bool), -np.inf, gram).max(1)
    np.testing.assert_allclose(theory.ramsauer_separation(np.diag(gram), other),
                               [gram[i, i] - max(gram[i, j] for j in range(60) if j != i) for i in range(60)])
    d, beta, M = 60, 2.0, 3.0
    assert theory.ramsauer_threshold(d, beta, M) == pytest.approx(2 / (beta * d) + math.log(2 * 59 * 60 * 2 * 9) / 2)


def test_retrieval_update_converges_to_a_separated_pattern():
    P = np.eye(5) * 10.0
    fixed, steps, converged = theory.retrieve(P[2] + 0.5, P, beta=1.0)
    assert converged and steps < 10 and np.linalg.norm(fixed - P[2]) < 1e-6
    x = P[0] * 0.5 + P[1] * 0.5
    one_step, _, _ = theory.retrieve(x, P, beta=1.0, max_steps=1)
    weights = np.exp(-((P - x) ** 2).sum(1) - max(-((P - x) ** 2).sum(1)))
    np.testing.assert_allclose(one_step, weights @ P / weights.sum())
