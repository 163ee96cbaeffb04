"""Text sources, tokenization, chunking, seeded sampling and the train/test split.

Chunking policy (the paper's T_max): each document's tokens are cut into consecutive,
non-overlapping chunks of `chunk_tokens`; the remainder shorter than a chunk is dropped
(its first token is still kept as the *next token* of the last chunk, so that chunk's
last position has a loss), and documents shorter than one chunk give no chunk. Both are
counted in `CorpusStats`. No special tokens are added.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import re
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa

from memscan import files, qf, store
from memscan.errors import InputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")   # read by memscan's own code (.txt: one document per line)
BUILDER_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}  # read through `datasets`
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")  # of .csv/.json/.jsonl files, decompressed by `datasets`
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # a `save_to_disk` folder holds both
SAVED_DATASET_DICT_FILE = "dataset_dict.json"               # a `save_to_disk` DatasetDict: one folder per split
ACCEPTED_FILES = ".txt, .jsonl, .parquet, .csv, .json, .arrow (.csv/.json/.jsonl also .gz/.bz2/.xz/.zst)"
DATASETS_BATCH_ROWS = 1024
HUB_PROBE_SECONDS = 5.0   # how long an hf: id that is no local folder may wait to learn the hub is unreachable
TOKENIZE_BATCH_DOCUMENTS = 256


@dataclass(frozen=True)
class Document:
    """One document of a source; `split` is set only where the source or the user's split rule
    fixes it (qf "gen", `--split-column`, `--members`); `label` is the raw value of the source's
    label column (`--split-column` or `--key-column`), when one is read; `doc_key` the document's own
    key (its `--id-column` value as a string), None where the source has none."""

    doc_id: int
    text: str
    split: str | None = None
    label: str | None = None
    doc_key: str | None = None


@dataclass(frozen=True)
class Chunk:
    """`tokens` (chunk_tokens,) int32 and `next_tokens` (chunk_tokens,) int32, -1 where none.

    `sample_key` is the chunk's seeded uniform key; the smallest keys form a sample. `doc_key`: its
    document's own key (`Document.doc_key`).
    """

    doc_id: int
    chunk_id: int
    split: str
    tokens: np.ndarray
    next_tokens: np.ndarray
    sample_key: int
    doc_key: str | None = None


@dataclass
class CorpusStats:
    """What the chunker saw and kept; written into the manifest."""

    documents: int = 0
    documents_too_short: int = 0
    tokens: int = 0
    tokens_in_chunks: int = 0
    longest_document_tokens: int = 0
    chunks_available: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- sources

DEFAULT_ID_COLUMN = "id"   # the column a source's own document keys are read from unless --id-column names another


@dataclass(frozen=True)
class KeyColumn:
    """Where a document's own key comes from: `column` of each record; `required` when the user named it
    (--id-column), else it is read only where the source has it."""

    column: str = DEFAULT_ID_COLUMN
    required: bool = False

    def of(self, record: dict[str, Any], where: str) -> str | None:
        """The record's key as a string (an int key as its str); None where the record has no such column (or a
        null), refused in one line when the user named the column and the record has none."""
        if self.column not in record:
            if self.required:
                raise self.missing(where, list(record))
            return None
        value = record[self.column]
        return None if value is None else str(value)

    def missing(self, where: str, columns: Iterable[str]) -> InputError:
        """The one line for a named --id-column the source lacks."""
        return InputError(f"--id-column {self.column}: {where} has no column '{self.column}'; columns are: "
                          f"{', '.join(columns)}")


class Source:
    """A named stream of documents with a description for the manifest."""

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def count_documents(self) -> int:
        """Documents in this source (or piece), counted by reading it."""
        return sum(1 for _ in self.documents())

    def partitions(self, max_documents: int | None, count: int,
                   count_documents: CountDocuments | None = None) -> list[Source]:
        """About `count` contiguous pieces of the first `max_documents` documents, keeping global doc ids.

        Read one after another they give exactly `documents()` cut at `max_documents`. Pieces
        of a stream learn their first doc id by counting the pieces before them (each up to
        `max_documents`): `count_documents` counts a list of pieces at once (Ray runs them in
        parallel); by default one after another.
        """
        raise NotImplementedError


CountDocuments = Callable[[list[Source]], list[int]]


def _numbered(pieces: list[Any], sizes: list[int], max_documents: int | None) -> list[Source]:
    """Pieces given global doc ids (each starts where the one before ended), cut at `max_documents`."""
    numbered, first = [], 0
    for piece, size in zip(pieces, sizes):
        if max_documents is not None and first >= max_documents:
            break
        limit = None if max_documents is None else min(size, max_documents - first)
        numbered.append(replace(piece, first_doc_id=first, limit=limit))
        first += size
    return numbered


def _count_each(pieces: list[Source]) -> list[int]:
    return [piece.count_documents() for piece in pieces]


@dataclass(frozen=True)
class QFSource(Source):
    """The built-in Question-Formation generator (`qf` or `qf:documents=N,lines=L,gen=F`)."""

    config: qf.QFConfig
    seed: int
    start: int = 0
    stop: int | None = None

    def documents(self) -> Iterator[Document]:
        for doc_id in range(self.start, self.config.documents if self.stop is None else self.stop):
            items, generalization = qf.document(self.config, self.seed, doc_id)
            yield Document(doc_id, qf.LINE_SEPARATOR.join(item.text for item in items), "gen" if generalization else None)

    def partitions(self, max_documents: int | None, count: int,
                   count_documents: CountDocuments | None = None) -> list[Source]:
        """Document ranges: the generator is random-access, so nothing is counted."""
        total = min(self.config.documents, max_documents or self.config.documents)
        edges = np.linspace(0, total, min(count, total) + 1).round().astype(int)
        return [replace(self, start=int(a), stop=int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def describe(self) -> dict[str, Any]:
        return {"kind": "qf", "config": asdict(self.config), "seed": self.seed}


@dataclass(frozen=True)
class FileSource(Source):
    """Local files in sorted path order: .txt (one document per line), .jsonl and .parquet (memscan's own readers),
    .csv, .json, .arrow, compressed .csv/.json/.jsonl and `save_to_disk` folders (through `datasets`)."""

    paths: tuple[Path, ...]
    text_column: str
    first_doc_id: int = 0
    limit: int | None = None         # documents to read, None: all
    label_column: str | None = None  # read into Document.label (--split-column or --key-column)
    key: KeyColumn = field(default_factory=lambda: KeyColumn())   # read into Document.doc_key

    def documents(self) -> Iterator[Document]:
        records = (record for path in self.paths
                   for record in _read_records(path, self.text_column, self.label_column, self.key))
        for doc_id, (text, label, doc_key) in enumerate(itertools.islice(records, self.limit), self.first_doc_id):
            yield Document(doc_id, text, label=label, doc_key=doc_key)

    def partitions(self, max_documents: int | None, count: int,
                   count_documents: CountDocuments | None = None) -> list[Source]:
        """One piece per file, whatever `count` (files are not split)."""
        pieces: list[Source] = [replace(self, paths=(path,), limit=max_documents) for path in self.paths]
        return _numbered(pieces, (count_documents or _count_each)(pieces), max_documents)

    def describe(self) -> dict[str, Any]:
        described = [{"path": str(p), "bytes": p.stat().st_size, "sha256": files.sha256_of(p)}
                     for p in _files_of(self.paths)]
        return {"kind": "files", "text_column": self.text_column, "files": described}


@dataclass(frozen=True)
class HFSource(Source):
    """A Hugging Face dataset (`hf:OWNER/NAME[:CONFIG]`), streamed through `datasets`."""

    name: str
    config_name: str | None
    split: str
    text_column: str
    revision: str | None
    piece: int = 0                   # this piece of `pieces` contiguous runs of the dataset's files
    pieces: int = 1
    first_doc_id: int = 0
    limit: int | None = None         # documents to read, None: all
    label_column: str | None = None  # read into Document.label (--split-column or --key-column)
    key: KeyColumn = field(default_factory=lambda: KeyColumn())   # read into Document.doc_key

    def _stream(self) -> Any:
        local = Path(self.name).is_dir()
        unreachable = None if local else _hub_unreachable()
        if unreachable is not None and not unreachable.startswith("offline"):
            raise self._unreachable(unreachable, None)
        try:
            with _reading(self.name):
                stream = datasets.load_dataset(
                    self.name, self.config_name, split=self.split, streaming=True, revision=self.revision
                )
        except InputError as exc:
            if unreachable is None:
                raise
            raise self._unreachable(unreachable, exc) from None   # offline, and no cached copy served it
        return stream.shard(self.pieces, self.piece, contiguous=True) if self.pieces > 1 else stream

    def _records(self) -> Iterator[dict[str, Any]]:
        with _reading(self.name):
            yield from self._stream()

    def documents(self) -> Iterator[Document]:
        records = itertools.islice(self._records(), self.limit)
        return record_documents(records, self.first_doc_id, f"dataset '{self.name}'", self.text_column,
                                self.label_column, self.key)

    def count_documents(self) -> int:
        return sum(1 for _ in itertools.islice(self._records(), self.limit))

    def partitions(self, max_documents: int | None, count: int,
                   count_documents: CountDocuments | None = None) -> list[Source]:
        """Contiguous runs of the dataset's files (datasets' `shard`), at most one per file."""
        pieces = min(count, self._stream().num_shards)
        if pieces <= 1:
            return [replace(self, limit=max_documents)]
        runs: list[Source] = [replace(self, piece=i, pieces=pieces, limit=max_documents) for i in range(pieces)]
        return _numbered(runs, (count_documents or _count_each)(runs), max_documents)

    def _unreachable(self, why: str, error: InputError | None) -> InputError:
        spec = f"hf:{self.name}" + (f":{self.config_name}" if self.config_name else "")
        detail = "" if error is None else f": {error}"   # "could not read dataset 'NAME': " and datasets' line
        return InputError(f"--source '{spec}': no local folder named '{self.name}' and the hub is not reachable "
                          f"({why}){detail}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "config": self.config_name, "split": self.split,
                "text_column": self.text_column, "revision": self.revision}


def record_documents(records: Iterable[dict[str, Any]], first_doc_id: int, what: str, text_column: str,
                     label_column: str | None, key: KeyColumn) -> Iterator[Document]:
    """Documents from records (dicts) of a table-like source (`what`: its name in errors), numbered from
    `first_doc_id`; a missing column or a text that is not a string is one line naming the row."""
    for doc_id, record in enumerate(records, first_doc_id):
        for column, flag in ((text_column, "--text-column"), (label_column, "--split-column/--key-column")):
            if column is not None and column not in record:
                raise InputError(f"{what} has no column '{column}'; columns are: {', '.join(record)} "
                                 f"(choose one with {flag})")
        label = None if label_column is None else str(record[label_column])
        text = checked_text(record[text_column], f"{what} row {doc_id + 1}", text_column)
        yield Document(doc_id, text, label=label, doc_key=key.of(record, what))


@dataclass(frozen=True)
class MemorySource(Source):
    """Documents the caller holds (`extract(..., source=...)`): a list of strings, or the rows of a
    `datasets.Dataset` / `IterableDataset` (its `text_column`, label and key columns as for files)."""

    rows: Any                        # list[str] | datasets.Dataset | datasets.IterableDataset
    text_column: str = "text"
    label_column: str | None = None  # read into Document.label (--split-column or --key-column)
    key: KeyColumn = field(default_factory=lambda: KeyColumn())   # read into Document.doc_key
    limit: int | None = None         # documents to read, None: all

    def documents(self) -> Iterator[Document]:
        records = itertools.islice(self._records(), self.limit)
        return record_documents(records, 0, self.name, self.text_column, self.label_column, self.key)

    def _records(self) -> Iterator[dict[str, Any]]:
        if isinstance(self.rows, (list, tuple)):
            return ({self.text_column: text} for text in self.rows)
        return iter(self.rows)

    def partitions(self, max_documents: int | None, count: int,
                   count_documents: CountDocuments | None = None) -> list[Source]:
        """One piece: the caller's documents are read where they are."""
        return [replace(self, limit=max_documents)]

    @property
    def name(self) -> str:
        """What the settings record as its `source`: `list of N texts`, or the Dataset's class (and fingerprint)."""
        if isinstance(self.rows, (list, tuple)):
            return f"list of {len(self.rows)} texts"
        fingerprint = getattr(self.rows, "_fingerprint", None)
        return f"datasets.{type(self.rows).__name__}" + (f" {fingerprint}" if fingerprint else "")

    def describe(self) -> dict[str, Any]:
        """What identifies the documents: a Dataset's `_fingerprint`, else a sha256 over the texts (and the
        label and key columns) in order, read once here."""
        kind = "texts" if isinstance(self.rows, (list, tuple)) else f"datasets.{type(self.rows).__name__}"
        identity = getattr(self.rows, "_fingerprint", None)
        if identity is None:
            columns = [self.text_column, self.label_column, self.key.column]
            identity = files.fingerprint([[record.get(c) for c in columns if c] for record in self._records()])
        return {"kind": kind, "text_column": self.text_column, "sha256": identity}


