"""`memscan extract`: stream chunks through a model and store their activations as shards.

Rows are ordered by chunk (doc_id, chunk_id), then layer, then position, and numbered
densely from 0. The engine passed in plans the chunks and runs the model; ordering and
writing stay here, so every engine writes the same bytes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import platform
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import torch
import transformers

from memscan import corpus, files, models, preflight, store
from memscan.engines.capture import CapturePool, CaptureSpec, OpenedModel
from memscan.engines.knn import Engine, LocalEngine
from memscan.engines.planning import ChunkPlan
from memscan.errors import InputError
from memscan.extract.inputs import Inputs
from memscan.extract.output import clear_output, prepare_output, remove_unlisted
from memscan.extract.result import ExtractResult
from memscan.extract.resume import BatchKey, DatasetWriters, ResumePoint, RowLayout
from memscan.extract.settings import ExtractSettings, fingerprints, resolve_layers, settings_record
from memscan.extract.targets import plan_targets, site_records
from memscan.extract.writing import batched, prefetch
from memscan.layout import parse_positions
from memscan.progress import progress
from memscan.version import __version__

log = logging.getLogger(__name__)


def extract(settings: ExtractSettings, out: str | Path, overwrite: bool = False, allow_other_files: bool = False,
            engine: Engine | None = None, *, model: Any = None, tokenizer: Any = None, source: Any = None,
            ) -> ExtractResult:
    """Run (or resume, or find complete) one extraction into `out`; returns its folder and manifest.

    The job holds `out` (an exclusive lock) from start to end. `engine` (None: LocalEngine())
    plans the chunks and runs the model; its name is recorded in the manifest, and a dataset
    begun on one engine resumes on any other. `model` and `tokenizer` (a loaded transformers
    model, run where it is, local engine only) and `source` (a list of strings, a datasets.Dataset
    or IterableDataset) take the place of `settings.model` and `settings.source` (`Inputs`).
    """
    engine = engine or LocalEngine()
    inputs = Inputs(model, tokenizer, source)
    settings.check()
    inputs.check(engine)
    if model is None:
        engine.check_model(settings.model_request())
    with files.job_folder(Path(out)) as folder:
        return ExtractResult(folder, _extract_into(folder, settings, engine, overwrite, allow_other_files, inputs))


@dataclass(frozen=True)
class Job:
    """One extraction resolved: the model where the engine runs it, the source and its split rule, the rows each
    chunk stores, and the dataset's identity."""

    settings: ExtractSettings
    model: OpenedModel
    source: corpus.Source
    rule: corpus.SplitRule
    layout: RowLayout
    identity: dict[str, Any]

    @property
    def dtype_name(self) -> str:
        return models.dtype_name(self.model.dtype)

    def capture_spec(self) -> CaptureSpec:
        """What the engine's capture pool runs for every batch."""
        return CaptureSpec(self.settings.model_request(), str(self.model.device), self.dtype_name,
                           self.layout.targets, self.layout.positions, self.settings.loss)


def _extract_into(out: Path, settings: ExtractSettings, engine: Engine, overwrite: bool,
                  allow_other_files: bool, inputs: Inputs) -> dict[str, Any]:
    """`extract` in a folder this job holds: plan, resume point, writers, loop."""
    job = _resolve(settings, engine, inputs)
    settings = job.settings
    accepted = fingerprints(job.identity, job.rule)
    manifest, replaced = prepare_output(out, accepted, overwrite, allow_other_files)
    if manifest is not None and manifest["complete"]:
        log.info("%s is already complete", out)
        return manifest
    plan = engine.plan(job.source, job.rule, settings.chunk_request(), job.model.loaded.tokenizer)
    chunks, total_chunks = _checked_chunks(plan, job)
    estimate = preflight.estimate(total_chunks, job.layout.widths, len(job.layout.positions), job.layout.vec_dtype,
                                  settings.chunk_tokens, settings.shard_rows, settings.loss)
    preflight.check_space(out, estimate, manifest, freed=sum((out / name).lstat().st_size for name in replaced))
    clear_output(out, replaced)
    manifest = _begun(out, job, manifest, accepted[0], engine)
    point = ResumePoint.of(manifest, settings.batch_size, settings.shard_rows)
    if point.rows_done or point.chunks_done:
        log.info("resuming %s after %d shards (%d rows) and %d chunks of the per-chunk table", out,
                 len(manifest["shards"]), point.rows_done, point.chunks_done)
    writers = DatasetWriters(out, manifest, point, job.layout, settings.shard_rows, job.model.loaded.tokenizer)
    clock = preflight.FirstBatchClock(point.batches(total_chunks), settings.batch_size)
    pool = engine.capture_pool(job.capture_spec(), job.model, writers.write, clock)
    try:
        chunk_counts = _run_batches(chunks, point, pool, total_chunks)
        if total_chunks is None:
            _check_labels(job.rule, plan.tally, chunk_counts)
    except BaseException:
        writers.abort()
        raise
    finally:
        pool.close()
    writers.close()
    return _finished(out, manifest, chunk_counts, plan.stats)


