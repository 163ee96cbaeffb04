"""memscan: how a language model memorizes, measured with nearest neighbours over its activations.

`memscan.load(folder)` opens any memscan folder for analysis (memscan.catalog.load). It is imported when first
used, so `import memscan` and `memscan --help` import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from memscan.version import __version__

LAZY = {"load": "memscan.catalog"}   # the package's API, by the module that defines it

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    """`memscan.load` and the rest of LAZY, imported on first use."""
    if name not in LAZY:
        raise AttributeError(f"module 'memscan' has no attribute '{name}'")
    return getattr(importlib.import_module(LAZY[name]), name)
