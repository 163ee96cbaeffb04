"""`memscan extract`: stream chunks through a model and store their activations as shards.

Rows are ordered by chunk (doc_id, chunk_id), then layer, then position, and numbered
densely from 0. Batches are aligned to fixed chunk ranges, so a resumed run recomputes
exactly the batches an uninterrupted run computes, and writes the same bytes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import platform
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from memscan import checks, corpus, files, folders, preflight, store
from memscan.layout import parse_layers, parse_positions
from memscan.errors import InputError, NonFiniteActivationsError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides an extraction's output (see `memscan extract --help`)."""

    model: str
    source: str
    num_chunks: int | None = None        # None: every chunk of the corpus
    max_documents: int | None = None     # None: the whole source; else its first N documents (a training run's prefix)
    chunk_tokens: int = 256              # the paper's T_max
    test_fraction: float = 0.1
    layers: str | None = None            # last | all | indices (negative from the end); None: last, or none with sites
    sites: str | None = None             # sites inside blocks and module outputs (memscan.sites), e.g. attn_out:0-5
    positions: str = "last"              # last | all | every:K
    dtype: str = "auto"                  # auto | bf16 | fp16 | fp32
    vec_dtype: str = "auto"              # auto (float16 for 16-bit models) | float16 | float32
    device: str = "auto"
    batch_size: int = 8
    shard_rows: int = 65536
    seed: int = 0
    loss: bool = True
    text_column: str = "text"
    split: str | None = None             # the split of an hf: dataset to read (None: "train"); other sources have none
    revision: str | None = None
    trust_remote_code: bool = False
    engine: str = "local"                # local | ray (same rows; part of the identity, so never mixed)
    split_column: str | None = None      # a source column naming membership (member/non-member, train/test, 1/0, ...)
    members: str | None = None           # a file of member document ids (or keys of key_column), one a line
    key_column: str | None = None        # the source column whose values the --members file lists
    device_map: str | None = None        # auto: accelerate spreads the model over the GPUs, CPU memory and disk
    max_memory: str | None = None        # with device_map: a budget per device, e.g. cpu=2GB,0=20GB

    def check(self) -> None:
        """Refuse out-of-range settings with one line that names the flag, the range and the value."""
        checks.at_least("--num-chunks", self.num_chunks, 1)
        checks.at_least("--max-documents", self.max_documents, 1)
        checks.at_least("--chunk-tokens", self.chunk_tokens, 1)
        checks.number("--test-fraction", self.test_fraction, 0, 1)
        checks.choice("--dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        checks.choice("--vec-dtype", self.vec_dtype, ("auto", *store.VEC_DTYPES))
        checks.at_least("--batch-size", self.batch_size, 1)
        checks.at_least("--shard-rows", self.shard_rows, 1)
        checks.at_least("--seed", self.seed, 0)
        checks.choice("--engine", self.engine, ("local", "ray"))
        checks.need(self.device_map in (None, "auto"),
                    f"--device-map must be auto (or left out); got '{self.device_map}'")
        checks.need(self.max_memory is None or self.device_map is not None, "--max-memory needs --device-map auto")
        checks.need(self.device_map is None or self.engine == "local",
                    "--device-map auto runs with --engine local (each Ray worker loads a whole model)")
        if self.max_memory is not None:
            from memscan import models

            models.parse_max_memory(self.max_memory)
        corpus.resolve_split(self.source, self.split)
        self.split_rule()

    def split_rule(self) -> corpus.SplitRule:
        """The rule that makes a document train or test: --split-column, --members, or the seeded hash."""
        return corpus.split_rule(self.split_column, self.members, self.key_column)


# Settings added after format version 1: out of the record while None.
ADDED_SETTINGS = ("sites", "device_map", "max_memory")


def settings_record(resolved: ExtractSettings) -> dict[str, Any]:
    """The resolved settings as the fingerprint and manifest hold them; a setting newer than a dataset is left
    out while unused (None), so datasets written before it still resume and compare equal."""
    record = asdict(resolved)
    return {key: value for key, value in record.items() if not (key in ADDED_SETTINGS and value is None)}


def resolve_layers(settings: ExtractSettings) -> str:
    """--layers as stored: given, or `last` (the paper's vector) unless --sites asks for other sites instead."""
    if settings.layers is not None:
        return settings.layers
    return "none" if settings.sites else "last"


def plan_targets(layers: str, site_spec: str | None, loaded: Any) -> list[Any]:
    """What each chunk stores, in row order: the residual stream at `layers` (`none`: not at all), then the
    --sites grouped by site name in the order first named, blocks ascending (one module: path per site)."""
    from memscan import models, sites

    targets = [] if layers == "none" else models.hidden_targets(parse_layers(layers, loaded.num_layers))
    if site_spec:
        hooked = sites.parse(site_spec, loaded.num_layers, loaded.model)
        names = list(dict.fromkeys(site_name(site) for site in hooked))
        hooked.sort(key=lambda site: (names.index(site_name(site)), -1 if site.block is None else site.block))
        targets += [models.Target(site_name(site), -1 if site.block is None else site.block, site) for site in hooked]
    return targets


def site_name(site: Any) -> str:
    """The `site` column's value: a block site's name, or `module:PATH`."""
    return site.label if site.block is None else site.name


def site_records(targets: list[Any], widths: list[int]) -> list[dict[str, Any]]:
    """The manifest's `sites`: {name, layers, n} per site, in row order."""
    records: dict[str, dict[str, Any]] = {}
    for target, width in zip(targets, widths):
        record = records.setdefault(target.site, {"name": target.site, "layers": [], "n": width})
        record["layers"].append(target.layer)
    return list(records.values())


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Run an iterator in a background thread, `depth` items ahead; its errors surface here."""
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((False, exc))

    threading.Thread(target=produce, daemon=True, name="memscan-prefetch").start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()


def batched(chunks: Iterable[corpus.Chunk], size: int) -> Iterator[list[corpus.Chunk]]:
    iterator = iter(chunks)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _versions() -> dict[str, str]:
    import pyarrow
    import torch
    import transformers

    from memscan import __version__

    return {"memscan": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__}


def prepare_output(out: Path, fingerprint: str, overwrite: bool, allow_other_files: bool = False,
                   ) -> tuple[dict[str, Any] | None, list[str]]:
    """(the manifest to resume from, or None for a fresh start in the (existing, locked) folder `out`;
    memscan's files a fresh start removes first, with `clear_output`).

    memscan's files here come from the manifest (memscan.folders' rule): manifest.json, the
    shards and per-chunk tables it lists, and while it records an extraction in progress the
    exact names that extraction writes next (part-NNNNN.parquet, chunks-NNNNN.parquet: a shard
    is whole on disk a moment before the manifest lists it); temporary names of those are
    scratch. A file of that name that no manifest vouches for is refused, always; anything else
    is refused unless `allow_other_files`, and is never removed. Another extraction is replaced
    only with `overwrite`. Nothing is removed here: a run refused before it writes (the
    preflight's space check) keeps what it would replace.
    """
    folders.refuse_links(out, [p.name for p in out.iterdir() if store.is_dataset_file(p.name)])
    manifest = store.read_manifest(out) if (out / store.MANIFEST).exists() else None
    listed = {entry["name"] for key in ("shards", "chunk_tables") for entry in (manifest or {}).get(key) or []}
    in_progress = manifest is not None and not manifest["complete"]

    def ours(name: str) -> bool:
        if (out / name).is_dir() or not store.is_dataset_file(name):
            return False
        return (name.endswith(files.TMP_SUFFIX) or (name == store.MANIFEST and manifest is not None)
                or name in listed or in_progress)

    named = [p.name for p in out.iterdir() if store.is_dataset_file(p.name) and not p.is_dir()]
    folders.refuse_in_the_way(out, [name for name in named if not name.endswith(files.TMP_SUFFIX)],
                              {name for name in named if ours(name)})
    if not allow_other_files:
        files.refuse_foreign(out, ours)
    if manifest is not None and manifest["fingerprint"] == fingerprint:
        return manifest, []
    if manifest is not None and not overwrite:
        raise InputError(f"--out '{out}' holds another extraction (different settings, model or data); "
                         "choose another folder or pass --overwrite")
    return None, sorted(p.name for p in out.iterdir() if ours(p.name))


def clear_output(out: Path, replaced: list[str]) -> None:
    """Remove the files `prepare_output` said a fresh start replaces (an old extraction: with a warning).

    An old manifest is first emptied (an extraction in progress that lists nothing): a removal
    cut short leaves no manifest listing missing shards, and what is left stays memscan's.
    """
    if store.MANIFEST in replaced:
        log.warning("--overwrite: removing the extraction in %s", out)
        old = store.read_manifest(out)
        emptied = {key: value for key, value in old.items() if key not in ("counts", "corpus")}
        store.write_manifest(out, {**emptied, "complete": False, "shards": [],
                                   "chunk_tables": None if old["chunk_tables"] is None else []})
    files.remove_owned(out, [name for name in replaced if name != store.MANIFEST])


def remove_unlisted(out: Path, manifest: dict[str, Any]) -> None:
    """Remove the shard-named files an extraction in progress owned but its finished manifest does not list
    (left by an earlier, longer start): once the manifest is complete they would be no one's."""
    listed = {entry["name"] for key in ("shards", "chunk_tables") for entry in manifest.get(key) or []}
    files.remove_owned(out, [p.name for p in out.iterdir() if store.is_dataset_file(p.name) and not p.is_dir()
                             and p.name != store.MANIFEST and p.name not in listed])


class BackgroundWriter:
    """Feeds a ShardWriter from a thread, so Parquet encoding and hashing overlap the forward pass."""

    _CLOSE, _ABORT = object(), object()

    def __init__(self, writer: store.ShardWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="memscan-writer")
        self._thread.start()

    def _run(self) -> None:
        """Write until CLOSE or ABORT; after a failure drop the shard in progress and only wait to be told."""
        while True:
            item = self._queue.get()
            if item is self._ABORT or (item is self._CLOSE and self._error is not None):
                self._abort_quietly()
                return
            if self._error is not None:
                continue
            try:
                if item is self._CLOSE:
                    self.writer.close()
                    return
                self.writer.write(item)
            except BaseException as exc:
                self._error = exc
                self._abort_quietly()
                if item is self._CLOSE:
                    return

    def _abort_quietly(self) -> None:
        try:
            self.writer.abort()
        except OSError:
            log.warning("could not remove the partial shard %s", self.writer.tmp_path)

    def put(self, table: Any) -> None:
        self._raise_if_failed()
        self._queue.put(table)

    def close(self) -> None:
        self._queue.put(self._CLOSE)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        self._queue.put(self._ABORT)
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _batch_table(batch: list[corpus.Chunk], vec: list[Any], nll: Any, targets: list[Any], positions: list[int],
                 first_row: int, table_schema: Any, vec_dtype: str) -> Any:
    """Rows of one batch, ordered (chunk, target, position), from one (B, P, n_target) tensor per target;
    refuses NaN/Inf activations."""
    import pyarrow as pa
    import torch

    stored = [v.to(getattr(torch, vec_dtype)) for v in vec]
    for target, raw, kept in zip(targets, vec, stored):
        _refuse_non_finite(batch, target, positions, raw, kept)
    n_chunks, n_positions = len(batch), len(positions)
    n_layers = len(targets)   # vector sets per chunk: (site, layer) pairs
    per_chunk = n_layers * n_positions
    widths = [v.shape[-1] for v in stored]
    values = torch.cat([v.reshape(n_chunks, -1) for v in stored], dim=1).cpu().numpy()   # (B, sum of P x n)
    names = list(dict.fromkeys(target.site for target in targets))
    site_codes = np.asarray([names.index(target.site) for target in targets], np.int16)
    tokens = np.stack([c.tokens for c in batch])[:, positions]           # (B, P)
    following = np.stack([c.next_tokens for c in batch])[:, positions]   # (B, P)
    losses = np.full(tokens.shape, np.nan, np.float32) if nll is None else np.asarray(
        nll.cpu() if hasattr(nll, "cpu") else nll, np.float32)

    def over_layers(per_position: np.ndarray) -> np.ndarray:             # (B, P) -> (B * L * P,)
        return np.broadcast_to(per_position[:, None, :], (n_chunks, n_layers, n_positions)).reshape(-1)

    columns = {
        "row_id": first_row + np.arange(n_chunks * per_chunk, dtype=np.int64),
        "doc_id": np.repeat([c.doc_id for c in batch], per_chunk),
        "chunk_id": np.repeat([c.chunk_id for c in batch], per_chunk),
        "position": np.tile(np.asarray(positions, np.int32), n_chunks * n_layers),
        "token_id": over_layers(tokens),
        "next_token_id": over_layers(following),
        "nll": over_layers(losses),
        "split": np.repeat([c.split for c in batch], per_chunk),
        "layer": np.tile(np.repeat(np.asarray([t.layer for t in targets], np.int16), n_positions), n_chunks),
        "site": pa.DictionaryArray.from_arrays(np.tile(np.repeat(site_codes, n_positions), n_chunks),
                                               pa.array(names, pa.string())),
    }
    row_widths = np.tile(np.repeat(widths, n_positions), n_chunks)
    return store.rows_table(columns, values if len(set(widths)) > 1 else values.reshape(-1, widths[0]),
                            table_schema, row_widths)


def _refuse_non_finite(batch: list[corpus.Chunk], target: Any, positions: list[int], raw: Any, kept: Any) -> None:
    """NonFiniteActivationsError naming the first bad row of one target's (B, P, n) vectors, as stored (`kept`)."""
    import torch

    finite = torch.isfinite(kept).all(dim=-1)                         # (B, P)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().tolist()
    b, p = bad[0]
    hint = " (they fit in float32: pass --vec-dtype float32)" if bool(torch.isfinite(raw[b, p]).all()) else ""
    where = "layer" if target.site == store.DEFAULT_SITE else f"site {target.site} block"
    raise NonFiniteActivationsError(
        f"the model produced NaN or Inf activations in {len(bad)} rows of chunks "
        f"{batch[0].doc_id}:{batch[0].chunk_id}-{batch[-1].doc_id}:{batch[-1].chunk_id}, first at doc "
        f"{batch[b].doc_id} chunk {batch[b].chunk_id} {where} {target.layer} position {positions[p]}{hint}; "
        "that batch was not written, earlier shards are kept")


def _chunk_rows(batch: list[corpus.Chunk], stats: Any) -> Any:
    """Per-chunk table rows of one batch (store.chunk_rows); stats (3, B, T) nll, mu, var or None (--no-loss)."""
    columns: dict[str, Any] = {
        "doc_id": np.array([c.doc_id for c in batch], np.int64),
        "chunk_id": np.array([c.chunk_id for c in batch], np.int64),
        "split": np.array([c.split for c in batch], object),
        "token_ids": np.stack([c.tokens for c in batch]),
        "next_token_id": np.array([c.next_tokens[-1] for c in batch], np.int32),
    }
    if stats is not None:
        values = stats.cpu().numpy()
        columns.update(zip(store.PER_TOKEN_COLUMNS, values))
    return store.chunk_rows(columns)


def _no_chunk_error(source: str, stats: corpus.CorpusStats, chunk_tokens: int) -> InputError:
    if stats.documents == 0:
        return InputError(f"--source '{source}' holds no documents")
    return InputError(f"no document of --source '{source}' has {chunk_tokens} tokens (the longest of "
                      f"{stats.documents:,} has {stats.longest_document_tokens:,}); lower --chunk-tokens")


def extract(settings: ExtractSettings, out: str | Path, overwrite: bool = False, allow_other_files: bool = False,
            ray_options: Any = None) -> dict[str, Any]:
    """Run (or resume, or find complete) one extraction into `out`; returns its manifest.

    The job holds `out` (an exclusive lock) from start to end. With `settings.engine == "ray"`
    planning runs in Ray tasks and the forward passes in Ray actors (`ray_options`:
    memscan.engines.ray_runner.RayOptions); ordering and writing stay here.
    """
    settings.check()
    if settings.engine == "ray" and ray_options is None:
        from memscan.engines.ray_runner import RayOptions

        ray_options = RayOptions()
    with files.job_folder(Path(out)) as folder:
        return _extract_into(folder, settings, overwrite, allow_other_files, ray_options)


def _extract_into(out: Path, settings: ExtractSettings, overwrite: bool, allow_other_files: bool,
                  ray_options: Any) -> dict[str, Any]:
    """`extract` in a folder this job holds."""
    import torch

    from memscan import models

    rule = settings.split_rule()
    source = corpus.open_source(settings.source, seed=settings.seed, text_column=settings.text_column,
                                split=settings.split, revision=settings.revision, label_column=rule.label_column)
    if settings.engine == "ray":  # the model runs in the actors: a worker resolves where, the driver loads no weights
        from memscan.engines import ray_runner

        device, dtype = ray_runner.resolve_on_workers(settings.device, settings.dtype, ray_options)
        loaded = models.describe(settings.model, settings.revision, settings.trust_remote_code)
    else:
        device = models.resolve_device(settings.device)
        dtype = models.resolve_dtype(settings.dtype, device)
        loaded = models.load(settings.model, dtype=dtype, device=device, revision=settings.revision,
                             trust_remote_code=settings.trust_remote_code, device_map=settings.device_map,
                             max_memory=models.parse_max_memory(settings.max_memory))
    if loaded.context_length and settings.chunk_tokens > loaded.context_length:
        raise InputError(f"--chunk-tokens {settings.chunk_tokens} is longer than the model's context of "
                         f"{loaded.context_length} tokens")
    layers = resolve_layers(settings)
    targets = plan_targets(layers, settings.sites, loaded)
    if not targets:
        raise InputError("--layers none stores nothing: name --sites, or --layers to store")
    widths = models.target_widths(loaded.model, targets)
    positions = parse_positions(settings.positions, settings.chunk_tokens)
    dtype_name = models.dtype_name(dtype)
    vec_dtype = settings.vec_dtype if settings.vec_dtype != "auto" else (
        "float32" if dtype == torch.float32 else "float16")
    resolved = replace(settings, dtype=dtype_name, device=str(device), vec_dtype=vec_dtype, layers=layers,
                       split=corpus.resolve_split(settings.source, settings.split))
    identity = {"settings": settings_record(resolved), "model": loaded.info, "source": source.describe()}
    fingerprint = files.fingerprint({**identity, "split_rule": rule.describe()})
    manifest, replaced = prepare_output(out, fingerprint, overwrite, allow_other_files)
    if manifest is not None and manifest["complete"]:
        log.info("%s is already complete", out)
        return manifest

    stats = corpus.CorpusStats()
    tally = corpus.LabelTally()
    chunks: Iterable[corpus.Chunk]
    if settings.engine == "ray":  # planned by Ray tasks, one per piece of the source, streamed in order
        labelled = source if rule.kind == "hash" else corpus.LabeledSource(source, rule)
        chunks, stats = ray_runner.plan(labelled, settings, ray_options)
        if rule.kind == "members":  # the planning tasks' tallies stay on the workers: count here
            for _ in corpus.label_documents(itertools.islice(source.documents(), settings.max_documents), rule, tally):
                pass
    else:
        documents = corpus.label_documents(itertools.islice(source.documents(), settings.max_documents), rule, tally)
        chunks = corpus.iter_chunks(documents, loaded.tokenizer, settings.chunk_tokens, settings.test_fraction,
                                    settings.seed, stats)
        if settings.num_chunks is not None:
            chunks = corpus.sample_chunks(chunks, settings.num_chunks)
    total_chunks = None
    if settings.num_chunks is not None:
        if not chunks:
            raise _no_chunk_error(settings.source, stats, settings.chunk_tokens)
        if len(chunks) < settings.num_chunks:
            raise InputError(f"--num-chunks {settings.num_chunks:,} is more than the {len(chunks):,} chunks of "
                             f"{settings.chunk_tokens} tokens in the corpus; lower it, or omit it to take all")
        total_chunks = len(chunks)
        _check_labels(rule, tally, dict(collections.Counter(chunk.split for chunk in chunks)))
    else:
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            raise _no_chunk_error(settings.source, stats, settings.chunk_tokens)
        chunks = itertools.chain([first], chunks)

    plan = preflight.estimate(total_chunks, widths, len(positions), vec_dtype, settings.chunk_tokens,
                              settings.shard_rows, settings.loss)
    preflight.check_space(out, plan, manifest, freed=sum((out / name).lstat().st_size for name in replaced))
    clear_output(out, replaced)

    # Both engines write the per-chunk table; a dataset begun without one (chunk_tables null) is resumed without.
    with_table = manifest is None or manifest["chunk_tables"] is not None
    if manifest is None:
        manifest = store.new_manifest(
            fingerprint=fingerprint, **identity, positions=settings.positions,
            chunk_tokens=settings.chunk_tokens, dtype=dtype_name, vec_dtype=vec_dtype, seed=settings.seed,
            rows_per_chunk=len(targets) * len(positions), versions=_versions(), split_rule=rule.describe(),
            chunk_table_chunks=store.chunk_table_chunks(settings.batch_size), sites=site_records(targets, widths),
        )
        store.write_manifest(out, manifest)
    per_chunk, batch_size = manifest["rows_per_chunk"], settings.batch_size
    rows_done = manifest["shards"][-1]["row_stop"] if manifest["shards"] else 0
    first_batch, skip_rows = divmod(rows_done, batch_size * per_chunk)
    # A listed partial shard (or chunk-table piece) is the last one: all is written, only the counts are missing.
    all_written = rows_done % settings.shard_rows != 0
    chunks_done = manifest["chunk_tables"][-1]["chunk_stop"] if with_table and manifest["chunk_tables"] else 0
    piece_chunks = manifest["chunk_table_chunks"] or 1
    table_first_batch = chunks_done // batch_size    # pieces hold whole batches
    table_written = not with_table or chunks_done % piece_chunks != 0
    if rows_done or chunks_done:
        log.info("resuming %s after %d shards (%d rows) and %d chunks of the per-chunk table", out,
                 len(manifest["shards"]), rows_done, chunks_done)
    recording = threading.Lock()  # shards are recorded from the writer's thread, table pieces from this one

    def record(key: str, entry: dict[str, Any]) -> None:
        with recording:
            manifest[key].append(entry)
            store.write_manifest(out, manifest)

    def record_shard(info: store.ShardInfo) -> None:
        record("shards", info.to_dict())

    table_schema = store.shard_schema(manifest)   # a dataset begun by version 1 is finished in version 1
    writer = BackgroundWriter(store.ShardWriter(out, table_schema, settings.shard_rows,
                                                rows_done - rows_done % settings.shard_rows, record_shard,
                                                widest=max(widths)))
    table_writer = store.ChunkTableWriter(out, piece_chunks, chunks_done - chunks_done % piece_chunks,
                                          lambda entry: record("chunk_tables", entry))
    chunk_counts: dict[str, int] = {}
    positions_index = None if settings.engine == "ray" else torch.tensor(positions, device=device)
    from tqdm.auto import tqdm

    progress = tqdm(total=total_chunks, unit="chunk", desc="extract", disable=None)
    def rows_wanted(b: int) -> bool:
        return not all_written and b >= first_batch

    def table_wanted(b: int) -> bool:
        return not table_written and b >= table_first_batch

    batches = None if total_chunks is None else sum(
        rows_wanted(b) or table_wanted(b) for b in range(-(-total_chunks // batch_size)))
    clock = preflight.FirstBatchClock(batches, batch_size)

    def write(b: int, batch: list[corpus.Chunk], vec: Any, nll: Any, stats: Any = None) -> None:
        if rows_wanted(b):
            table = _batch_table(batch, vec, nll, targets, positions, b * batch_size * per_chunk, table_schema,
                                 vec_dtype)
            writer.put(table.slice(skip_rows) if b == first_batch and skip_rows else table)
        if table_wanted(b):
            table_writer.write(_chunk_rows(batch, stats))

    pool = _capture_pool(settings, device, dtype_name, targets, positions, ray_options, write)
    try:
        for b, batch in enumerate(prefetch(batched(chunks, batch_size))):
            for chunk in batch:
                chunk_counts[chunk.split] = chunk_counts.get(chunk.split, 0) + 1
            progress.update(len(batch))
            if not rows_wanted(b) and not table_wanted(b):
                continue
            if pool is not None:  # to a Ray actor; earlier batches are written once the window is full
                pool.submit((b, batch), np.stack([c.tokens for c in batch]), np.stack([c.next_tokens for c in batch]))
                continue
            clock.start()
            write(b, batch, *models.capture_batch(loaded.model, np.stack([c.tokens for c in batch]),
                                                  np.stack([c.next_tokens for c in batch]), targets, positions_index,
                                                  settings.loss, device))
            clock.stop()
        if pool is not None:
            pool.finish()
        if total_chunks is None:
            _check_labels(rule, tally, chunk_counts)
    except BaseException:
        writer.abort()
        table_writer.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.close()
    writer.close()
    table_writer.close()
    manifest["counts"] = {"chunks": dict(sorted(chunk_counts.items())),
                          "rows": {k: v * per_chunk for k, v in sorted(chunk_counts.items())}}
    manifest["corpus"] = stats.to_dict()
    remove_unlisted(out, manifest)
    manifest["complete"] = True
    manifest = store.write_manifest(out, manifest)
    log.info("extracted %d rows into %s", sum(manifest["counts"]["rows"].values()), out)
    return manifest


def _capture_pool(settings: ExtractSettings, device: Any, dtype_name: str, targets: list[Any], positions: list[int],
                  ray_options: Any, write: Callable[..., None]) -> Any:
    """With --engine ray, the actors that run the forward passes (ray_runner.CapturePool), handing each batch's
    result to `write(b, batch, *result)` in batch order; None with the local engine."""
    if settings.engine != "ray":
        return None
    from memscan.engines import ray_runner

    spec = ray_runner.CaptureSpec(settings.model, settings.revision, settings.trust_remote_code, str(device),
                                  dtype_name, targets, positions, settings.loss)
    return ray_runner.CapturePool(spec, ray_options, lambda key, result: write(*key, *result))


def _check_labels(rule: corpus.SplitRule, tally: corpus.LabelTally, chunk_counts: dict[str, int]) -> None:
    """Once the whole source is read: every --members id matched a document, and the user's rule gave
    both classes (`chunk_counts`: chunks per split, of the sample when sampling)."""
    corpus.check_members_matched(rule, tally)
    corpus.check_both_classes(rule, chunk_counts)
