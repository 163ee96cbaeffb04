"""The progress of a long job: tqdm's bar where one is drawn, a log line at a steady interval where none is.

In a terminal or a notebook `progress` is tqdm.auto's bar. Where stderr is not a terminal (a log
file, a batch job) tqdm draws nothing, and the job would be silent between its first-batch
estimate and its end; there `progress` logs through the `memscan.progress` logger, at INFO, one
line at most every PROGRESS_SECONDS (done/total, rate, ETA), checked as the job advances, and a
final line when the bar closes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("memscan.progress")

PROGRESS_SECONDS = 60.0   # at most one line per this many seconds where no bar is drawn (read at each update)

T = TypeVar("T")


def duration(seconds: float) -> str:
    """A duration as 45s, 3m05s or 2h07m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(rate: float | None) -> str:
    """A rate as 1,234, 56.7 or 0.123 (? where none is known yet)."""
    if not rate:
        return "?"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class Progress(Generic[T]):
    """A tqdm bar that, where tqdm draws nothing, logs its progress instead (`progress` makes one)."""

    def __init__(self, total: int | None, desc: str, unit: str, iterable: Iterable[T] | None = None,
                 **bar: Any) -> None:
        self.total, self.desc, self.unit, self.iterable = total, desc, unit, iterable
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None, **bar)
        self.logging = bool(self.bar.disable)   # tqdm disables its bar where stderr is not a terminal
        self.done = 0
        self.started = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Advance by `n`; where no bar is drawn, log a line once PROGRESS_SECONDS have passed since the last."""
        self.done += n
        self.bar.update(n)
        if self.logging:
            now = time.monotonic()
            if now - self.last >= PROGRESS_SECONDS:
                self.last = now
                log.info("%s", self.line(now))

    def line(self, now: float | None = None, final: bool = False) -> str:
        """'extract: 240/1,000 chunk (24%), 12.0 chunk/s, 20s elapsed, ETA 1m03s' (no total: no share, no ETA;
        `final`: no ETA)."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        rate = self.done / elapsed if elapsed > 0 else None
        parts = [f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
                 if self.total is not None else f"{self.desc}: {self.done:,} {self.unit}",
                 f"{_rate(rate)} {self.unit}/s", f"{duration(elapsed)} elapsed"]
        if self.total is not None and rate and not final:
            parts.append(f"ETA {duration(max(self.total - self.done, 0) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        """Close the bar; where none is drawn, log the final line (finished, or stopped short of the total)."""
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        if self.logging:
            short = self.total is not None and self.done < self.total
            log.info("%s (%s)", self.line(final=True), "stopped" if short else "finished")

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this progress has no iterable: pass one to `progress`, or call update()")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str, iterable: Iterable[T] | None = None,
             **bar: Any) -> Progress[T]:
    """A progress bar over `total` units (None: unknown), as a context (`with progress(...) as p: p.update(n)`)
    or, given `iterable`, an iterator over it that advances by one per item. `bar`: further tqdm arguments
    (leave, unit_scale). tqdm.auto draws it in a terminal or notebook; where it draws nothing (stderr not a
    terminal) the `memscan.progress` logger gets a line every PROGRESS_SECONDS and a final one."""
    return Progress(total, desc, unit, iterable, **bar)
