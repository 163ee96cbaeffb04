"""`memscan query`: nearest-neighbour tables, assumption tests, energies and the cross-entropy floor.

For every layer the dataset holds (the index's layer through the index, the others by
exact blockwise search) it runs the self-join of the patterns and the kNN of the
queries, then writes `neighbours`, `queries`, `patterns`, `histograms` and `coverage`
tables and `summary.json` into the run folder. The query split is held in memory; the
patterns are streamed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memscan import analysis, files, store, theory
from memscan.errors import DataError, InputError
from memscan.knn import exact
from memscan.knn.index import KnnIndex, dataset_blocks

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "memscan.run", 1
SUMMARY = "summary.json"
TABLES = ("neighbours", "queries", "patterns", "histograms", "coverage")
RETRIEVAL_CHUNK = 1024  # queries whose k neighbour vectors are gathered at once


@dataclass(frozen=True)
class QuerySettings:
    """What `memscan query` computes (see `memscan query --help`)."""

    split: str = "test"
    k: int = 10
    exact: bool = False
    beta: float = 1.0
    radius: str = "r*"               # r* | typical | a positive number
    epsilon: float | None = None     # retrieval tolerance; None: 1% of the median nearest-other distance
    max_steps: int = 100
    bins: int = 50
    subsets: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0))
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        if self.k < 1:
            raise InputError(f"--k must be at least 1; got {self.k}")
        if not self.beta > 0:
            raise InputError(f"--beta must be positive; got {self.beta}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise InputError(f"--epsilon must be positive; got {self.epsilon}")
        if self.radius not in ("r*", "typical"):
            try:
                value = float(self.radius)
            except ValueError:
                raise InputError(f"--radius must be r*, typical or a positive number; got '{self.radius}'") from None
            if not value > 0:
                raise InputError(f"--radius must be positive; got {self.radius}")


def _columns(dataset: store.ActivationDataset, split: str, layer: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every vector and its row id, next token and loss, for one split and layer: (X, meta)."""
    blocks = list(dataset.iter_batches(split=split, layer=layer, columns=("row_id", "next_token_id", "nll")))
    if not blocks:
        return np.empty((0, dataset.n), np.float32), {"row_id": np.empty(0, np.int64)}
    return (np.concatenate([b[0] for b in blocks]),
            {name: np.concatenate([b[1][name] for b in blocks]) for name in blocks[0][1]})


def _pattern_meta(dataset: store.ActivationDataset, split: str, layer: int) -> dict[str, np.ndarray]:
    """Row id, next token, loss and squared norm of every pattern, streamed (vectors not kept)."""
    parts: dict[str, list[np.ndarray]] = {"row_id": [], "next_token_id": [], "nll": [], "sq_norm": []}
    for X, meta in dataset.iter_batches(split=split, layer=layer, columns=("row_id", "next_token_id", "nll")):
        for name in ("row_id", "next_token_id", "nll"):
            parts[name].append(meta[name])
        parts["sq_norm"].append(np.einsum("ij,ij->i", X.astype(np.float64), X.astype(np.float64)))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _radius(mode: str, r_star: float, typical: float) -> float:
    return r_star if mode == "r*" else typical if mode == "typical" else float(mode)


def _subset_nearest(blocks: Any, row_ids: np.ndarray, fraction: float, seed: int, engine: exact.Engine) -> np.ndarray:
    """Nearest-other distances within a seeded random `fraction` of the patterns (the paper's 25/50/75%)."""
    keep = np.zeros(len(row_ids), bool)
    keep[np.random.default_rng(seed).choice(len(row_ids), size=max(2, int(fraction * len(row_ids))), replace=False)] = True
    chosen = set(row_ids[keep].tolist())

    def subset():
        for ids, X in blocks():
            mask = np.fromiter((i in chosen for i in ids.tolist()), bool, len(ids))
            if mask.any():
                yield ids[mask], X[mask]
    _, D, _ = engine.self_join(subset, 1)
    return np.sqrt(D[:, 0])


