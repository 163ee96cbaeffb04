"""What `memscan query` computes (`QuerySettings`) and the block sizes its --memory budget gives every step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from memscan import checks
from memscan.errors import InputError
from memscan.fields import setting
from memscan.knn import tuning
from memscan.knn.index import at_least
from memscan.knn.mips import CANDIDATE_SLACK

MIN_MEMORY = 1 << 20     # bytes: below this a block would hold a handful of rows
MAX_BLOCK_ROWS = 65536   # the store's batch: more rows per block buy no speed
MIN_PATTERN_ROWS = 64    # a floor for tiny budgets: smaller blocks cost more per block than they save


def _positive_finite(flag: str, value: float, given: Any = None) -> None:
    """Refuses a value that is not positive and finite (NaN, Inf, 0, negative), naming its flag."""
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be positive and finite; got {value if given is None else given}")


def memory_bytes(text: str) -> int:
    """--memory in bytes (`tuning.parse_memory`: 512MB, 2GiB, 1.5G, ...), refused below 1 MiB."""
    size = tuning.parse_memory(text)
    if size < MIN_MEMORY:
        raise InputError(f"--memory must be at least 1MiB; got '{text}'")
    return size


@dataclass(frozen=True)
class QuerySettings:
    """What `memscan query` computes (see `memscan query --help`)."""

    split: str = setting("test", "Split of --queries to query with.")
    k: int = setting(10, "Neighbours per query and per pattern.")
    exact: bool = setting(False, "Exact blockwise search even where the index is approximate.")
    beta: float = setting(1.0, "Inverse temperature of the energies.")
    radius: str = setting("r*", "Ball radius for A2 and A3: r*, typical or a number.")
    epsilon: float | None = setting(None, "Retrieval tolerance [default: 1% of the median nearest-other distance].")
    max_steps: int = 100
    bins: int = 50
    subsets: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0))
    seed: int = setting(0)   # the shared --seed
    device: str = setting("auto")   # the shared --device
    memory: str = setting("2GB", "Working-memory budget every block is sized from, the index aside (512MB, 2GiB, "
                                 "1.5G, ...).")
    sites: str | None = setting(None, "Also analyse these sites of the dataset (comma-separated, or all), searched "
                                      "exactly [default: the index's site only].")

    def check(self) -> None:
        """Every value against its range, once, naming the flag: NaN and Inf are refused."""
        for flag, value, minimum in (("--k", self.k, 1), ("--max-steps", self.max_steps, 1),
                                     ("--bins", self.bins, 1), ("--seed", self.seed, 0)):
            at_least(flag, value, minimum)
        _positive_finite("--beta", self.beta)
        if self.epsilon is not None:
            _positive_finite("--epsilon", self.epsilon)
        if self.radius not in ("r*", "typical"):
            try:
                value = float(self.radius)
            except ValueError:
                raise InputError(f"--radius must be r*, typical or a positive number; got '{self.radius}'") from None
            _positive_finite("--radius", value, self.radius)
        if not self.subsets or not all(0 < fraction <= 1 for fraction in self.subsets):
            raise InputError(f"subsets must be fractions in (0, 1]; got {list(self.subsets)}")
        checks.device("--device", self.device)
        memory_bytes(self.memory)


@dataclass(frozen=True)
class Blocks:
    """Rows handled at once, each derived from the --memory budget (written into the summary)."""

    memory_bytes: int
    pattern_rows: int    # patterns streamed at once: exact searches, the MCHN pass, the inner-product index
    query_rows: int      # queries searched, scored and written at once
    join_rows: int       # patterns per batch of the index's self-join
    knn_rows: int        # queries held per exact k-NN pass over the patterns (verification, the subsets' rest)


def mips_budget(budget: int) -> int:
    """The share of --memory the inner-product index may hold: the quarter the blocks leave free
    (pattern blocks take a quarter, query blocks half), so it gets compressed codes before it
    would double the working memory of a large layer."""
    return budget // 4


def block_sizes(budget: int, n: int, k: int, d: int, full_pass: bool, candidates: int | None = None) -> Blocks:
    """The largest blocks whose working sets fit the budget.

    A quarter of it holds a block of patterns (float32 and a float64 copy: 12 n bytes a
    row). Half holds a block of queries, whose largest working set is a gather of
    neighbour vectors: 8 n (3k + 8) bytes a query bounds retrieval's k float32 vectors
    with two float64 copies (20 k n) and the exact re-ranking of k + 9 candidates (float32,
    scored in chunks); exact runs add the MCHN pass's float64 products against a pattern
    block (24 bytes a pattern), as does every exact search of queries against the patterns
    Half holds a batch of the index's self-join (its candidates gathered as float32 vectors
    and a copy, 8 n bytes each: k + 1 a pattern, or `candidates` where an index of compressed
    codes fetches k_factor times as many); a query's re-ranking grows by the candidates beyond
    k + 1 likewise. An exact k-NN pass holds its queries (float32 and a
    centred copy, 8 n bytes) and their candidates, so a quarter holds far more of them than
    an MCHN pass: the patterns are streamed once per pass, not once per few hundred queries.
    Blocks never go below one row (MIN_PATTERN_ROWS patterns) nor above MAX_BLOCK_ROWS.
    """
    def rows(share: int, per_row: int, most: int, least: int = 1) -> int:
        return int(min(max(share // per_row, least), most))

    pattern_rows = rows(budget // 4, 12 * n, min(MAX_BLOCK_ROWS, d), MIN_PATTERN_ROWS)
    extra = max(0, (candidates or k + 1) - (k + 1))   # candidates a compressed index fetches beyond k + 1
    per_query = 8 * n * (3 * k + CANDIDATE_SLACK + extra)
    mchn_rows = rows(budget // 2, per_query + 24 * pattern_rows, MAX_BLOCK_ROWS)
    query_rows = mchn_rows if full_pass else rows(budget // 2, per_query, MAX_BLOCK_ROWS)
    knn_rows = rows(budget // 4, 8 * n + 24 * (k + CANDIDATE_SLACK), MAX_BLOCK_ROWS)
    return Blocks(budget, pattern_rows, query_rows, rows(budget // 2, 8 * n * (k + 1 + extra), MAX_BLOCK_ROWS),
                  knn_rows)