def _resolve(settings: ExtractSettings, engine: Engine, inputs: Inputs) -> Job:
    """The source, the model opened by `engine` (or the caller's), what each chunk stores, and the identity they
    make."""
    rule = settings.split_rule()
    source = inputs.open_source(settings, rule)
    model = inputs.open_model(settings, engine)
    settings = inputs.named(settings, model, source)
    loaded = model.loaded
    if loaded.context_length and settings.chunk_tokens > loaded.context_length:
        raise InputError(f"--chunk-tokens {settings.chunk_tokens} is longer than the model's context of "
                         f"{loaded.context_length} tokens")
    layers = resolve_layers(settings)
    targets = plan_targets(layers, settings.sites, loaded)
    if not targets:
        raise InputError("--layers none stores nothing: name --sites, or --layers to store")
    positions = parse_positions(settings.positions, settings.chunk_tokens)
    vec_dtype = settings.vec_dtype if settings.vec_dtype != "auto" else (
        "float32" if model.dtype == torch.float32 else "float16")
    layout = RowLayout(targets, models.target_widths(loaded.model, targets), positions, vec_dtype)
    resolved = replace(settings, dtype=models.dtype_name(model.dtype), device=str(model.device), vec_dtype=vec_dtype,
                       layers=layers, split=corpus.resolve_split(settings.source, settings.split))
    identity = {"settings": settings_record(resolved), "model": loaded.info, "source": source.describe()}
    return Job(settings, model, source, rule, layout, identity)


def _checked_chunks(plan: ChunkPlan, job: Job) -> tuple[Iterable[corpus.Chunk], int | None]:
    """The plan's chunks and how many (None: a stream), refused when there are none or fewer than --num-chunks;
    a sample's labels are checked here, a stream's once it is read."""
    settings = job.settings
    if settings.num_chunks is None:
        stream = iter(plan.chunks)
        first = next(stream, None)
        if first is None:
            raise _no_chunk_error(settings.source, plan.stats, settings.chunk_tokens)
        return itertools.chain([first], stream), None
    sample = list(plan.chunks)
    if not sample:
        raise _no_chunk_error(settings.source, plan.stats, settings.chunk_tokens)
    if len(sample) < settings.num_chunks:
        raise InputError(f"--num-chunks {settings.num_chunks:,} is more than the {len(sample):,} chunks of "
                         f"{settings.chunk_tokens} tokens in the corpus; lower it, or omit it to take all")
    _check_labels(job.rule, plan.tally, dict(collections.Counter(chunk.split for chunk in sample)))
    return sample, len(sample)


def _begun(out: Path, job: Job, manifest: dict[str, Any] | None, fingerprint: str, engine: Engine) -> dict[str, Any]:
    """The manifest to resume, or a new one written now; its settings record the engine that writes on (outside
    the fingerprint: any engine resumes a dataset)."""
    if manifest is not None:
        manifest["settings"]["engine"] = engine.name   # written with the next file the run lists
        return manifest
    settings, layout, identity = job.settings, job.layout, job.identity
    manifest = store.new_manifest(
        fingerprint=fingerprint, settings={**identity["settings"], "engine": engine.name}, model=identity["model"],
        source=identity["source"], positions=settings.positions, chunk_tokens=settings.chunk_tokens,
        dtype=job.dtype_name, vec_dtype=layout.vec_dtype, seed=settings.seed,
        rows_per_chunk=len(layout.targets) * len(layout.positions), versions=_versions(),
        split_rule=job.rule.describe(), chunk_table_chunks=store.chunk_table_chunks(settings.batch_size),
        sites=site_records(layout.targets, layout.widths))
    store.write_manifest(out, manifest)
    return manifest


def _run_batches(chunks: Iterable[corpus.Chunk], point: ResumePoint, pool: CapturePool[BatchKey],
                 total_chunks: int | None) -> dict[str, int]:
    """Every batch through `pool` (those with nothing left to write skipped); the chunks per split."""
    chunk_counts: dict[str, int] = {}
    bar = progress(total_chunks, "extract", "chunk")
    try:
        for b, batch in enumerate(prefetch(batched(chunks, point.batch_size))):
            for chunk in batch:
                chunk_counts[chunk.split] = chunk_counts.get(chunk.split, 0) + 1
            bar.update(len(batch))
            if point.wanted(b):
                pool.submit((b, batch), np.stack([c.tokens for c in batch]), np.stack([c.next_tokens for c in batch]))
        pool.finish()
    finally:
        bar.close()
    return chunk_counts


def _finished(out: Path, manifest: dict[str, Any], chunk_counts: dict[str, int],
              stats: corpus.CorpusStats) -> dict[str, Any]:
    """The manifest completed with its counts and written; files no manifest lists removed."""
    per_chunk = manifest["rows_per_chunk"]
    manifest["counts"] = {"chunks": dict(sorted(chunk_counts.items())),
                          "rows": {k: v * per_chunk for k, v in sorted(chunk_counts.items())}}
    manifest["corpus"] = stats.to_dict()
    remove_unlisted(out, manifest)
    manifest["complete"] = True
    manifest = store.write_manifest(out, manifest)
    log.info("extracted %d rows into %s", sum(manifest["counts"]["rows"].values()), out)
    return manifest


def _versions() -> dict[str, str]:
    return {"memscan": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__}


def _no_chunk_error(source: str, stats: corpus.CorpusStats, chunk_tokens: int) -> InputError:
    if stats.documents == 0:
        return InputError(f"--source '{source}' holds no documents")
    return InputError(f"no document of --source '{source}' has {chunk_tokens} tokens (the longest of "
                      f"{stats.documents:,} has {stats.longest_document_tokens:,}); lower --chunk-tokens")


def _check_labels(rule: corpus.SplitRule, tally: corpus.LabelTally, chunk_counts: dict[str, int]) -> None:
    """Once the whole source is read: every --members id matched a document, and the user's rule gave
    both classes (`chunk_counts`: chunks per split, of the sample when sampling)."""
    corpus.check_members_matched(rule, tally)
    corpus.check_both_classes(rule, chunk_counts)
