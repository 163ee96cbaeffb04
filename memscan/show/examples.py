"""The top examples of a query run or a scores folder by one column, with the texts of their chunks.

Texts come from the datasets the folder's record names (`store.rows_with_text` for activation rows,
`store.chunks_with_text` for chunks); a run's row ids are those of its queries dataset and, for the
neighbours, of its index's dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

import memscan.store as store
from memscan import files, folders, query, score
from memscan.errors import DataError, InputError, MemscanError
from memscan.knn import index
from memscan.show import verbatim

log = logging.getLogger(__name__)

DEFAULT_TOP = 5
# By kind: the column ranked by default, and whether smaller values come first.
DEFAULT_BY = {folders.QUERY_RUN.name: ("nearest_dist", True), folders.SCORES.name: ("loss", None),
              folders.VERBATIM.name: ("match_fraction", False)}


def default_by(kind: str) -> str:
    """The column `top` ranks a folder of this kind by when none is given."""
    return DEFAULT_BY[kind][0]


def _order(table: pd.DataFrame, by: str, ascending: bool, n: int) -> pd.DataFrame:
    """The first `n` rows of `table` ordered by `by` (ties by row order), missing values last."""
    if by not in table.columns:
        raise InputError(f"no column '{by}' to rank by; the columns are: {', '.join(map(str, table.columns))}")
    if n < 1:
        raise InputError(f"the number of examples must be at least 1; got {n}")
    return table.sort_values(by, ascending=ascending, kind="stable", na_position="last").head(n)


def query_examples(folder: Path, by: str, n: int, ascending: bool | None, layer: int | None = None) -> pd.DataFrame:
    """A query run's top `n` queries of one layer (default: the index's) by a `queries` column, each with its
    text and its k neighbours ([{rank, row_id, dist, text}]) from the index's dataset."""
    run = query.QueryResult(folder, query.read_summary(folder))
    queries = run.table("queries")
    layer = _index_layer(run, queries) if layer is None else layer
    mine = queries[(queries.layer == layer) & (queries.site == run.site)] if "site" in queries else \
        queries[queries.layer == layer]
    if mine.empty:
        raise InputError(f"the run in '{folder}' has no queries at layer {layer} "
                         f"(its layers: {sorted(set(queries.layer.tolist()))})")
    chosen = _order(mine, by, DEFAULT_BY[run.kind.name][1] if ascending is None else ascending, n)
    texts = store.rows_with_text(Path(run.record["queries"]), chosen.query_row_id.to_numpy())
    examples = chosen.reset_index(drop=True).assign(text=texts.text.to_numpy(), doc_id=texts.doc_id.to_numpy(),
                                                    doc_key=texts.doc_key.to_numpy(),
                                                    chunk_id=texts.chunk_id.to_numpy(), split=texts.split.to_numpy())
    neighbours = run.table("neighbours")
    neighbours = neighbours[(neighbours.layer == layer) & neighbours.query_row_id.isin(examples.query_row_id)]
    if "site" in neighbours:
        neighbours = neighbours[neighbours.site == run.site]
    found = store.rows_with_text(_index_dataset(run), neighbours.neighbour_row_id.to_numpy())
    neighbours = neighbours.assign(text=found.text.to_numpy())
    examples["neighbours"] = [_neighbours_of(neighbours, row_id) for row_id in examples.query_row_id]
    return examples


def _neighbours_of(neighbours: pd.DataFrame, row_id: int) -> list[dict[str, Any]]:
    rows = neighbours[neighbours.query_row_id == row_id].sort_values("rank")
    return [{"rank": int(r["rank"]), "row_id": int(r.neighbour_row_id), "dist": float(r.dist), "text": r.text}
            for _, r in rows.iterrows()]


def _index_layer(run: query.QueryResult, queries: pd.DataFrame) -> int:
    """The layer the run's index holds (the largest layer analysed where its index is gone)."""
    try:
        return int(index.read_info(run.record["index"])["dataset"]["layer"])
    except MemscanError:
        return int(queries.layer.max())


def _index_dataset(run: query.QueryResult) -> Path:
    """The dataset the run's index was built over (the neighbours' row ids are its rows)."""
    if run.queries_are_patterns:
        return Path(run.record["queries"])
    try:
        return Path(index.read_info(run.record["index"])["dataset"]["path"])
    except MemscanError as exc:
        raise DataError(f"the run's index cannot be read, so neither can its neighbours' texts: {exc}") from exc


