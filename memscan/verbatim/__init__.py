"""Verbatim extraction: the matching algorithm (`memscan.verbatim.match`) and the `memscan verbatim` job
(`memscan.verbatim.job`), both reached as `memscan.verbatim.*`."""

from __future__ import annotations

from memscan.verbatim.job import VERBATIM, VerbatimResult, VerbatimSettings, mean_interval, run, sample_per_split
from memscan.verbatim.match import (DEFAULT_BATCH_SIZE, DEFAULT_PROMPT_TOKENS, DEFAULT_SUFFIX_TOKENS, cache_keyword,
                                    greedy_continuations, lowest_argmax, match_statistics, split_chunks,
                                    verbatim_table)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_PROMPT_TOKENS", "DEFAULT_SUFFIX_TOKENS", "VERBATIM", "VerbatimResult",
           "VerbatimSettings", "cache_keyword", "greedy_continuations", "lowest_argmax", "match_statistics",
           "mean_interval", "run", "sample_per_split", "split_chunks", "verbatim_table"]
