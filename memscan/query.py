"""`memscan query`: nearest-neighbour tables, assumption tests, energies and the cross-entropy floor.

For every layer the dataset holds (the index's layer through the index, the others by
exact blockwise search) it runs the self-join of the patterns and the kNN of the
queries, then writes `neighbours`, `queries`, `patterns`, `histograms` and `coverage`
tables and `summary.json` into the run folder. The query split is held in memory; the
patterns are streamed. summary.json, written last and signed (`self_sha256`), lists every
table with its size and sha256: a folder whose summary does not vouch for its tables is
an incomplete run. Queries from the index's own dataset and split leave their own row out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memscan import analysis, files, store, theory
from memscan.errors import DataError, InputError
from memscan.knn import exact
from memscan.knn.index import DEVICES, KnnIndex, at_least, dataset_blocks, manifest_sha256

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "memscan.run", 2   # 2: tables checksummed, the summary signed
SUMMARY = "summary.json"
TABLES = ("neighbours", "queries", "patterns", "histograms", "coverage")
TABLE_FILES = tuple(f"{name}.parquet" for name in TABLES)
STEPS = ("patterns", "self-join", "searches", "inner-product join", "energies", "retrieval", "subsets")
RETRIEVAL_CHUNK = 1024  # queries whose k neighbour vectors are gathered at once


def _positive_finite(flag: str, value: float, given: Any = None) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be positive and finite; got {value if given is None else given}")


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
        """Every value against its range, once, naming the flag: NaN and Inf are refused."""
        for flag, value, minimum in (("--k", self.k, 1), ("--max-steps", self.max_steps, 1),
                                     ("--bins", self.bins, 1), ("--seed", self.seed, 0)):
            at_least(flag, value, minimum)
        _positive_finite("--beta", self.beta)
        if self.epsilon is not None:
            _positive_finite("--epsilon", self.epsilon)
        if self.radius not in ("r*", "typical"):
            try:
                value = float(self.radius)
            except ValueError:
                raise InputError(f"--radius must be r*, typical or a positive number; got '{self.radius}'") from None
            _positive_finite("--radius", value, self.radius)
        if not self.subsets or not all(0 < fraction <= 1 for fraction in self.subsets):
            raise InputError(f"subsets must be fractions in (0, 1]; got {list(self.subsets)}")
        if self.device not in DEVICES:
            raise InputError(f"--device must be auto, cpu or gpu; got '{self.device}'")


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


@contextlib.contextmanager
def _step(progress: Any, layer: int, name: str) -> Iterator[None]:
    """One step of STEPS on the progress bar: named while it runs, counted when done."""
    progress.set_postfix_str(f"layer {layer}: {name}")
    yield
    progress.update()


def _search(index: KnnIndex, blocks: Any, layer: int, Xq: np.ndarray, query_ids: np.ndarray,
            settings: QuerySettings, leave_one_out: bool, progress: Any,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The patterns' self-join and the queries' kNN: (pattern ids (d,), Dp (d, k), Dq (nq, k), Iq (nq, k)).

    Through the index at its own layer (unless --exact), exactly elsewhere; `leave_one_out`
    excludes each query's own row (queries drawn from the indexed patterns themselves).
    """
    use_index = layer == index.info["dataset"]["layer"] and not settings.exact
    own = query_ids if leave_one_out else None
    with _step(progress, layer, "self-join"):
        pid, Dp, Ip = index.self_join(settings.k) if use_index else index.engine.self_join(blocks, settings.k)
    with _step(progress, layer, "searches"):
        if use_index:
            Dq, Iq = index.search(Xq, settings.k, own)
        else:
            _, Dq, Iq = index.engine.knn(iter([(query_ids, Xq)]), blocks, settings.k, exclude_self=leave_one_out)
    missing = int((Iq < 0).any(axis=1).sum() + (Ip < 0).any(axis=1).sum())
    if missing:
        raise InputError(f"the approximate index found fewer than k={settings.k} neighbours for {missing:,} vectors; "
                         "raise the index's nprobe / efSearch, lower --k, or pass --exact")
    return pid, Dp, Dq, Iq


