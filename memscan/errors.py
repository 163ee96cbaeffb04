"""The MemscanError family: every failure a user can cause or fix.

The CLI turns these into one line on stderr and exit code 1, as it does the errors of the
libraries beneath memscan that a user's input can cause (out of memory, torch and tokenizer
errors: memscan.cli.library_error_line); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MemscanError(Exception):
    """Base class: the message is the whole user-facing explanation."""


class InputError(MemscanError):
    """A setting, path or source that cannot be used as given."""


class ModelError(MemscanError):
    """A model or tokenizer that cannot be loaded or does not fit the request."""


class DataError(MemscanError):
    """A dataset on disk that is missing, incomplete, corrupt or inconsistent."""


class NonFiniteActivationsError(DataError):
    """The model produced NaN or Inf activations; nothing of that batch was written."""
