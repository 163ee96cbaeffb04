"""Texts from a user's Parquet file (a text source): string columns streamed, non-UTF-8 values refused by row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memscan.errors import InputError


def read_text_column(path: Path, column: str, batch_rows: int = 4096) -> Iterator[str]:
    """Stream one string column of a user's Parquet file (a text source): its non-empty texts (`_text_rows`)."""
    yield from (text for text, in _text_rows(path, (column,), batch_rows))


def read_text_rows(path: Path, text_column: str, others: tuple[str | None, ...], batch_rows: int = 4096,
                   ) -> Iterator[tuple[str, ...]]:
    """(text, then each of `others` as a string: a label, a document key) of each row of a user's Parquet file with
    a non-empty text (`_text_rows`); an `others` entry None, or a null value, gives None."""
    named = tuple(column for column in others if column is not None)
    for text, *values in _text_rows(path, (text_column, *named), batch_rows):
        found = iter(None if value is None else str(value) for value in values)
        yield (text, *(None if column is None else next(found) for column in others))


def column_names(path: Path) -> list[str]:
    """The columns of a user's Parquet file (a text source), from its footer alone."""
    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None


def _text_rows(path: Path, columns: tuple[str, ...], batch_rows: int) -> Iterator[tuple[Any, ...]]:
    """The given columns of each row of a user's Parquet file whose text (the first column) is neither null nor empty.

    A text column that is not of a string type (a struct, a list, a number) is refused at once, and a text that is
    not UTF-8 (a lone surrogate) at its row (counted from 1): one line each, never a tokenizer's traceback.
    """
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from None
    schema = parquet.schema_arrow
    for column in columns:
        if column not in schema.names:
            flag = "--text-column" if column == columns[0] else "--split-column/--key-column"
            raise InputError(f"{path} has no column '{column}'; columns are: {', '.join(schema.names)} "
                             f"(choose one with {flag})")
    kind = schema.field(columns[0]).type
    if not _is_text_type(kind):
        raise InputError(f"{path}: column '{columns[0]}' is of type {kind}, not a string (choose the text column "
                         "with --text-column)")
    first_row = 1
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns)):
        texts = _batch_texts(batch.column(0), path, columns[0], first_row)
        yield from (row for row in zip(texts, *(c.to_pylist() for c in batch.columns[1:])) if row[0])
        first_row += batch.num_rows


def _is_text_type(kind: pa.DataType) -> bool:
    """Whether a Parquet column holds strings (plain, large, view or dictionary-encoded)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _batch_texts(texts: pa.Array, path: Path, column: str, first_row: int) -> list[str | None]:
    """One batch's texts as str; a value that is not UTF-8 (Parquet's string type does not guarantee it) is refused
    naming its row."""
    try:
        return texts.to_pylist()
    except UnicodeDecodeError:
        row = first_row + next(i for i in range(len(texts)) if not _decodes(texts[i]))
        raise InputError(f"{path} row {row}: '{column}' is not valid UTF-8 text (a lone surrogate, or bytes of "
                         "another encoding)") from None


def _decodes(value: pa.Scalar) -> bool:
    """Whether a Parquet string value decodes as UTF-8."""
    try:
        value.as_py()
    except UnicodeDecodeError:
        return False
    return True
