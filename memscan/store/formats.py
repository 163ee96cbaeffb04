"""Dataset formats: file names, format versions, the shard and per-chunk table Arrow schemas, and rows into Arrow."""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Collection, Sequence

import numpy as np
import pyarrow as pa

from memscan import files, folders
from memscan.layout import RESIDUAL

FORMAT = "memscan.activations"
# 2: a `site` column beside `layer`, and the manifest's `sites`; 3: version 2, signed; 4: shards in vectors/, the
# per-chunk table in chunks/ (a glob reads one schema), and its doc_key and text columns
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # version 1 holds the residual stream only: every row is site "hidden"
SIGNED_SINCE = 3                  # manifests of versions 1-2 (an earlier memscan) carry no self_sha256
SUBFOLDERS_SINCE = 4              # versions 1-3 keep every file beside manifest.json
DEFAULT_SITE = RESIDUAL
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
VECTORS_FOLDER = "vectors"       # the shards of a version-4 dataset
CHUNKS_FOLDER = "chunks"         # its per-chunk table
SUBFOLDERS = (VECTORS_FOLDER, CHUNKS_FOLDER)
_SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")
VEC_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
DICTIONARY_COLUMNS = ("split", "site")

# the per-chunk table beside the shards (memscan.store.chunks)
CHUNK_TABLE_PATTERN = "chunks-{:05d}.parquet"
_CHUNK_TABLE_NAME = re.compile(r"chunks-(\d{5,})\.parquet")
CHUNK_TABLE_SCHEMA = pa.schema([   # versions 1-3
    ("doc_id", pa.int64()), ("chunk_id", pa.int64()), ("split", pa.dictionary(pa.int8(), pa.string())),
    ("token_ids", pa.list_(pa.int32())), ("next_token_id", pa.int32()),
    ("nll", pa.list_(pa.float32())), ("mu", pa.list_(pa.float32())), ("var", pa.list_(pa.float32())),
])
# version 4: the document's own key (null when the source has none) and the chunk's text, decoded at extraction
CHUNK_TEXT_COLUMNS = (("doc_key", pa.string()), ("text", pa.string()))
PER_TOKEN_COLUMNS = ("nll", "mu", "var")


def chunk_table_schema(format_version: int = FORMAT_VERSION) -> pa.Schema:
    """The per-chunk table's schema in a dataset of `format_version` (doc_key and text from version 4)."""
    if format_version < SUBFOLDERS_SINCE:
        return CHUNK_TABLE_SCHEMA
    return pa.schema([*CHUNK_TABLE_SCHEMA, *CHUNK_TEXT_COLUMNS])


def shard_name(index: int, format_version: int = FORMAT_VERSION) -> str:
    """The name, relative to its dataset folder, of shard `index` (vectors/part-00000.parquet from version 4)."""
    return _in_folder(VECTORS_FOLDER, SHARD_PATTERN.format(index), format_version)


def chunk_table_name(index: int, format_version: int = FORMAT_VERSION) -> str:
    """The name, relative to its dataset folder, of per-chunk table piece `index` (chunks/chunks-00000.parquet)."""
    return _in_folder(CHUNKS_FOLDER, CHUNK_TABLE_PATTERN.format(index), format_version)


def writable_path(directory: Path, name: str) -> Path:
    """Where a dataset file of relative name `name` is written: its subfolder (vectors/, chunks/) made first,
    a link there refused."""
    folder, _, _ = name.rpartition("/")
    if folder:
        folders.subfolder(directory, folder)
    return Path(directory) / name


def _in_folder(folder: str, name: str, format_version: int) -> str:
    return f"{folder}/{name}" if format_version >= SUBFOLDERS_SINCE else name


def schema(widths: int | Sequence[int], vec_dtype: str, format_version: int = FORMAT_VERSION) -> pa.Schema:
    """The shard schema (docs/formats.md, Shards), plus `site` from format version 2.

    `vec` is fixed_size_list<vec_dtype>[n] when every site has width n; sites of several
    widths (mlp_hidden beside the residual stream) store it as large_list<vec_dtype>, each
    row as wide as its site.
    """
    distinct = sorted({widths} if isinstance(widths, int) else set(widths))
    vec = (pa.list_(VEC_DTYPES[vec_dtype], distinct[0]) if len(distinct) == 1
           else pa.large_list(VEC_DTYPES[vec_dtype]))
    fields = [
        ("row_id", pa.int64()), ("doc_id", pa.int64()), ("chunk_id", pa.int64()),
        ("position", pa.int32()), ("token_id", pa.int32()), ("next_token_id", pa.int32()),
        ("nll", pa.float32()), ("split", pa.dictionary(pa.int8(), pa.string())), ("layer", pa.int16()),
    ]
    if format_version >= 2:
        fields.append(("site", pa.dictionary(pa.int16(), pa.string())))
    return pa.schema([*fields, ("vec", vec)])


def rows_table(columns: dict[str, np.ndarray], vec: np.ndarray, table_schema: pa.Schema,
               widths: np.ndarray | None = None) -> pa.Table:
    """Build one table of rows: metadata columns (m,) and `vec`, without copying it.

    vec is (m, n) for a fixed width, or the rows' values end to end with `widths` (m,)
    their widths for a large_list `vec`. A schema without `site` (format version 1) skips it.
    """
    names = [name for name in table_schema.names if name != "vec"]
    arrays = [arrow_column(columns[name], table_schema.field(name).type) for name in names]
    vec_type = table_schema.field("vec").type
    flat = pa.array(np.ascontiguousarray(vec).reshape(-1), type=vec_type.value_type)
    if pa.types.is_fixed_size_list(vec_type):
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, vec_type.list_size))
    else:
        offsets = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
        arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat))
    return pa.Table.from_arrays(arrays, schema=table_schema)


def arrow_column(values: np.ndarray | pa.Array, arrow_type: pa.DataType) -> pa.Array:
    """A column of `arrow_type` from numpy values (dictionary-encoded where the type says so) or an Arrow array."""
    if isinstance(values, pa.Array):
        return values.cast(arrow_type)
    if pa.types.is_dictionary(arrow_type):
        return pa.array(values, type=arrow_type.value_type).dictionary_encode().cast(arrow_type)
    return pa.array(values, type=arrow_type)


def column_numpy(column: pa.Array) -> np.ndarray:
    """A column as numpy, dictionary-encoded columns (split, site) decoded to their values."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.to_numpy(zero_copy_only=False)


def is_dataset_file(name: str, listed: Collection[str] = (), format_version: int | None = None) -> bool:
    """Whether memscan writes `name` (relative to a dataset folder) there: manifest.json, a shard or per-chunk table
    piece named by the exact pattern of `format_version` (flat before 4, in vectors/ and chunks/ from 4; None:
    either) or listed in the manifest (`listed`), or the temporary name of either."""
    base = name.removesuffix(files.TMP_SUFFIX)
    if base == MANIFEST or base in listed:
        return True
    folder, _, plain = base.rpartition("/")
    for pattern, shape, home in ((SHARD_PATTERN, _SHARD_NAME, VECTORS_FOLDER),
                                 (CHUNK_TABLE_PATTERN, _CHUNK_TABLE_NAME, CHUNKS_FOLDER)):
        match = shape.fullmatch(plain)
        homes = ("", home) if format_version is None else (_in_folder(home, "", format_version).rstrip("/"),)
        if match is not None and folder in homes and pattern.format(int(match[1])) == plain:
            return True
    return False
