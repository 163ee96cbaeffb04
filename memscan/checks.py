"""Range checks for the settings dataclasses: one InputError line naming the flag, the range and the value.

Every job's settings are checked once, at the boundary (`XSettings.check()`); the
internals then trust them. Non-finite floats (inf, nan) are refused everywhere.
"""

from __future__ import annotations

import math
import re

from memscan.errors import InputError


def need(ok: bool, message: str) -> None:
    """Refuse with `message` unless `ok`."""
    if not ok:
        raise InputError(message)


def at_least(flag: str, value: int | None, minimum: int) -> None:
    """An integer flag (None: not given, allowed) of at least `minimum`."""
    need(value is None or value >= minimum, f"{flag} must be at least {minimum}; got {value}")


def number(flag: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = True) -> None:
    """A finite float in [low, high) (or with an open `low`, a closed `high`); inf and nan are refused."""
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    if math.isfinite(value) and above and below:
        return
    if math.isinf(high):
        raise InputError(f"{flag} must be a finite number {'>' if low_open else '>='} {low:g}; got {value}")
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise InputError(f"{flag} must be in {interval}; got {value}")


def choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    """A string flag among `allowed`."""
    need(value in allowed, f"{flag} must be {', '.join(allowed[:-1])} or {allowed[-1]}; got '{value}'")


DEVICE = re.compile(r"auto|cpu|gpu|cuda(:\d+)?")   # gpu: what index and query took before cuda[:N], as cuda


def device(flag: str, value: str) -> str:
    """A device as every command takes it: `auto`, `cpu` or `cuda[:N]` (`gpu` the same as `cuda`)."""
    need(DEVICE.fullmatch(value) is not None, f"{flag} must be auto, cpu or cuda[:N]; got '{value}'")
    return value


def torch_device_name(value: str) -> str:
    """A checked device as torch names it: `gpu` is `cuda`."""
    return "cuda" if value == "gpu" else value