def analyse_layer(index: KnnIndex, queries: store.ActivationDataset, layer: int,
                  settings: QuerySettings) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """All tables and the summary of one layer."""
    started = time.perf_counter()
    patterns, pattern_split = index.dataset, index.info["dataset"]["split"]
    blocks = dataset_blocks(patterns, pattern_split, layer)
    use_index = layer == index.info["dataset"]["layer"] and not settings.exact
    d = patterns.count(pattern_split, layer)
    if not settings.k <= d - 1:
        raise InputError(f"--k must be at most the {d - 1:,} patterns other than the query itself; got {settings.k:,}")
    Xq, qmeta = _columns(queries, settings.split, layer)
    if not len(Xq):
        raise InputError(f"split '{settings.split}' of '{queries.directory}' has no rows at layer {layer}")
    if use_index:
        pid, Dp, Ip = index.self_join(settings.k)
        Dq, Iq = index.search(Xq, settings.k)
    else:
        pid, Dp, Ip = index.engine.self_join(blocks, settings.k)
        _, Dq, Iq = index.engine.knn(iter([(qmeta["row_id"], Xq)]), blocks, settings.k)
    missing = int((Iq < 0).any(axis=1).sum() + (Ip < 0).any(axis=1).sum())
    if missing:
        raise InputError(f"the approximate index found fewer than k={k} neighbours for {missing:,} vectors; "
                         "raise the index's nprobe / efSearch, lower --k, or pass --exact")
    pmeta = _pattern_meta(patterns, pattern_split, layer)
    assert np.array_equal(pmeta["row_id"], pid)
    n, k, beta = patterns.n, settings.k, settings.beta
    s = np.sqrt(Dp[:, 0])
    q_near = np.sqrt(Dq[:, 0])

    # A3: disjoint balls and Ramsauer's separation (a maximum-inner-product self-join)
    r_star, typical = theory.unit_volume_radius(n), float(np.median(s) / 2)
    scale = float(np.median(s[s > 0])) if (s > 0).any() else 1.0  # spacing, for tolerances (duplicates give s = 0)
    radius = _radius(settings.radius, r_star, typical)
    _, Dip, _ = index.engine.self_join(blocks, 1, metric="ip")
    delta = theory.ramsauer_separation(pmeta["sq_norm"], Dip[:, 0])
    M = math.sqrt(pmeta["sq_norm"].max())
    threshold = theory.ramsauer_threshold(d, beta, M)

    # energies and retrieval (A1)
    lower, upper = theory.energy_interval(Dq.astype(np.float64), d, beta)  # certified when the k are exact
    mchn = analysis.mchn_combine(Xq, index.engine.map_blocks(analysis.mchn_partial, blocks, Xq, beta), beta)
    epsilon = settings.epsilon or 0.01 * scale
    converged, steps, retrieved = (np.zeros(len(Xq), bool), np.zeros(len(Xq), np.int32), np.zeros(len(Xq), bool))
    for start in range(0, len(Xq), RETRIEVAL_CHUNK):
        rows = slice(start, start + RETRIEVAL_CHUNK)
        neighbours = patterns.take(Iq[rows].ravel()).reshape(-1, k, n)
        converged[rows], steps[rows], retrieved[rows] = analysis.retrieval(
            Xq[rows], neighbours, beta, epsilon, tol=1e-6 * scale, max_steps=settings.max_steps)
    nearest_next = pmeta["next_token_id"][np.searchsorted(pid, Iq[:, 0])]
    next_match = (qmeta["next_token_id"] >= 0) & (nearest_next == qmeta["next_token_id"])

    # the partition function, the floor, the losses and the size condition
    log_z = theory.log_partition(n, s / 2)
    parameters, chunk_tokens = patterns.manifest["model"]["num_parameters"], patterns.manifest["chunk_tokens"]
    size = None  # imported vectors have no model or chunk length: the size condition does not apply
    if parameters and chunk_tokens:
        data_size, ratio = theory.size_ratio(parameters, chunk_tokens, d)
        size = {"N": parameters, "D": data_size, "N_over_D2": ratio, "chunk_tokens": chunk_tokens}
    train_loss, test_loss = analysis.nan_mean(pmeta["nll"]), analysis.nan_mean(qmeta["nll"])

    samples = {"query_nearest": q_near}
    for fraction in settings.subsets:
        samples[f"pattern_nearest_{round(100 * fraction)}"] = (
            s if fraction == 1.0 else _subset_nearest(blocks, pid, fraction, settings.seed, index.engine))
    bins = analysis.shared_bins(*samples.values(), count=settings.bins)  # subsets spread wider: bin them all
    histograms = {
        "layer": np.full(len(samples) * settings.bins, layer, np.int16),
        "table": np.repeat(list(samples), settings.bins),
        "bin_left": np.tile(bins[:-1], len(samples)), "bin_right": np.tile(bins[1:], len(samples)),
        "count": np.concatenate([analysis.histogram(values, bins) for values in samples.values()]),
    }
    radii = np.linspace(0, float(max(q_near.max(), 2 * radius)) * 1.05, 101)

    tables = {
        "neighbours": {"layer": np.full(Iq.size, layer, np.int16), "query_row_id": np.repeat(qmeta["row_id"], k),
                       "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(Iq)),
                       "neighbour_row_id": Iq.ravel(), "dist": np.sqrt(Dq).ravel(), "sqdist": Dq.ravel()},
        "queries": {"layer": np.full(len(Xq), layer, np.int16), "query_row_id": qmeta["row_id"],
                    "nearest_dist": q_near, "nearest_sqdist": Dq[:, 0], "energy_lower": lower,
                    "energy_upper": upper, "mchn_energy": mchn, "retrieval_converged": converged,
                    "retrieval_steps": steps, "retrieved": retrieved, "next_token_match": next_match,
                    "nll": qmeta["nll"], "inside_radius": q_near <= radius},
        "patterns": {"layer": np.full(d, layer, np.int16), "row_id": pid, "nearest_other_dist": s,
                     "disjoint_radius": s / 2, "ramsauer_delta": delta,
                     "well_separated_r_star": analysis.disjoint(s, r_star),
                     "well_separated_ramsauer": delta >= threshold},
        "histograms": histograms,
        "coverage": {"layer": np.full(len(radii), layer, np.int16), "radius": radii,
                     "coverage": analysis.coverage(q_near, radii)},
    }
    summary = {
        "layer": layer, "n": n, "d": d, "d_prime": len(Xq), "k": k,
        "search": ("approximate: " + index.info["factory"] + f" {index.info['search']}") if use_index and not index.exact
        else "exact",
        "recall": (index.info["recall"] or index.recall(200, k, settings.seed)) if use_index and not index.exact else None,
        "query_nearest_dist": analysis.describe(q_near), "pattern_nearest_dist": analysis.describe(s),
        "r_star": r_star, "typical_radius": typical, "typical_over_r_star": typical / r_star,
        "radius": {"mode": settings.radius, "value": radius},
        "A2": {"coverage_at_r_star": float(analysis.coverage(q_near, [r_star])[0]),
               "coverage_at_typical": float(analysis.coverage(q_near, [typical])[0]),
               "coverage_at_radius": float(analysis.coverage(q_near, [radius])[0])},
        "A3": {"disjoint_at_radius": float(analysis.disjoint(s, radius).mean()),
               "disjoint_at_r_star": float(analysis.disjoint(s, r_star).mean()),
               "ramsauer_well_separated": float((delta >= threshold).mean()),
               "ramsauer_threshold": threshold, "max_norm": M},
        "A1": {"retrieval_rate": float(retrieved.mean()), "converged_rate": float(converged.mean()),
               "epsilon": epsilon, "next_token_agreement": float(next_match.mean()),
               "train_loss": train_loss, "test_loss": test_loss,
               "loss_gap": None if train_loss is None or test_loss is None else test_loss - train_loss},
        "energy": {"beta": beta, "mean_lower": float(lower.mean()), "mean_upper": float(upper.mean()),
                   "mean_mchn": float(mchn.mean())},
        "floor": {"log_z": log_z, "predicted_floor": theory.cross_entropy_floor(log_z),
                  "measured_test_loss": test_loss},
        "size": size,
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("layer %d: %d patterns, %d queries, typical radius %.3g vs r* %.3g (%.1f s)",
             layer, d, len(Xq), typical, r_star, summary["seconds"])
    return tables, summary


def run(index_dir: str | Path, queries_dir: str | Path, out_dir: str | Path,
        settings: QuerySettings = QuerySettings(), ray_options: Any = None) -> dict[str, Any]:
    """Analyse every layer shared by the index's dataset and the queries; returns summary.json.

    With `ray_options` (memscan.engines.ray_runner.RayOptions) the index shards sit in Ray
    actors and the exact searches run as Ray tasks; the tables are the same.
    """
    settings.check()
    index = KnnIndex.load(index_dir, device=settings.device, ray_options=ray_options)
    queries = store.ActivationDataset(queries_dir)
    index.check_queries(queries)
    layers = [layer for layer in index.dataset.layers if layer in queries.layers]
    results = [analyse_layer(index, queries, layer, settings) for layer in layers]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        store.write_table(out_dir / f"{name}.parquet",
                          {column: np.concatenate([np.asarray(t[name][column]) for t, _ in results])
                           for column in results[0][0][name]})
    summary = {"format": FORMAT, "format_version": FORMAT_VERSION, "index": str(Path(index_dir).resolve()),
               "queries": str(Path(queries_dir).resolve()), "settings": asdict(settings),
               "index_info": {key: index.info[key] for key in ("factory", "metric", "n", "ntotal", "search")},
               "layers": [s for _, s in results]}
    files.write_json_atomic(out_dir / SUMMARY, summary)
    return summary


@dataclass
class RunTables:
    """A run folder's tables as pandas DataFrames, and its summary."""

    summary: dict[str, Any]
    neighbours: Any
    queries: Any
    patterns: Any
    histograms: Any
    coverage: Any


def load(run_dir: str | Path) -> RunTables:
    """Open a `memscan query` run folder for analysis in pandas."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).exists():
        raise DataError(f"'{run_dir}' is not a memscan run folder: it has no {SUMMARY} (run `memscan query`)")
    summary = json.loads((run_dir / SUMMARY).read_text())
    if summary.get("format") != FORMAT:
        raise DataError(f"{run_dir / SUMMARY} is not a memscan run summary")
    return RunTables(summary, *(store.read_table(run_dir / f"{name}.parquet").to_pandas() for name in TABLES))
