"""The partition function log Z_t and the cross-entropy floor (docs/theory.md, Proposition 4): under both
radius rules, at the unit scale, with their bounds in approximate layers, and the size condition N / D^2."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memscan import analysis, theory
from memscan.query.context import Layer
from memscan.query.distances import SelfJoin
from memscan.query.largest import Verified
from memscan.query.summary import Coverage, Floor, FloorBounds, Separated, Size, UnitScale


def _floor_bounds(layer: Layer, joined: SelfJoin, verified: Verified, log_z: float) -> FloorBounds:
    """How far an approximate layer's log Z_t and floor can be from the exact ones.

    Every s_i is at least the true one and log Z_t grows with each, so log_z is an upper
    bound; the sum over the verified (exact) s_i alone is a lower bound. The floor
    log Z + 1/Z is convex in log Z, least (1) at 0: its interval follows from log Z's.
    """
    lower = theory.log_partition(layer.patterns.n, joined.s[verified.exact] / 2)
    floors = [theory.cross_entropy_floor(value) for value in (lower, log_z)]
    least = theory.cross_entropy_floor(min(max(0.0, lower), log_z))
    return FloorBounds(log_z="upper bound: an approximate nearest-other distance s_i is never below the true one",
                       log_z_interval=(lower, log_z), predicted_floor_interval=(least, max(floors)),
                       verified_exact=int(verified.exact.sum()), corrected=verified.corrected,
                       largest=verified.largest, largest_exact=verified.largest_exact, rounds=verified.rounds)


def _radius_rules(n: int, s: np.ndarray, a2: Coverage, a3: Separated) -> dict[str, dict[str, Any]]:
    """log Z_t and the floor under both radius rules, each with its premises' shares: r_i = s_i / 2 (the balls
    never meet; A2 measured at the typical radius, median s_i / 2) and the paper's common radius r*."""
    log_z_star = math.log(len(s)) + float(theory.log_ball_integral(n, theory.unit_volume_radius(n)))
    return {"half_nearest": {"coverage": a2.coverage_at_typical, "disjoint": 1.0},
            "r_star": {"log_z": log_z_star, "predicted_floor": theory.cross_entropy_floor(log_z_star),
                       "coverage": a2.coverage_at_r_star, "disjoint": a3.disjoint_at_r_star}}


def _unit_scale(n: int, s: np.ndarray) -> UnitScale:
    """log Z_t and the floor with every activation scaled by c* = 2 r* / median(s_i) (theory.unit_scale):
    unchanged when the activations are rescaled, which the raw ones are not."""
    scale = theory.unit_scale(s, n)
    if not math.isfinite(scale):
        return UnitScale(None, None, None)
    log_z = theory.log_partition(n, scale * s / 2)
    return UnitScale(scale, log_z, theory.cross_entropy_floor(log_z))


def floor(layer: Layer, joined: SelfJoin, verified: Verified | None, test_loss: float | None, a2: Coverage,
          a3: Separated) -> Floor:
    """The partition function and the floor (r_i = s_i / 2), with their bounds in approximate layers
    (`_floor_bounds`; None in exact ones), both radius rules, the share of Z_t its largest 1% of
    terms carry, the floor at the unit scale, and the verdict on Proposition 4's premises."""
    n, s = layer.patterns.n, joined.s
    log_z = theory.log_partition(n, s / 2)
    rules = _radius_rules(n, s, a2, a3)
    top = theory.top_share(theory.log_ball_integral(n, s / 2))
    half = rules["half_nearest"]
    return Floor(log_z=log_z, predicted_floor=theory.cross_entropy_floor(log_z), measured_test_loss=test_loss,
                 verdict=analysis.floor_verdict(half["coverage"], half["disjoint"], top, "r_i = s_i / 2"),
                 top_1pct_share=top, radius_rules=rules, at_unit_scale=_unit_scale(n, s),
                 approximate=None if verified is None else _floor_bounds(layer, joined, verified, log_z))


def size(layer: Layer) -> Size | None:
    """The size condition N / D^2 where the model is known (None for imported vectors: no model or chunk length)."""
    manifest = layer.patterns.manifest
    parameters, chunk_tokens = manifest["model"]["num_parameters"], manifest["chunk_tokens"]
    if not (parameters and chunk_tokens):
        return None
    data_size, ratio = theory.size_ratio(parameters, chunk_tokens, layer.d)
    return Size(parameters, data_size, ratio, chunk_tokens)
