"""`memscan query` end to end: every (site, layer) analysed step by step, its rows streamed to the tables and
its `LayerSummary` gathered, the run committed under the signed summary.json (`run`)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import memscan.store as store
from memscan import analysis, files, folders
from memscan.errors import InputError
from memscan.knn.index import KnnIndex, manifest_sha256
from memscan.knn.shards import Engine
from memscan.query import checks, coverage, distances, floor, retrieval, separation, subsets
from memscan.query.context import STEPS, Layer, open_layer, step
from memscan.query.folder import TABLE_FILES, QueryResult, Sink, commit, site_sink, table_writers
from memscan.query.settings import QuerySettings
from memscan.query.summary import BlockSummary, LayerSummary

log = logging.getLogger(__name__)


def _layer_summary(layer: Layer, patterns: distances.PatternMeta, checked: checks.Checked, radii: distances.Radii,
                   separated: separation.Separation, parts: list[subsets.SubsetNearest],
                   totals: retrieval.QueryTotals, query_blocks: int, seconds: float) -> LayerSummary:
    """The layer's summary, each part from the family of statistics that measured it."""
    settings, index, blocks = layer.settings, layer.index, layer.blocks
    joined, mips = checked.joined, checked.mips
    nearest = np.concatenate(totals.nearest)
    a2, a3 = coverage.covered(nearest, radii), separation.separated(joined, radii, separated)
    return LayerSummary(
        site=layer.patterns.site, layer=layer.layer, n=layer.patterns.n, d=layer.d, d_prime=layer.nq, k=settings.k,
        search=f"approximate: {index.factory} {index.search_params}" if layer.approximate else "exact",
        recall=checked.recall,
        query_nearest_dist=analysis.describe(nearest), pattern_nearest_dist=analysis.describe(joined.s),
        r_star=radii.r_star, typical_radius=radii.typical, typical_over_r_star=radii.typical / radii.r_star,
        radius=radii.choice(settings.radius), A2=a2, A3=a3,
        A1=totals.retrieved(radii.epsilon, analysis.nan_mean(patterns.nll)), energy=totals.energy(settings.beta, mips),
        floor=floor.floor(layer, joined, checked.verified, totals.test_loss, a2, a3), size=floor.size(layer),
        subsets=tuple(part.summary() for part in parts),
        blocks=BlockSummary(settings.memory, blocks.memory_bytes, blocks.pattern_rows, blocks.query_rows,
                            blocks.join_rows, blocks.knn_rows, query_blocks),
        seconds=seconds)


def _last_tables(layer: Layer, sink: Sink, patterns: distances.PatternMeta, joined: distances.SelfJoin,
                 radii: distances.Radii, separated: separation.Separation, parts: list[subsets.SubsetNearest],
                 nearest: np.ndarray) -> None:
    """The layer's rows of the patterns, histograms and coverage tables, once its queries are done."""
    sink("patterns", separation.pattern_rows(layer, patterns, joined, radii, separated))
    samples = {"query_nearest": nearest}
    for fraction in layer.settings.subsets:
        samples[f"pattern_nearest_{round(100 * fraction)}"] = next(
            (part.values for part in parts if part.fraction == fraction), joined.s)
    sink("histograms", distances.histogram_rows(layer, samples))
    sink("coverage", coverage.coverage_rows(layer, nearest, radii.radius))


def analyse_layer(index: KnnIndex, queries: store.ActivationDataset, layer: int, settings: QuerySettings,
                  sink: Sink, leave_one_out: bool = False, progress: Any = None,
                  patterns: store.ActivationDataset | None = None) -> LayerSummary:
    """One layer's pipeline: its rows go to `sink` (table name, columns), its summary is returned.

    `queries` and `patterns` (None: the index's dataset) are opened at the same site;
    `progress` (a tqdm bar) advances once per step of STEPS.
    """
    progress = progress if progress is not None else tqdm(disable=True)
    started = time.perf_counter()
    context = open_layer(index, queries, layer, settings, leave_one_out, patterns)
    with step(progress, layer, "patterns"):
        meta = distances.pattern_meta(context)
    with step(progress, layer, "self-join"):
        checked = checks.checked(context, meta, distances.self_join(context, meta))
    joined = checked.joined
    radii = distances.radii(context, joined)
    with step(progress, layer, "inner-product join"):
        separated = separation.separation(context, meta, checked.mips, checked.through_join)
    with step(progress, layer, "subsets"):
        parts = subsets.nearest_within(context, meta, joined, [part for part in settings.subsets if part < 1])
    totals, query_blocks = retrieval.stream_queries(context, meta, radii, checked.mips, sink, progress)
    _last_tables(context, sink, meta, joined, radii, separated, parts, np.concatenate(totals.nearest))
    summary = _layer_summary(context, meta, checked, radii, separated, parts, totals, query_blocks,
                             seconds=round(time.perf_counter() - started, 3))
    log.info("layer %d: %d patterns, %d queries in %d blocks, typical radius %.3g vs r* %.3g (%.1f s)",
             layer, context.d, context.nq, query_blocks, radii.typical, radii.r_star, summary.seconds)
    return summary


