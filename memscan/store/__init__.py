"""The activation store: shard schema, manifest, atomic writes, checksums, streaming reads.

The only package that touches Parquet. A dataset folder holds `manifest.json`, its shards
`vectors/part-00000.parquet`, ... and its per-chunk table `chunks/chunks-00000.parquet`, ...
(format version 4; versions 1-3 kept them all beside the manifest); a shard is listed in the manifest only after it is fully written,
fsynced and renamed into place, so a listed shard is always whole (docs/formats.md).

`formats` holds the file names, versions and Arrow schemas; `manifest` builds, writes and
checks manifest.json; `writers` and `reader` write and stream shards; `tally` checks what
a shard holds against its manifest, `verification` a whole folder; `chunks` is the
per-chunk table, `lookup` rows and chunks joined to their text (`rows_with_text`, `chunks_with_text`) and tokens (`chunk_tokens`),
`tables` the plain result tables, `texts` a user's Parquet text source.
"""

from memscan.files import sha256_of, write_json_atomic   # reached as store.* by callers since store.py
from memscan.store.chunks import ChunkTableWriter, chunk_rows, chunk_table_chunks, read_chunk_table
from memscan.store.formats import (DEFAULT_SITE, FORMAT_VERSION, MANIFEST, PER_TOKEN_COLUMNS, SUBFOLDERS,
                                   SUBFOLDERS_SINCE, VEC_DTYPES, is_dataset_file, rows_table, schema)
from memscan.store.lookup import chunk_tokens, chunks_with_text, rows_with_text
from memscan.store.manifest import (kept_positions, new_manifest, read_manifest, set_index, shard_schema, sites_of,
                                    write_manifest)
from memscan.store.reader import ActivationDataset
from memscan.store.tables import TableWriter, read_table, write_table
from memscan.store.texts import column_names, read_text_column, read_text_rows
from memscan.store.verification import verify
from memscan.store.writers import ShardInfo, ShardWriter, write_vectors

__all__ = ["column_names", "DEFAULT_SITE", "FORMAT_VERSION", "MANIFEST", "PER_TOKEN_COLUMNS", "SUBFOLDERS", "SUBFOLDERS_SINCE",
           "VEC_DTYPES", "ActivationDataset",
           "ChunkTableWriter", "ShardInfo", "ShardWriter", "TableWriter", "chunk_rows", "chunk_table_chunks", "chunk_tokens", "chunks_with_text",
           "is_dataset_file", "kept_positions", "new_manifest", "read_chunk_table", "read_text_rows",
           "read_manifest", "read_table", "read_text_column", "rows_table", "rows_with_text", "schema", "set_index", "sha256_of",
           "shard_schema", "sites_of", "verify", "write_json_atomic", "write_manifest", "write_table",
           "write_vectors"]
