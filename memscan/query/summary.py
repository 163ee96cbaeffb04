"""One layer's summary (summary.json's `layers` entries, docs/formats.md) as typed, frozen records.

Each family of statistics builds its own part; `LayerSummary.to_json` is the one place a summary becomes
JSON: the fields in declaration order are the keys in summary.json's order, non-finite numbers null.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from memscan import analysis


@dataclass(frozen=True)
class RadiusChoice:
    """The --radius rule and the radius it gives at this layer."""

    mode: str
    value: float


@dataclass(frozen=True)
class Coverage:
    """A2: the share of queries within each radius of their nearest pattern."""

    coverage_at_r_star: float
    coverage_at_typical: float
    coverage_at_radius: float


@dataclass(frozen=True)
class Separated:
    """A3: disjoint balls at the radius and at r*, and Ramsauer's separation with how Delta was searched."""

    disjoint_at_radius: float
    disjoint_at_r_star: float
    ramsauer_well_separated: float
    ramsauer_threshold: float
    max_norm: float
    ramsauer_delta: dict[str, float]
    inner_products: dict[str, Any]


@dataclass(frozen=True)
class Retrieved:
    """A1: retrieval to the nearest pattern, next-token agreement and the losses."""

    retrieval_rate: float
    converged_rate: float
    epsilon: float
    next_token_agreement: float
    train_loss: float | None
    test_loss: float | None
    loss_gap: float | None


@dataclass(frozen=True)
class Energy:
    """The queries' mean energies: E's certified interval, E_mchn and its interval, and the MCHN top k's recall."""

    beta: float
    mean_lower: float
    mean_upper: float
    mean_mchn: float
    mean_mchn_lower: float
    mean_mchn_upper: float
    mchn_top_k_recall: dict[str, Any] | None


@dataclass(frozen=True)
class UnitScale:
    """log Z_t and the floor with the activations scaled by c* (None where c* is undefined)."""

    scale: float | None
    log_z: float | None
    predicted_floor: float | None


@dataclass(frozen=True)
class FloorBounds:
    """How far an approximate layer's log Z_t and floor can be from the exact ones, and the verification behind it."""

    log_z: str
    log_z_interval: tuple[float, float]
    predicted_floor_interval: tuple[float, float]
    verified_exact: int
    corrected: int
    largest: int
    largest_exact: bool
    rounds: int


@dataclass(frozen=True)
class Floor:
    """The partition function, the cross-entropy floor and the verdict on Proposition 4's premises."""

    log_z: float
    predicted_floor: float
    measured_test_loss: float | None
    verdict: dict[str, Any]
    top_1pct_share: float
    radius_rules: dict[str, dict[str, Any]]
    at_unit_scale: UnitScale
    approximate: FloorBounds | None


@dataclass(frozen=True)
class Size:
    """The size condition N / D^2 where the model is known."""

    N: int
    D: float
    N_over_D2: float
    chunk_tokens: int


@dataclass(frozen=True)
class SubsetSummary:
    """One subset's size, how many nearest-other distances its self-join lists gave, and the searched ones' recall."""

    fraction: float
    patterns: int
    from_lists: int
    searched: int
    searched_recall: dict[str, Any] | None


@dataclass(frozen=True)
class BlockSummary:
    """The --memory budget, the block sizes it gave and how many query blocks ran."""

    memory: str
    memory_bytes: int
    pattern_rows: int
    query_rows: int
    join_rows: int
    knn_rows: int
    query_blocks: int


@dataclass(frozen=True)
class LayerSummary:
    """One (site, layer)'s entry of summary.json, its fields in the file's key order."""

    site: str
    layer: int
    n: int
    d: int
    d_prime: int
    k: int
    search: str
    recall: dict[str, Any] | None
    query_nearest_dist: dict[str, float]
    pattern_nearest_dist: dict[str, float]
    r_star: float
    typical_radius: float
    typical_over_r_star: float
    radius: RadiusChoice
    A2: Coverage
    A3: Separated
    A1: Retrieved
    energy: Energy
    floor: Floor
    size: Size | None
    subsets: tuple[SubsetSummary, ...]
    blocks: BlockSummary
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The summary as summary.json holds it: nested objects, lists, and null for every non-finite number."""
        return analysis.finite_or_none(asdict(self))