def queries_are_patterns(index: KnnIndex, queries_dir: str | Path, split: str) -> bool:
    """Whether the queries are the indexed patterns themselves: the same dataset (manifest sha256) and split."""
    return split == index.split and manifest_sha256(Path(queries_dir)) == index.manifest_sha256


def _site_pairs(index: KnnIndex, queries: store.ActivationDataset, queries_dir: str | Path, sites: str | None,
                ) -> list[tuple[store.ActivationDataset, store.ActivationDataset, list[int]]]:
    """(patterns, queries, shared layers) per site to analyse: the index's own, then --sites (`all`: every site
    both datasets hold), in the patterns dataset's order."""
    own = index.site
    stored = index.dataset.sites
    wanted = [own] if sites is None else stored if sites == "all" else [name.strip() for name in sites.split(",")]
    unknown = [name for name in wanted if name not in stored]
    if unknown:
        raise InputError(f"--sites: '{unknown[0]}' is not in the index's dataset (sites: {', '.join(stored)})")
    chosen = [name for name in stored if name in wanted or name == own]
    if sites == "all":
        chosen = [name for name in chosen if name in queries.sites]
    pairs = []
    for name in chosen:
        patterns = index.dataset if name == own else store.ActivationDataset(index.dataset.directory, name)
        site_queries = queries if name == own else store.ActivationDataset(queries_dir, name)
        pairs.append((patterns, site_queries, [layer for layer in patterns.layers if layer in site_queries.layers]))
    return pairs


def _header(index: KnnIndex, index_dir: str | Path, queries_dir: str | Path, settings: QuerySettings,
            identity: str, leave_one_out: bool) -> dict[str, Any]:
    """summary.json's fields before its tables and layers: what was queried, how, against which index."""
    return {"fingerprint": identity, "index": str(Path(index_dir).resolve()),
            "queries": str(Path(queries_dir).resolve()), "settings": asdict(settings),
            "queries_are_patterns": leave_one_out, "site": index.site,
            "index_info": {"factory": index.factory, "metric": index.metric, "n": index.n, "ntotal": index.ntotal,
                           "search": index.search_params, files.SELF_SHA256: index.self_sha256}}


def run(index_dir: str | Path, queries_dir: str | Path, out_dir: str | Path,
        settings: QuerySettings = QuerySettings(), engine: Engine | None = None,
        overwrite: bool = False, allow_other_files: bool = False) -> QueryResult:
    """Analyse every layer shared by the index's dataset and the queries; returns the run (summary.json).

    Layers are those of the index's site, and with `settings.sites` those of other sites too
    (searched exactly: the index holds one site and layer); every table gets a `site` column.
    The job holds `out_dir` (one job at a time) and claims it by the folder model's rules
    (memscan.folders.claim): the same query finds its finished run and returns it, another
    needs `overwrite`, files memscan did not write need `allow_other_files` and stay untouched.
    `engine` (default: this process) holds the index's shards
    and runs the exact searches; with `ray_runner.RayEngine` the shards sit in Ray actors and
    the exact searches run as Ray tasks; the tables are the same.
    """
    settings.check()
    out_dir = Path(out_dir)
    with files.job_folder(out_dir):
        index = KnnIndex.load(index_dir, device=settings.device, engine=engine)
        queries = index.open_queries(queries_dir)
        index.check_queries(queries)
        identity = folders.job_fingerprint(settings=asdict(settings), index=index.self_sha256,
                                           queries=manifest_sha256(Path(queries_dir)))
        claimed = folders.claim(out_dir, folders.QUERY_RUN, TABLE_FILES, identity, overwrite=overwrite,
                                allow_other_files=allow_other_files)
        if claimed.done:
            log.info("%s already holds this query's finished run", out_dir)
            return QueryResult(out_dir, claimed.previous)
        leave_one_out = queries_are_patterns(index, queries_dir, settings.split)
        if leave_one_out:
            log.info("the queries are the indexed patterns (split '%s'): each leaves its own row out", settings.split)
        pairs = _site_pairs(index, queries, queries_dir, settings.sites)
        with table_writers(out_dir) as writers:
            with tqdm(total=sum(len(layers) for _, _, layers in pairs) * len(STEPS), desc="query", unit="step",
                      disable=None) as progress:
                layers = [analyse_layer(index, site_queries, layer, settings, site_sink(writers, patterns.site),
                                        leave_one_out, progress, patterns).to_json()
                          for patterns, site_queries, layers in pairs for layer in layers]
            header = _header(index, index_dir, queries_dir, settings, identity, leave_one_out)
            return QueryResult(out_dir, commit(out_dir, writers, header, layers, claimed.previous))