def score_examples(folder: Path, by: str, n: int, ascending: bool | None) -> pd.DataFrame:
    """A scores folder's `n` most member-like chunks by score `by` (its `member_when` side first), with split,
    label and text."""
    result = score.ScoreResult(folder, folders.read_record(folder, folders.SCORES))
    table = result.scores.to_pandas()
    if ascending is None:
        sides = result.orientation
        ascending = sides.get(by, "larger") == "smaller"
    chosen = _order(table, by, ascending, n).reset_index(drop=True)
    texts = store.chunks_with_text(Path(result.record["data"]), chosen.doc_id.to_numpy(), chosen.chunk_id.to_numpy())
    return chosen.assign(doc_key=texts.doc_key.to_numpy(), text=texts.text.to_numpy())


def verbatim_examples(folder: Path, by: str, n: int, ascending: bool | None) -> pd.DataFrame:
    """A verbatim folder's top `n` chunks by a column (default: match fraction, largest first), with the prompt,
    the true suffix and the model's greedy suffix decoded again, and the per-token matches."""
    result = verbatim.read(folder)
    table = result.table("verbatim")
    chosen = _order(table, by, DEFAULT_BY[result.kind.name][1] if ascending is None else ascending, n)
    return verbatim.suffixes(result, chosen.reset_index(drop=True))


KINDS: dict[str, Callable[[Path, str, int, bool | None], pd.DataFrame]] = {
    folders.QUERY_RUN.name: query_examples, folders.SCORES.name: score_examples,
    folders.VERBATIM.name: verbatim_examples}


def top(folder: str | Path, by: str | None = None, n: int = DEFAULT_TOP, ascending: bool | None = None,
        ) -> tuple[str, pd.DataFrame]:
    """(kind, the top `n` examples of `folder` by column `by`): one row per example with its text. `ascending`
    None: the kind's own order (a score's member side; a run's nearest first)."""
    folder = Path(folder)
    kind, _ = folders.detect(folder)
    if kind.name not in KINDS:
        raise InputError(f"'{folder}' holds a memscan {kind.name}; `memscan show` shows a query run, a scores "
                         "folder or a verbatim folder")
    return kind.name, KINDS[kind.name](folder, by or default_by(kind.name), n, ascending)


def marked(tokens: list[dict[str, Any]]) -> str:
    """The model's suffix with each token equal to the true one in [brackets] (a verbatim example's `tokens`)."""
    return " ".join(f"[{t['model'].strip()}]" if t["match"] else t["model"].strip() for t in tokens)


def _document(frame: pd.DataFrame) -> list[str]:
    """Each example's document: the source's own key where it has one, else memscan's doc id, and its chunk."""
    keys = frame["doc_key"] if "doc_key" in frame else pd.Series([None] * len(frame))
    return [f"{key if key is not None and key == key else doc} #{chunk}"
            for key, doc, chunk in zip(keys, frame.doc_id, frame.chunk_id)]


def _page_columns(kind: str, frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """A few readable columns of `top`'s frame for a page: where each example comes from, its value of `by`,
    its texts."""
    base = {"document": _document(frame), "split": frame.split, by: frame[by]}
    if kind == folders.QUERY_RUN.name:
        nearest = [n[0] if n else {"text": "", "dist": float("nan")} for n in frame.neighbours]
        return pd.DataFrame({**base, "query text": frame.text,
                             "nearest training text": [n["text"] for n in nearest]})
    if kind == folders.VERBATIM.name:
        return pd.DataFrame({**base, "prompt": frame.prompt, "true suffix": frame.true_suffix,
                             "model suffix ([equal])": [marked(tokens) for tokens in frame.tokens]})
    labels = {"label": frame.label} if "label" in frame else {}
    return pd.DataFrame({**base, **labels, "text": frame.text})


def for_page(folder: str | Path, n: int = DEFAULT_TOP) -> pd.DataFrame | None:
    """The examples a folder's page shows (`top` by the kind's default column, in readable columns); None for a
    kind `show` does not cover, or where the texts cannot be read (the page then goes without, and the log says
    why)."""
    kind, _ = folders.detect(Path(folder))
    if kind.name not in KINDS:
        return None
    try:
        _, frame = top(folder, None, n)
    except MemscanError as exc:
        log.warning("the page of '%s' shows no examples: %s", folder, files.first_line(exc))
        return None
    return _page_columns(kind.name, frame, default_by(kind.name))
