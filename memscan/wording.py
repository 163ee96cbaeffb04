"""Numbers put into words for people: a figure whose premises fail is said to be a verdict, not printed.

Shared by the command line and the report, so a number reads the same wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def number(value: float | None, spec: str = ".3g") -> str:
    """A summary number for people; None (undefined for this data) as n/a."""
    return "n/a" if value is None else format(value, spec)


def floor_text(floor: Mapping[str, Any]) -> str:
    """Proposition 4's floor with its verdict: the figure (and its interval in approximate layers) where its
    premises hold; where they fail, which fail and by how much, never the figure; n/a where it is undefined."""
    verdict = floor.get("verdict")
    if floor["predicted_floor"] is None:
        return "n/a"
    if verdict is not None and not verdict["applicable"]:
        return "not applicable (" + "; ".join(verdict["reasons"]) + ")"
    text = number(floor["predicted_floor"])
    if floor.get("approximate") is not None:
        low, high = floor["approximate"]["predicted_floor_interval"]
        text += f" (in [{number(low)}, {number(high)}])"
    return text + (" nats, premises hold" if verdict is not None else " nats")
