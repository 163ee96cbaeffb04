"""`memscan query`: nearest-neighbour tables, assumption tests, energies and the cross-entropy floor.

For every layer the dataset holds (the index's layer through the index, the others by
exact blockwise search) a pipeline of small steps runs (`pipeline`): the patterns' statistics,
their self-join (`distances`), the largest s_i searched again exactly (`largest`), A3 (spacing
and Ramsauer's separation, `separation`), the 25/50/75% subsets (`subsets`), then the query
split streamed in blocks (search, energies, retrieval: `retrieval`), each block's rows appended
to the `neighbours` and `queries` tables on disk; the `patterns`, `histograms` and `coverage`
(A2, `coverage`) tables and the layer's `LayerSummary` (`summary`, with the floor of `floor`)
come last. When the index is approximate every statistic goes through an index, its recall,
bound or certified interval written beside it (the largest nearest-other distances, which
dominate log Z_t, are searched again exactly; Delta and E_mchn are exact below
`tuning.FLAT_MAX` patterns, where an inner-product index would be Flat); `--exact` (or a Flat
index) keeps every statistic exact. One budget, `--memory`, sizes every block (`settings`):
nothing proportional to d x d or to the whole query split is held, only a few numbers a
pattern and one a query. summary.json, written last and signed (`self_sha256`, `folder`),
lists every table with its size and sha256: a folder whose summary does not vouch for its
tables is an incomplete run. Queries from the index's own dataset and split leave their own
row out.
"""

from memscan.knn.mips import RECALL_QUERIES
from memscan.query.context import STEPS
from memscan.query.folder import SUMMARY, TABLE_FILES, TABLES, QueryResult, RunTables, Sink, load, read_summary, verify
from memscan.query.pipeline import analyse_layer, queries_are_patterns, run
from memscan.query.settings import MAX_BLOCK_ROWS, Blocks, QuerySettings, block_sizes, memory_bytes
from memscan.query.subsets import SUBSET_MISS, rest_depth
from memscan.query.summary import LayerSummary

__all__ = ["MAX_BLOCK_ROWS", "RECALL_QUERIES", "STEPS", "SUBSET_MISS", "SUMMARY", "TABLES", "TABLE_FILES", "Blocks",
           "LayerSummary", "QueryResult", "QuerySettings", "RunTables", "Sink", "analyse_layer", "block_sizes", "load",
           "memory_bytes", "queries_are_patterns", "read_summary", "rest_depth", "run", "verify"]
