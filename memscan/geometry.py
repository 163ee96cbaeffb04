"""Geometry as a membership signal at every view a dataset stores: each (site, layer), every kept position.

For one view, every kept row of a train (member) or test (non-member) chunk is rated by its
distance to the nearest member row of the same view, leaving its own chunk out: a member is
never its own neighbour, nor is another position of its own chunk; a non-member's nearest
member is searched plainly. The search is `memscan.knn.exact`'s (blockwise, candidates in
float32, distances recomputed exactly), with chunk indices as the rows' ids, so that its
exclusion of the query's own id leaves the query's whole chunk out. A chunk's score is
minus that distance, averaged (`mean`) or at its best position (`max`) over the chunk's rows.

Looking at many views, the best one is named with a correction for having looked: the
views' one-sided Mann-Whitney U tests of AUC > 0.5, Holm-Bonferroni adjusted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

import memscan.store as store
from memscan.knn import exact

AGGREGATIONS = ("mean", "max")
RATED_SPLITS = ("train", "test")       # members (the patterns), non-members
BLOCK_BYTES = 64 << 20                 # per query or database block, and per block's heap of k = P (id, distance)
PREFIX = "geom"
CORRECTION = "holm-bonferroni over one-sided Mann-Whitney U tests (AUC > 0.5)"
ALPHA = 0.05


def views(manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """Every (site, layer) the dataset stores, in row order."""
    return [(entry["name"], int(layer)) for entry in store.sites_of(manifest) for layer in entry["layers"]]


def column(site: str, layer: int, aggregation: str) -> str:
    """The scores column of a view and aggregation: geom_<site>_<layer>_<aggregation>."""
    return f"{PREFIX}_{site}_{layer}_{aggregation}"


def chunk_blocks(dataset: store.ActivationDataset, split: str, layer: int,
                 block_rows: int) -> Callable[[], Iterator[exact.Block]]:
    """A view's rows of a split as knn blocks whose ids are chunk indices: excluding 'self' leaves the chunk out."""
    per_chunk = int(dataset.manifest["rows_per_chunk"])

    def blocks() -> Iterator[exact.Block]:
        for X, meta in dataset.iter_batches(split=split, layer=layer, batch_rows=block_rows):
            yield meta["row_id"] // per_chunk, X
    return blocks


def block_rows(width: int, positions: int) -> int:
    """Rows per block so that a block's vectors (4 n bytes a row) and its heap (12 P bytes a row) fit BLOCK_BYTES."""
    return max(256, BLOCK_BYTES // max(4 * width, 12 * positions))


def nearest_member(data: Path, site: str, layer: int, backend: exact.Backend | None = None,
                   rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chunk (r,), distance (r,), nearest member's chunk (r,)) of every train and test row of a view.

    The distance is to the nearest train row of another chunk. k = the kept positions per
    chunk makes the search fetch one candidate more than a chunk's own rows in every block
    pair, so the nearest row of another chunk is always among them: the result is exact.
    `rows` per block (None: `block_rows`) bounds the memory.
    """
    dataset = store.ActivationDataset(data, site)
    k = store.kept_positions(dataset.manifest)
    rows = rows or block_rows(dataset.n, k)
    members = chunk_blocks(dataset, "train", layer, rows)
    queries = itertools.chain.from_iterable(chunk_blocks(dataset, split, layer, rows)() for split in RATED_SPLITS)
    parts = [(ids, np.sqrt(D[:, 0].astype(np.float64)), I[:, 0])
             for ids, D, I in exact.search_blocks(queries, members, k, exclude_self=True, backend=backend)]
    chunks, distance, nearest = (np.concatenate(part) for part in zip(*parts))
    return chunks, distance, nearest


def aggregate(chunks: np.ndarray, values: np.ndarray, rated: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and max of `values` (r,) over each chunk's rows, aligned to the sorted chunk indices `rated` (m,)."""
    at = np.searchsorted(rated, chunks)
    count = np.bincount(at, minlength=len(rated))
    total = np.bincount(at, weights=values, minlength=len(rated))
    top = np.full(len(rated), -np.inf)
    np.maximum.at(top, at, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mean": np.where(count > 0, total / count, np.nan), "max": np.where(count > 0, top, np.nan)}


def view_scores(data: Path, manifest: dict[str, Any], rated: np.ndarray,
                backend: exact.Backend | None = None) -> dict[str, np.ndarray]:
    """Every view's chunk scores (m,): minus the distance to the nearest other member, per AGGREGATIONS."""
    scores = {}
    for site, layer in views(manifest):
        chunks, distance, _ = nearest_member(data, site, layer, backend)
        for aggregation, values in aggregate(chunks, -distance, rated).items():
            scores[column(site, layer, aggregation)] = values
    return scores


def greater_p(values: np.ndarray, labels: np.ndarray) -> float:
    """One-sided p of the Mann-Whitney U test that members (label 1) score higher (AUC > 0.5)."""
    finite = np.isfinite(values)
    members, non_members = values[finite & (labels == 1)], values[finite & (labels == 0)]
    return float(mannwhitneyu(members, non_members, alternative="greater").pvalue)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order): the i-th smallest times (m - i + 1), kept monotone, at most 1."""
    p = np.asarray(p, np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def best_view(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The view with the smallest Holm-adjusted p (ties: the larger AUC), and whether it separates at ALPHA."""
    name = min(rows, key=lambda view: (rows[view]["p_holm"], -rows[view]["auc"]["value"]))
    row = rows[name]
    return {"name": name, "auc": row["auc"], "p": row["p"], "p_holm": row["p_holm"], "method": CORRECTION,
            "alpha": ALPHA, "separates": row["p_holm"] < ALPHA}