def memory_source(rows: Any, *, text_column: str = "text", label_column: str | None = None,
                  id_column: str | None = None) -> MemorySource:
    """A source of documents the caller holds: a list of strings (no columns: no label or key), or a
    `datasets.Dataset` / `IterableDataset`; anything else is one InputError line."""
    key = KeyColumn(id_column, True) if id_column is not None else KeyColumn()
    if isinstance(rows, (list, tuple)):
        if not all(isinstance(text, str) for text in rows):
            raise InputError("a list source must hold strings (one document each)")
        if label_column is not None or key.required:
            raise InputError("a list of texts has no columns: --split-column, --key-column and --id-column need a "
                             "datasets.Dataset")
        return MemorySource(list(rows), text_column)
    if not isinstance(rows, (datasets.Dataset, datasets.IterableDataset)):
        raise InputError(f"source must be a spec string, a list of strings or a datasets.Dataset / IterableDataset; "
                         f"got {type(rows).__name__}")
    return MemorySource(rows, text_column, label_column, key)


HF_DEFAULT_SPLIT = "train"


def resolve_split(spec: str, split: str | None) -> str | None:
    """The split of `--source` to read: for an hf: dataset `split` (None: "train"); other sources
    have none (None), so giving one is an error rather than silently ignored."""
    if spec.startswith("hf:"):
        return split or HF_DEFAULT_SPLIT
    if split is not None:
        raise InputError(f"--hf-split applies to hf: sources only; --source '{spec}' has no splits "
                         f"(got --hf-split {split})")
    return None


