"""`memscan show` as library calls: the top examples of a folder by one of its columns, with their text.

`top(folder, by, n, ascending)` answers a DataFrame, one row per example, for a query run (a query chunk and its
k nearest training chunks), a scores folder (the most member-like chunks by a score) and a verbatim folder
(prompt, true suffix and the model's suffix, token by token). Nothing here prints: the CLI formats the frame,
the HTML pages embed it.
"""

from memscan.show.examples import DEFAULT_TOP, KINDS, default_by, for_page, marked, top
from memscan.show.verbatim import suffixes

__all__ = ["DEFAULT_TOP", "KINDS", "default_by", "for_page", "marked", "suffixes", "top"]