def analyse_layer(index: KnnIndex, queries: store.ActivationDataset, layer: int, settings: QuerySettings,
                  leave_one_out: bool = False, progress: Any = None,
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """All tables and the summary of one layer; `progress` (a tqdm bar) advances once per step of STEPS."""
    from tqdm.auto import tqdm

    progress = progress if progress is not None else tqdm(disable=True)
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
    with _step(progress, layer, "patterns"):
        pmeta = _pattern_meta(patterns, pattern_split, layer)
        exact.check_rms(math.sqrt(float(pmeta["sq_norm"].mean())), f"split '{pattern_split}' at layer {layer}")
        exact.check_scale(Xq, f"the queries (split '{settings.split}' at layer {layer})")
    pid, Dp, Dq, Iq = _search(index, blocks, layer, Xq, qmeta["row_id"], settings, leave_one_out, progress)
    assert np.array_equal(pmeta["row_id"], pid)
    n, k, beta = patterns.n, settings.k, settings.beta
    s = np.sqrt(Dp[:, 0])
    q_near = np.sqrt(Dq[:, 0])

    # A3: disjoint balls and Ramsauer's separation (a maximum-inner-product self-join)
    r_star, typical = theory.unit_volume_radius(n), float(np.median(s) / 2)
    scale = float(np.median(s[s > 0])) if (s > 0).any() else 1.0  # spacing, for tolerances (duplicates give s = 0)
    radius = _radius(settings.radius, r_star, typical)
    with _step(progress, layer, "inner-product join"):
        _, Dip, _ = index.engine.self_join(blocks, 1, metric="ip")
    delta = theory.ramsauer_separation(pmeta["sq_norm"], Dip[:, 0])
    M = math.sqrt(pmeta["sq_norm"].max())
    threshold = theory.ramsauer_threshold(d, beta, M)

    # energies and retrieval (A1)
    with _step(progress, layer, "energies"):
        lower, upper = theory.energy_interval(Dq.astype(np.float64), d, beta)  # certified when the k are exact
        mchn = analysis.mchn_combine(Xq, index.engine.map_blocks(analysis.mchn_partial, blocks, Xq, beta), beta)
    epsilon = settings.epsilon or 0.01 * scale
    converged, steps, retrieved = (np.zeros(len(Xq), bool), np.zeros(len(Xq), np.int32), np.zeros(len(Xq), bool))
    with _step(progress, layer, "retrieval"):
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
    with _step(progress, layer, "subsets"):
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
    approximate = use_index and not index.exact
    summary = {
        "layer": layer, "n": n, "d": d, "d_prime": len(Xq), "k": k,
        "search": ("approximate: " + index.info["factory"] + f" {index.info['search']}") if approximate else "exact",
        "recall": (index.info["recall"] or index.recall(200, k, settings.seed)) if approximate else None,
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


def queries_are_patterns(index: KnnIndex, queries_dir: str | Path, split: str) -> bool:
    """Whether the queries are the indexed patterns themselves: the same dataset (manifest sha256) and split."""
    built = index.info["dataset"]
    return split == built["split"] and manifest_sha256(Path(queries_dir)) == built["manifest_sha256"]


def run(index_dir: str | Path, queries_dir: str | Path, out_dir: str | Path,
        settings: QuerySettings = QuerySettings(), ray_options: Any = None,
        allow_other_files: bool = False) -> dict[str, Any]:
    """Analyse every layer shared by the index's dataset and the queries; returns summary.json.

    The job holds `out_dir` (one job at a time) and refuses files memscan did not write
    there unless `allow_other_files`. With `ray_options` (memscan.engines.ray_runner.RayOptions)
    the index shards sit in Ray actors and the exact searches run as Ray tasks; the tables
    are the same.
    """
    from tqdm.auto import tqdm

    settings.check()
    out_dir = Path(out_dir)
    with files.job_folder(out_dir):
        if not allow_other_files:
            files.refuse_foreign(out_dir, _ours)
        index = KnnIndex.load(index_dir, device=settings.device, ray_options=ray_options)
        queries = store.ActivationDataset(queries_dir)
        index.check_queries(queries)
        leave_one_out = queries_are_patterns(index, queries_dir, settings.split)
        if leave_one_out:
            log.info("the queries are the indexed patterns (split '%s'): each leaves its own row out", settings.split)
        layers = [layer for layer in index.dataset.layers if layer in queries.layers]
        with tqdm(total=len(layers) * len(STEPS), desc="query", unit="step", disable=None) as progress:
            results = [analyse_layer(index, queries, layer, settings, leave_one_out, progress) for layer in layers]
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "index": str(Path(index_dir).resolve()),
                  "queries": str(Path(queries_dir).resolve()), "settings": asdict(settings),
                  "queries_are_patterns": leave_one_out,
                  "index_info": {key: index.info[key] for key in ("factory", "metric", "n", "ntotal", "search",
                                                                   files.SELF_SHA256)}}
        return _write(out_dir, results, header)


def _write(out_dir: Path, results: list[tuple[dict[str, Any], dict[str, Any]]], header: dict[str, Any],
           ) -> dict[str, Any]:
    """The tables, then the signed summary listing them; the old summary goes first, so a run killed
    (or out of disk) while writing leaves no summary vouching for a mix of old and new tables."""
    (out_dir / SUMMARY).unlink(missing_ok=True)
    files.fsync_directory(out_dir)
    entries = []
    for name, path in zip(TABLES, TABLE_FILES):
        columns = {column: np.concatenate([np.asarray(tables[name][column]) for tables, _ in results])
                   for column in results[0][0][name]}
        entries.append(store.write_table(out_dir / path, columns))
    summary = files.signed(analysis.finite_or_none({**header, "tables": entries, "layers": [s for _, s in results]}))
    files.write_json_atomic(out_dir / SUMMARY, summary)
    return summary


def _ours(name: str) -> bool:
    """A name memscan writes in a run folder: the tables, the summary, the report's files, their temporaries."""
    from memscan import report

    base = name.removesuffix(files.TMP_SUFFIX)
    return base in (*TABLE_FILES, SUMMARY) or report.owns(base)


# ---------------------------------------------------------------- reading a run folder


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json, refused in one line unless it is a signed record of this format of sound shape."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY
    if not path.exists():
        if any((run_dir / name).exists() or files.tmp_path(run_dir / name).exists() for name in TABLE_FILES):
            raise DataError(f"'{run_dir}' holds an incomplete run (no {SUMMARY} vouches for its tables): "
                            "rerun `memscan query`")
        raise DataError(f"'{run_dir}' is not a memscan run folder: it has no {SUMMARY} (run `memscan query`)")
    summary = files.read_record(path, "memscan run", {"format": str, "format_version": int})
    if summary["format"] != FORMAT:
        raise DataError(f"{path} is not a memscan run summary (format '{summary['format']}')")
    if summary["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path} has format version {summary['format_version']}; this memscan reads version "
                        f"{FORMAT_VERSION} (earlier runs carry no checksums): rerun `memscan query`")
    files.check_signature(summary, path)
    _check_shape(summary, path)
    return summary


def _check_shape(summary: dict[str, Any], path: Path) -> None:
    """Every field that loading and the report use, of its type (the signature says memscan wrote it)."""
    fields = {"index": str, "queries": str, "settings": dict, "queries_are_patterns": bool, "tables": list,
              "layers": list}
    for key, kinds in fields.items():
        files.require(summary, key, kinds, path)
    for key, kinds in {"split": str, "k": int, "beta": (int, float)}.items():
        files.require(summary["settings"], key, kinds, path)
    for entry in summary["tables"]:
        if not isinstance(entry, dict):
            raise DataError(f"{path}: a table entry must be an object; got {entry!r:.60}")
        files.plain_name(files.require(entry, "name", str, path), path)
        files.require(entry, "bytes", int, path)
        files.require(entry, "sha256", str, path)
    if sorted(entry["name"] for entry in summary["tables"]) != sorted(TABLE_FILES):
        raise DataError(f"{path} lists the tables {[e['name'] for e in summary['tables']]}; "
                        f"a run has {list(TABLE_FILES)}")
    if not summary["layers"]:
        raise DataError(f"{path} lists no layers")
    for layer in summary["layers"]:
        if not isinstance(layer, dict):
            raise DataError(f"{path}: a layer's summary must be an object; got {layer!r:.60}")
        for key, kinds in {"layer": int, "r_star": (int, float), "typical_radius": (int, float)}.items():
            files.require(layer, key, kinds, path)


def verify(run_dir: str | Path) -> list[str]:
    """Every problem found in a run folder: its summary, and each table's size and sha256."""
    try:
        summary = read_summary(run_dir)
    except DataError as exc:
        return [str(exc)]
    problems = [files.file_problem(Path(run_dir), entry, "table") for entry in summary["tables"]]
    return [problem for problem in problems if problem]


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
    """Open a `memscan query` run folder for analysis in pandas, every table checked against its summary entry."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    paths = {entry["name"]: files.check_file(run_dir, entry, "table") for entry in summary["tables"]}
    return RunTables(summary, *(store.read_table(paths[name]).to_pandas() for name in TABLE_FILES))