def open_source(spec: str, *, seed: int, text_column: str = "text", split: str | None = None,
                revision: str | None = None, label_column: str | None = None, id_column: str | None = None,
                ) -> Source:
    """Parse `--source`: `qf[:k=v,...]`, `hf:OWNER/NAME[:CONFIG]`, or a local file or folder.

    `split` is the split of an hf: dataset (None: "train"); other sources refuse one.
    `label_column` (a column of any source but .txt and qf) is read into each Document's label,
    `id_column` into its doc_key (None: a column named `id` where the source has one).
    """
    split = resolve_split(spec, split)
    key = KeyColumn(id_column, True) if id_column is not None else KeyColumn()
    if spec == "qf" or spec.startswith("qf:"):
        if label_column is not None:
            raise InputError(f"--split-column/--key-column need a source with columns; --source '{spec}' "
                             "(the built-in generator) has none")
        if key.required:
            raise InputError(f"--id-column {id_column}: --source '{spec}' (the built-in generator) has no columns")
        return QFSource(_parse_qf_options(spec[3:]), seed)
    if spec.startswith("hf:"):
        name, _, config_name = spec[3:].partition(":")
        return HFSource(name, config_name or None, split or HF_DEFAULT_SPLIT, text_column, revision,
                        label_column=label_column, key=key)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"--source '{spec}' does not exist (give a file, a folder, 'qf' or 'hf:OWNER/NAME')")
    if path.is_dir():
        paths = _source_paths(path)
        if not paths:
            raise InputError(f"folder '{spec}' holds no {ACCEPTED_FILES} files and is no save_to_disk dataset")
    elif _readable_file(path):
        paths = (path,)
    else:
        raise InputError(f"--source '{spec}' is not a {ACCEPTED_FILES} file (nor a folder of them or a "
                         "save_to_disk dataset folder)")
    return FileSource(paths, text_column, label_column=label_column, key=key)


