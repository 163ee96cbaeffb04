"""Dataset formats: file names, format versions, the shard and per-chunk table Arrow schemas, and rows into Arrow."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import numpy as np
import pyarrow as pa

from memscan import files
from memscan.layout import RESIDUAL

FORMAT = "memscan.activations"
FORMAT_VERSION = 3             # 2: a `site` column beside `layer`, and the manifest's `sites`; 3: version 2, signed
READABLE_VERSIONS = (1, 2, 3)  # version 1 holds the residual stream only: every row is site "hidden"
SIGNED_SINCE = 3               # manifests of versions 1-2 (an earlier memscan) carry no self_sha256
DEFAULT_SITE = RESIDUAL
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
_SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")
VEC_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
DICTIONARY_COLUMNS = ("split", "site")

# the per-chunk table beside the shards (memscan.store.chunks)
CHUNK_TABLE_PATTERN = "chunks-{:05d}.parquet"
_CHUNK_TABLE_NAME = re.compile(r"chunks-(\d{5,})\.parquet")
CHUNK_TABLE_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("chunk_id", pa.int64()), ("split", pa.dictionary(pa.int8(), pa.string())),
    ("token_ids", pa.list_(pa.int32())), ("next_token_id", pa.int32()),
    ("nll", pa.list_(pa.float32())), ("mu", pa.list_(pa.float32())), ("var", pa.list_(pa.float32())),
])
PER_TOKEN_COLUMNS = ("nll", "mu", "var")


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


def is_dataset_file(name: str, listed: Collection[str] = ()) -> bool:
    """Whether memscan writes `name` into a dataset folder: manifest.json, a shard named by the exact
    pattern or listed in the manifest (`listed`), or the temporary name of either."""
    base = name.removesuffix(files.TMP_SUFFIX)
    shard = _SHARD_NAME.fullmatch(base) or _CHUNK_TABLE_NAME.fullmatch(base)
    pattern = SHARD_PATTERN if base.startswith("part-") else CHUNK_TABLE_PATTERN
    return base == MANIFEST or base in listed or (shard is not None and pattern.format(int(shard[1])) == base)
