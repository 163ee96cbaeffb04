"""Issue 21, the floor with its premises: Proposition 4's floor is shown only where A2 and A3 hold, under both
radius rules, with the share of Z_t its largest terms carry and its value at the unit scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammainc

from memscan import analysis, query, store, theory, wording
from memscan.experiments import comparison
from memscan.knn.index import IndexSettings, build
from tests.conftest import clustered


def grid(side: int, spacing: float) -> np.ndarray:
    """side^2 points on a square grid in 2 dimensions: every nearest-other distance is `spacing`."""
    axis = np.arange(side, dtype=np.float64) * spacing
    return np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)


def summary_of(tmp_path, patterns: np.ndarray, queries: np.ndarray, name: str) -> dict:
    X = np.concatenate([patterns, queries]).astype(np.float32)
    store.write_vectors(tmp_path / name, X, ["train"] * len(patterns) + ["test"] * len(queries))
    build(tmp_path / name, tmp_path / f"{name}-index", IndexSettings(factory="Flat"))
    return query.run(tmp_path / f"{name}-index", tmp_path / name, tmp_path / f"{name}-run",
                     query.QuerySettings(k=3))["layers"][0]


@pytest.fixture(scope="module")
def separated(tmp_path_factory) -> dict:
    """Well-separated patterns (a grid) and held-out points close to them: A2 and A3 hold."""
    patterns = grid(15, 1.0)
    rng = np.random.default_rng(0)
    queries = patterns[rng.choice(len(patterns), 60, replace=False)] + rng.normal(0, 0.05, (60, 2))
    return summary_of(tmp_path_factory.mktemp("floor"), patterns, queries, "grid")


def test_the_floor_applies_where_its_premises_hold(separated):
    floor = separated["floor"]
    assert floor["verdict"] == {"applicable": True, "reasons": []}
    assert floor["radius_rules"]["half_nearest"]["coverage"] == 1.0
    assert math.isclose(floor["top_1pct_share"], 3 / 225, rel_tol=1e-6)   # equal terms: the top 3 of 225
    text = wording.floor_text(floor)
    assert text.startswith(f"{floor['predicted_floor']:.3g}") and "premises hold" in text


def test_the_floor_is_a_verdict_where_its_premises_fail(tmp_path):
    X = clustered(300, 16, 3, seed=2, spread=0.3)          # dense clusters: held-out points fall between balls
    floor = summary_of(tmp_path, X[:250], X[250:], "dense")["floor"]
    verdict = floor["verdict"]
    assert not verdict["applicable"] and verdict["reasons"][0].startswith("A2 fails: ")
    coverage = floor["radius_rules"]["half_nearest"]["coverage"]
    assert f"{coverage:.1%} of held-out activations" in verdict["reasons"][0] and coverage < 0.9
    text = wording.floor_text(floor)
    assert text.startswith("not applicable (A2 fails") and f"{floor['predicted_floor']:.3g}" not in text
    row, = comparison.rows({"query": {"floor": {"predicted_floor": 1.0}}},
                           lambda stage: {"floor": floor} if stage == "query" else None)
    assert row["measured"] is None and row["ratio"] is None and row["not_applicable"] == "; ".join(verdict["reasons"])


def test_the_floor_at_the_unit_scale_does_not_move_when_the_activations_are_rescaled(tmp_path):
    X = clustered(240, 12, 8, seed=4, spread=0.2)
    floors = {c: summary_of(tmp_path, c * X[:200], c * X[200:], f"c{c}")["floor"] for c in (0.5, 1.0, 3.0)}
    raw = [floors[c]["log_z"] for c in floors]
    unit = [floors[c]["at_unit_scale"]["log_z"] for c in floors]
    assert max(raw) - min(raw) > 1.0                          # the raw log Z_t moves with the scale ...
    assert max(unit) - min(unit) < 1e-4 * max(1.0, abs(unit[0]))   # ... the unit-scale one does not
    for c, floor in floors.items():
        assert math.isclose(floor["at_unit_scale"]["scale"] * c, floors[1.0]["at_unit_scale"]["scale"], rel_tol=1e-5)


def test_top_share_and_unit_scale_against_direct_sums():
    rng = np.random.default_rng(1)
    n, s = 6, rng.uniform(0.2, 2.0, 500)
    terms = [math.pi ** (n / 2) * gammainc(n / 2, (r / 2) ** 2) for r in s]   # Eq. 12, float64, no logs
    largest = sorted(terms)[-5:]
    assert math.isclose(theory.top_share(theory.log_ball_integral(n, s / 2)), sum(largest) / sum(terms),
                        rel_tol=1e-9)
    r_star = math.sqrt(n / (2 * math.pi * math.e))
    assert math.isclose(theory.unit_scale(s, n), 2 * r_star / np.median(s), rel_tol=1e-12)
    assert theory.unit_scale(np.zeros(4), n) == math.inf


@pytest.mark.parametrize("coverage, disjoint, top, failing", [
    (0.95, 1.0, 0.1, []), (0.5, 1.0, 0.1, ["A2"]), (0.95, 0.2, 0.1, ["A3"]), (0.95, 1.0, 0.99, ["the largest"]),
    (math.nan, 1.0, 0.1, ["A2"]),
])
def test_each_premise_fails_on_its_own(coverage, disjoint, top, failing):
    verdict = analysis.floor_verdict(coverage, disjoint, top, "r*")
    assert verdict["applicable"] == (not failing)
    assert [reason.split(" fails")[0].split(" 1%")[0] for reason in verdict["reasons"]] == failing
