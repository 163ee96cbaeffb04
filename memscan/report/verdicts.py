"""The run page's verdicts: does A1, A2, A3 hold at a layer? Each is one number of the layer's summary held to
one threshold, all in THRESHOLDS with their reasons (docs/reading-a-report.md, "Verdicts").

A verdict prints the number and the threshold it was held to; where the premises of the number
fail (no queries, a typical radius of 0), it says so instead of judging; Proposition 4's floor
is judged by its own premises (summary `floor.verdict`), never printed where they fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memscan import analysis, wording

HOLDS, FAILS, NOT_JUDGED = "holds", "fails", "not judged"


@dataclass(frozen=True)
class Threshold:
    """An assumption's test: the summary path of its number, what the number is, the least value at which the
    assumption is said to hold, why that value, and the premise the number needs (None: it holds; else why not)."""

    assumption: str
    path: str
    measures: str
    least: float
    reason: str
    premise: Callable[[dict[str, Any]], str | None]


def _has_queries(layer: dict[str, Any]) -> str | None:
    return None if layer.get("d_prime") else "no held-out queries at this layer"


def _typical_radius_positive(layer: dict[str, Any]) -> str | None:
    if _has_queries(layer):
        return _has_queries(layer)
    radius = layer.get("typical_radius")
    return None if radius else "the typical radius is 0: at least half the patterns have an exact duplicate"


def _two_patterns(layer: dict[str, Any]) -> str | None:
    return None if (layer.get("d") or 0) >= 2 else "fewer than two patterns: no pair to separate"


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("A1", "A1.retrieval_rate", "share of queries the retrieval update carries to within epsilon of "
              "their nearest pattern", analysis.FLOOR_COVERAGE,
              "Definition 1 asks every point of a ball to converge to its pattern; 90% leaves room for queries "
              "outside every ball (A2's misses), as the floor's premises do", _has_queries),
    Threshold("A2", "A2.coverage_at_typical", "share of held-out activations within the typical radius "
              "(median s_i / 2) of a training pattern", analysis.FLOOR_COVERAGE,
              "A2 says every held-out activation lies in some ball; 90% is the share Proposition 4's floor "
              "needs (FLOOR_COVERAGE), at the largest radius at which the median ball meets no other",
              _typical_radius_positive),
    Threshold("A3", "A3.disjoint_at_r_star", "share of patterns whose ball of radius r* meets no other "
              "(s_i > 2 r*)", analysis.FLOOR_DISJOINT,
              "A3 says the balls are pairwise disjoint; at a common radius that is s_i > 2r for every i; r* is "
              "the theory's reference radius; 90% is the floor's share (FLOOR_DISJOINT)", _two_patterns),
)


@dataclass(frozen=True)
class Verdict:
    """One assumption at one layer: holds, fails or not judged, and the line that says why with its numbers."""

    status: str
    text: str


def value_at(summary: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a layer's summary (None where a key is missing)."""
    value: Any = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def judge(layer: dict[str, Any], threshold: Threshold) -> Verdict:
    """An assumption's verdict at one layer: the measured share against its threshold, or why it is not judged."""
    why_not = threshold.premise(layer)
    value = value_at(layer, threshold.path)
    if why_not is None and value is None:
        why_not = f"{threshold.path} was not measured"
    if why_not is not None:
        return Verdict(NOT_JUDGED, f"{NOT_JUDGED}: {why_not}")
    status = HOLDS if value >= threshold.least else FAILS
    sign = "\N{GREATER-THAN OR EQUAL TO}" if status == HOLDS else "<"
    return Verdict(status, f"{status}: {value:.1%} {sign} {threshold.least:.0%}")


def floor_verdict(layer: dict[str, Any]) -> Verdict:
    """Proposition 4's floor at one layer: the figure against the held-out loss where its premises hold,
    which premises fail (and by how much) where they do not."""
    floor = layer.get("floor") or {}
    if floor.get("predicted_floor") is None:
        return Verdict(NOT_JUDGED, f"{NOT_JUDGED}: the floor is undefined at this layer")
    verdict = floor.get("verdict")
    if verdict is None:   # a run from before memscan judged the floor's premises
        return Verdict(NOT_JUDGED, f"{NOT_JUDGED}: this run predates the floor's verdict (rerun `memscan query`)")
    if not verdict["applicable"]:
        return Verdict(NOT_JUDGED, f"{NOT_JUDGED}: premises fail ({'; '.join(verdict['reasons'])})")
    loss = value_at(layer, "A1.test_loss")
    return Verdict(HOLDS, f"holds: floor {wording.floor_text(floor)}; held-out loss {wording.number(loss)} nats")


def verdicts(layer: dict[str, Any]) -> list[Verdict]:
    """The layer's verdict on each of THRESHOLDS, in order, then on the floor's premises."""
    return [*(judge(layer, threshold) for threshold in THRESHOLDS), floor_verdict(layer)]