def _builder_of(path: Path) -> str | None:
    """The `datasets` builder that reads a file (csv, json, arrow), None for memscan's own (and unknown) files."""
    if path.suffix in COMPRESSED_SUFFIXES:
        inner = Path(path.stem).suffix
        return BUILDER_SUFFIXES[inner] if inner in (".csv", ".json", ".jsonl") else None
    return None if path.suffix in TEXT_SUFFIXES else BUILDER_SUFFIXES.get(path.suffix)


def _readable_file(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or _builder_of(path) is not None


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (refusing a DatasetDict's, whose splits are folders of their own)."""
    if (folder / SAVED_DATASET_DICT_FILE).is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_saved_dataset(p))
        example = f"{folder / splits[0]}" if splits else f"{folder}/SPLIT"
        raise InputError(f"'{folder}' is a DatasetDict saved with save_to_disk (splits: {', '.join(splits) or 'none'}); "
                         f"give one split's folder, e.g. --source '{example}'")
    return all((folder / name).is_file() for name in SAVED_DATASET_FILES)


def _source_paths(folder: Path) -> tuple[Path, ...]:
    """The files (and save_to_disk folders, each one entry) under `folder` that memscan reads, in sorted path order."""
    if _is_saved_dataset(folder):
        return (folder,)
    saved = [p for p in folder.rglob("*") if p.is_dir() and _is_saved_dataset(p)]
    found = [p for p in folder.rglob("*") if p.is_file() and _readable_file(p)
             and not any(s in p.parents for s in saved)]
    return tuple(sorted(found + saved))


def _files_of(paths: Iterable[Path]) -> Iterator[Path]:
    """The files behind `paths`: a save_to_disk folder stands for every file in it."""
    for path in paths:
        yield from sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else (path,)


def _parse_qf_options(options: str) -> qf.QFConfig:
    names = {"documents": ("documents", int), "lines": ("lines_per_document", int),
             "gen": ("generalization_fraction", float)}
    values: dict[str, Any] = {}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key not in names:
            raise InputError(f"unknown qf option '{key}'; known: {', '.join(names)} (e.g. qf:documents=200)")
        field_name, kind = names[key]
        try:
            values[field_name] = kind(value)
        except ValueError:
            raise InputError(f"qf option {key} must be a {kind.__name__}; got '{value}'") from None
    config = qf.QFConfig(**values)
    if config.documents < 1 or config.lines_per_document < 1 or not 0 <= config.generalization_fraction < 1:
        raise InputError(f"qf options out of range: {config}")
    return config


def _read_records(path: Path, text_column: str, label_column: str | None, key: KeyColumn,
                  ) -> Iterator[tuple[str, str | None, str | None]]:
    """(text, label, key) per document of one file (or save_to_disk folder); label None unless `label_column`
    (a column), key None unless `key`'s column is one of the file's."""
    if path.is_dir() or _builder_of(path) is not None:
        yield from _read_with_datasets(path, text_column, label_column, key)
        return
    if path.suffix == ".txt":
        if label_column is not None:
            raise InputError(f"--split-column/--key-column need a .jsonl, .parquet or hf: source with columns (or "
                             f".csv, .json, .arrow, a save_to_disk folder); '{path}' is a .txt file")
        if key.required:
            raise InputError(f"--id-column {key.column}: '{path}' is a .txt file, which has no columns")
        yield from ((text, None, None) for text in _read_texts(path, text_column))
        return
    if path.suffix == ".parquet":
        names = store.column_names(path)
        kept = key.column if key.column in names else None
        if key.required and kept is None:
            raise key.missing(f"{path}", names)
        yield from store.read_text_rows(path, text_column, (label_column, kept))
        return
    for text, record, where in _read_jsonl(path, (text_column, *([label_column] if label_column else []))):
        yield text, None if label_column is None else str(record[label_column]), key.of(record, where)


def _read_texts(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        yield from _read_parquet_texts(path, text_column)
        return
    if path.suffix == ".jsonl":
        yield from (text for text, _, _ in _read_jsonl(path, (text_column,)))
        return
    try:
        with path.open(encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _read_jsonl(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(text, record, where: `path:line`) of each record of a .jsonl file, which must hold the given columns (the
    first is the text, which must be a string)."""
    try:
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{line_number} is not valid JSON: {exc.msg}") from None
                missing = [c for c in columns if not isinstance(record, dict) or c not in record]
                if missing:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    flag = "--text-column" if missing[0] == columns[0] else "--split-column/--key-column"
                    raise InputError(f"{path}:{line_number} has no column '{missing[0]}' (has: {keys}); "
                                     f"choose one with {flag}")
                text = checked_text(record[columns[0]], f"{path} line {line_number}", columns[0])
                yield text, record, f"{path}:{line_number}"
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None


_JSON_TYPES = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (list, "a list"), (dict, "an object"))
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str only unpaired: a JSON escape of a pair decodes to one character


def checked_text(value: Any, where: str, column: str) -> str:
    """`value` when it is a string of valid Unicode; anything else (null, a list, a number, a lone surrogate that no
    tokenizer can encode) is refused in one line naming `where` (the file and line or row) and the column, rather
    than tokenized as its Python spelling ("None", "[1, 2, 3]") or left to fail in the tokenizer."""
    if not isinstance(value, str):
        kind = "null" if value is None else next((n for t, n in _JSON_TYPES if isinstance(value, t)),
                                                  f"a {type(value).__name__}")
        raise InputError(f"{where}: '{column}' is {kind}, not a string")
    surrogate = _SURROGATE.search(value)
    if surrogate:
        raise InputError(f"{where}: '{column}' holds an unpaired surrogate \\u{ord(surrogate[0]):04x} "
                         "(not valid Unicode text)")
    return value


def _read_parquet_texts(path: Path, text_column: str) -> Iterator[str]:
    yield from store.read_text_column(path, text_column)


# What `datasets`, pyarrow and pandas raise on a file that does not parse (a bad gzip stream, a ragged CSV row, JSON
# that is neither an array nor lines, an Arrow file that is not one, a compression whose package is missing).
_PARSE_ERRORS = (OSError, ValueError, TypeError, ImportError, NotImplementedError, pa.ArrowException,
                 datasets.exceptions.DatasetsError)


def _read_with_datasets(path: Path, text_column: str, label_column: str | None, key: KeyColumn,
                        ) -> Iterator[tuple[str, str | None, str | None]]:
    """(text, label, key) per row of a file read by a `datasets` builder (streamed) or of a save_to_disk folder
    (`load_from_disk`, memory-mapped), in row order; rows whose text is null or empty are skipped (as in .parquet)."""
    columns = (text_column,) if label_column is None else (text_column, label_column)
    what = "datasets.load_from_disk" if path.is_dir() else f"datasets' {_builder_of(path)} builder"
    for row_number, row in enumerate(_datasets_rows(path, what), 1):
        missing = [c for c in columns if c not in row]
        if missing:
            flag = "--text-column" if missing[0] == text_column else "--split-column/--key-column"
            raise InputError(f"{path} has no column '{missing[0]}'; columns are: {', '.join(row)} "
                             f"(choose one with {flag})")
        value = row[text_column]
        if value is None or value == "":
            continue
        text = checked_text(value, f"{path} row {row_number}", text_column)
        yield text, None if label_column is None else str(row[label_column]), key.of(row, str(path))


def _datasets_rows(path: Path, what: str) -> Iterator[dict[str, Any]]:
    """The rows of one file or save_to_disk folder as dicts; any failure to parse it is one line naming it."""
    for builder in ("csv", "json", "arrow"):   # they log the failure we report, a second line before ours
        logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}").setLevel(logging.CRITICAL)
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            for batch in dataset.iter(batch_size=DATASETS_BATCH_ROWS):
                names = list(batch)
                yield from (dict(zip(names, values)) for values in zip(*batch.values()))
        else:
            yield from datasets.load_dataset(_builder_of(path), data_files=[str(path)], streaming=True, split="train")
    except _PARSE_ERRORS as exc:
        raise InputError(f"{path} could not be read (by {what}): {files.first_line(exc)}") from None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached ("offline: ..." where offline mode is set), found within
    HUB_PROBE_SECONDS by opening one connection to it (or to the proxy before it); None where it can be."""
    if datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.is_offline_mode():
        return "offline: HF_HUB_OFFLINE is set"
    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    host, scheme = endpoint.hostname or "", endpoint.scheme or "https"
    port = endpoint.port or (443 if scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or "", parsed.port or 80
    if (host, port) in _REACHABLE:
        return None
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port}: {exc.strerror or exc}")

    thread = threading.Thread(target=probe, daemon=True)   # name resolution has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    if not outcome:
        return f"{host}:{port}: no answer within {HUB_PROBE_SECONDS:g} s"
    if outcome[0] is None:
        _REACHABLE.add((host, port))
    return outcome[0]


_REACHABLE: set[tuple[str, int]] = set()


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
    """A dataset that is missing, unreachable or unreadable becomes one line."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise InputError(f"could not read dataset '{name}': {files.first_line(exc)}") from None


# ---------------------------------------------------------------- hashing, splits, chunks

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer over uint64 arrays: a fast, portable, seedable hash."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))) & _MASK64


def _keyed(seed: int, purpose: int, values: np.ndarray) -> np.ndarray:
    salt = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(purpose))
    return splitmix64(np.asarray(values, dtype=np.uint64) ^ salt)


_SPLIT_PURPOSE, _SAMPLE_PURPOSE = 1, 2


def document_split(doc_id: int, forced: str | None, test_fraction: float, seed: int) -> str:
    """"test" for a seeded-hash fraction of documents, else "train"; a forced split wins."""
    if forced is not None:
        return forced
    u = float(_keyed(seed, _SPLIT_PURPOSE, np.array([doc_id]))[0]) / 2.0**64
    return "test" if u < test_fraction else "train"


def sample_keys(seed: int, doc_id: int, chunk_ids: np.ndarray) -> np.ndarray:
    """Uniform uint64 keys per chunk; the K smallest form the seeded sample (bottom-k)."""
    return _keyed(seed, _SAMPLE_PURPOSE, _keyed(seed, _SAMPLE_PURPOSE, np.array([doc_id])) ^ chunk_ids.astype(np.uint64))


def tokenize(documents: Iterable[Document], tokenizer: Any) -> Iterator[tuple[Document, np.ndarray]]:
    """(document, token ids int32) in source order, tokenizing in batches for speed."""
    batch: list[Document] = []

    def flush() -> Iterator[tuple[Document, np.ndarray]]:
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False,
                            return_attention_mask=False, verbose=False)["input_ids"]
        for doc, ids in zip(batch, encoded):
            yield doc, np.asarray(ids, dtype=np.int32)
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) == TOKENIZE_BATCH_DOCUMENTS:
            yield from flush()
    if batch:
        yield from flush()


def chunk_tokens(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut one document: chunks (m, length) int32 and next tokens (m, length) int32, -1 at the end."""
    m = len(ids) // length
    chunks = ids[: m * length].reshape(m, length)
    following = np.full(m * length, -1, dtype=np.int32)
    upto = min(len(ids) - 1, m * length)
    following[:upto] = ids[1: upto + 1]
    return chunks, following.reshape(m, length)


def iter_chunks(documents: Iterable[Document], tokenizer: Any, length: int, test_fraction: float,
                seed: int, stats: CorpusStats) -> Iterator[Chunk]:
    """Every chunk of every document in (doc_id, chunk_id) order, updating `stats` as it goes."""
    for doc, ids in tokenize(documents, tokenizer):
        stats.documents += 1
        stats.tokens += len(ids)
        stats.longest_document_tokens = max(stats.longest_document_tokens, len(ids))
        chunks, following = chunk_tokens(ids, length)
        if len(chunks) == 0:
            stats.documents_too_short += 1
            continue
        stats.tokens_in_chunks += chunks.size
        stats.chunks_available += len(chunks)
        split = document_split(doc.doc_id, doc.split, test_fraction, seed)
        keys = sample_keys(seed, doc.doc_id, np.arange(len(chunks))).tolist()
        for chunk_id in range(len(chunks)):
            yield Chunk(doc.doc_id, chunk_id, split, chunks[chunk_id], following[chunk_id], keys[chunk_id], doc.doc_key)


def sample_chunks(chunks: Iterable[Chunk], k: int) -> list[Chunk]:
    """A uniform sample of k chunks without replacement, seeded, in O(k) memory, sorted by id.

    Bottom-k sampling: every chunk gets a hashed key and the k smallest keys win, so the
    sample does not depend on the stream's length or order, and samples of disjoint
    streams merge by keeping the k smallest keys.
    """
    heap: list[tuple[int, int, int, Chunk]] = []  # (-key, -doc, -chunk, chunk): a max-heap
    for chunk in chunks:
        entry = (-chunk.sample_key, -chunk.doc_id, -chunk.chunk_id, chunk)
        if len(heap) < k:
            heapq.heappush(heap, entry)
        elif entry[:3] > heap[0][:3]:
            heapq.heapreplace(heap, entry)
    return sorted((e[3] for e in heap), key=lambda c: (c.doc_id, c.chunk_id))


# ---------------------------------------------------------------- membership labels (the split rule)

# Label values (compared lower-cased) that name membership: train = in the model's training data.
MEMBER_VALUES = ("member", "members", "train", "1", "1.0", "true", "yes", "in")
NON_MEMBER_VALUES = ("non-member", "nonmember", "non_member", "non-members", "test", "0", "0.0", "false", "no", "out")
ACCEPTED_LABELS = "member/non-member, train/test, 1/0, true/false, yes/no, in/out"
SHOWN_IDS = 5  # unmatched member ids named in an error


@dataclass(frozen=True)
class SplitRule:
    """What makes a document train (a member) or test: the seeded hash, a label column, or a members list.

    kind "hash": `document_split` by --test-fraction and --seed (the default);
    kind "column": the source's `column` holds the label of each document;
    kind "members": `members` are the ids (doc ids, or keys read from `column`) of the
    training documents, every other document is test. `path` and `sha256` name the file.
    """

    kind: str = "hash"
    column: str | None = None
    members: frozenset[str] = frozenset()
    path: str | None = None
    sha256: str | None = None

    @property
    def label_column(self) -> str | None:
        """The source column to read into Document.label (None: none)."""
        return self.column

    def describe(self) -> dict[str, Any]:
        """The manifest's split_rule (part of the extraction's fingerprint)."""
        if self.kind == "hash":
            return {"kind": "hash"}
        if self.kind == "column":
            return {"kind": "column", "column": self.column}
        return {"kind": "members", "file": self.path, "sha256": self.sha256, "members": len(self.members),
                "key_column": self.column}


def split_rule(split_column: str | None, members: str | None, key_column: str | None) -> SplitRule:
    """The rule of `--split-column`, `--members FILE [--key-column]`, or the hash split when neither is given."""
    if split_column is not None and members is not None:
        raise InputError("--split-column and --members both set the split; give one of them")
    if key_column is not None and members is None:
        raise InputError("--key-column names the keys of --members FILE; give --members too")
    if split_column is not None:
        return SplitRule("column", column=split_column)
    if members is None:
        return SplitRule()
    path = Path(members)
    if not path.is_file():
        raise InputError(f"--members '{members}' is not a file (give a text file of document ids, one per line)")
    try:
        ids = frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as exc:
        raise InputError(f"--members '{members}' is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not ids:
        raise InputError(f"--members '{members}' lists no document ids")
    return SplitRule("members", column=key_column, members=ids, path=str(path.resolve()), sha256=files.sha256_of(path))


@dataclass
class LabelTally:
    """What labelling saw: label values by count, and the member ids that matched a document."""

    values: dict[str, int] = field(default_factory=dict)
    matched: set[str] = field(default_factory=set)


def label_documents(documents: Iterable[Document], rule: SplitRule, tally: LabelTally) -> Iterator[Document]:
    """Documents with the split `rule` gives them (the hash rule leaves them as they are)."""
    for doc in documents:
        if rule.kind == "hash":
            yield doc
            continue
        value = doc.label if doc.label is not None else str(doc.doc_id)
        tally.values[value] = tally.values.get(value, 0) + 1
        if rule.kind == "column":
            yield replace(doc, split=_membership_of(value, rule.column or "", tally))
            continue
        member = value in rule.members
        if member:
            tally.matched.add(value)
        yield replace(doc, split="train" if member else "test")


def _membership_of(value: str, column: str, tally: LabelTally) -> str:
    normal = value.strip().lower()
    if normal in MEMBER_VALUES:
        return "train"
    if normal in NON_MEMBER_VALUES:
        return "test"
    seen = ", ".join(repr(v) for v in sorted(tally.values)[:10])
    raise InputError(f"--split-column {column} has the value {value!r}, which names no membership "
                     f"(values seen: {seen}; accepted: {ACCEPTED_LABELS})")


def check_members_matched(rule: SplitRule, tally: LabelTally) -> None:
    """Every id of --members must name a document of the source (read to its end)."""
    if rule.kind != "members":
        return
    unmatched = sorted(rule.members - tally.matched)
    if unmatched:
        what = f"keys of --key-column {rule.column}" if rule.column else "document ids"
        shown = ", ".join(repr(v) for v in unmatched[:SHOWN_IDS])
        raise InputError(f"--members '{rule.path}': {len(unmatched):,} of {len(rule.members):,} ids match no "
                         f"document ({what}) of --source, first: {shown}")


def check_both_classes(rule: SplitRule, chunk_counts: dict[str, int]) -> None:
    """A user's split rule must give members and non-members (membership is measured between them)."""
    if rule.kind == "hash":
        return
    if not chunk_counts.get("train") or not chunk_counts.get("test"):
        flag = f"--split-column {rule.column}" if rule.kind == "column" else f"--members '{rule.path}'"
        counts = ", ".join(f"{count:,} {split}" for split, count in sorted(chunk_counts.items())) or "no chunks"
        raise InputError(f"{flag} gives one class only ({counts}); membership needs train (member) and "
                         "test (non-member) chunks")


@dataclass(frozen=True)
class LabeledSource(Source):
    """A source whose documents get the split of `rule`: what Ray's planning tasks read, piece by piece."""

    inner: Source
    rule: SplitRule

    def documents(self) -> Iterator[Document]:
        return label_documents(self.inner.documents(), self.rule, LabelTally())

    def count_documents(self) -> int:
        return self.inner.count_documents()

    def partitions(self, max_documents: int | None, count: int,
                   count_documents: CountDocuments | None = None) -> list[Source]:
        return [LabeledSource(piece, self.rule)
                for piece in self.inner.partitions(max_documents, count, count_documents)]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()
