"""memscan: how a language model memorizes, measured with nearest neighbours over its activations.

`memscan.load(folder)` opens any memscan folder for analysis (memscan.catalog.load). It is imported when first
used, so `import memscan` and `memscan --help` import no torch.

memscan logs through the "memscan" logger and its children. Where the application has configured no logging
(a notebook, a script), memscan's INFO lines go to stderr through a handler of its own (`UntilConfigured`); once
the root logger has a handler, that handler stays silent and the lines reach the application's handlers once.
Quiet them with `logging.getLogger("memscan").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from memscan.version import __version__

LAZY = {"load": "memscan.catalog"}   # the package's API, by the module that defines it

__all__ = ["__version__", "load"]


class UntilConfigured(logging.Handler):
    """Writes memscan's records to the current stderr only while the root logger has no handler (then the
    records propagate to the application's handlers instead, so no line is written twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never raise into the caller (logging.Handler's own rule)
            self.handleError(record)


def _log_until_configured() -> None:
    """memscan's INFO lines shown where nothing is configured: a handler on "memscan", at INFO, added once and
    only when the application had configured no logging when memscan was first imported."""
    logger = logging.getLogger("memscan")
    if logging.getLogger().handlers or any(isinstance(h, UntilConfigured) for h in logger.handlers):
        return
    handler = UntilConfigured()
    handler.setFormatter(logging.Formatter("memscan: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


_log_until_configured()


def __getattr__(name: str) -> Any:
    """`memscan.load` and the rest of LAZY, imported on first use."""
    if name not in LAZY:
        raise AttributeError(f"module 'memscan' has no attribute '{name}'")
    return getattr(importlib.import_module(LAZY[name]), name)
