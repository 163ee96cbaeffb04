"""`memscan extract`: activations of a causal LM over a text source, as Parquet shards (`extract`).

settings (ExtractSettings and the dataset's identity), targets (what each chunk stores), run (the
extraction: plan, resume point, writers, loop), resume, rows, writing and output (its parts), result
(`ExtractResult`, what it returns).
"""

from memscan.extract.result import ExtractResult
from memscan.extract.run import extract
from memscan.extract.settings import ExtractSettings, resolve_layers, settings_record

__all__ = ["ExtractResult", "ExtractSettings", "extract", "resolve_layers", "settings_record"]
