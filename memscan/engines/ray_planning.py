"""Chunk planning on Ray: the local plan's chunks, in its order, computed by Ray tasks per piece of the source.

Pieces are contiguous ranges of the document stream (documents of `qf`, files of a folder,
runs of files of an `hf:` dataset, each counted by its own task to learn its first doc
id), so their chunks in piece order are the stream's; bottom-k samples merge by keeping
the k smallest keys, so the merged sample is the local one. Pieces are planned in order,
`num_workers` at a time. Without --num-chunks the chunks stream: each task yields PLAN_GROUP
chunks at a time, at most PLAN_AHEAD groups ahead of the driver, and the counts are
complete once the chunks are read to the end. With --num-chunks the sample is held (at
most --num-chunks chunks, as in the local plan) and returned with its counts.
Planning tasks reserve no CPU: they run beside the capture actors, which may hold every slot.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from memscan import corpus, models
from memscan.engines.planning import ChunkPlan, ChunkRequest, first_documents
from memscan.engines.ray_options import RayOptions, connect, ray_get, ray_get_all

log = logging.getLogger(__name__)
T = TypeVar("T")
PLAN_GROUP = 256   # chunks per object a streaming planning task yields: what the driver holds of a piece at once
PLAN_AHEAD = 4     # objects a planning task yields before it waits for the driver to read them (Ray's backpressure)


def plan_on_ray(source: corpus.Source, rule: corpus.SplitRule, request: ChunkRequest,
                options: RayOptions) -> ChunkPlan:
    """The chunks `planning.plan_here` gives, planned by Ray tasks per piece of `source` (module docstring)."""
    labelled = source if rule.kind == "hash" else corpus.LabeledSource(source, rule)
    chunks, stats = plan(labelled, request, options)
    tally = corpus.LabelTally()
    if rule.kind == "members":  # the planning tasks' tallies stay on the workers: count here
        collections.deque(first_documents(source, request, rule, tally), maxlen=0)
    return ChunkPlan(chunks, stats, tally)


def plan(source: corpus.Source, request: ChunkRequest, options: RayOptions,
         ) -> tuple[Iterable[corpus.Chunk], corpus.CorpusStats]:
    """The chunks (or seeded sample) of `source`, labelled as its documents are, and its counts."""
    ray = connect(options)
    count = ray.remote(_count_documents)
    pieces = source.partitions(request.max_documents, 4 * options.num_workers,
                               count_documents=lambda runs: ray_get_all([count.remote(run) for run in runs]))
    if len(pieces) == 1:
        log.info("this source is one piece (one file, or a stream): its chunks are planned by one task")
    stats = corpus.CorpusStats()
    if request.num_chunks:
        return _merged_sample(pieces, request, options, stats), stats
    return _streamed_chunks(pieces, request, options, stats), stats


def _count_documents(piece: corpus.Source) -> int:
    return int(piece.count_documents())


def _piece_chunks(piece: corpus.Source, request: ChunkRequest, stats: corpus.CorpusStats) -> Iterator[corpus.Chunk]:
    """One piece's chunks, tokenized on this worker as the local plan does, counted into `stats`."""
    tokenizer = models.load_tokenizer(request.model, request.revision, request.trust_remote_code)
    return corpus.iter_chunks(piece.documents(), tokenizer, request.chunk_tokens, request.test_fraction,
                              request.seed, stats)


def _sample_piece(piece: corpus.Source, request: ChunkRequest) -> tuple[list[corpus.Chunk], corpus.CorpusStats]:
    """One piece's bottom-k sample of --num-chunks chunks, and its counts."""
    stats = corpus.CorpusStats()
    return corpus.sample_chunks(_piece_chunks(piece, request, stats), request.num_chunks or 0), stats


def _chunk_groups(piece: corpus.Source, request: ChunkRequest) -> Iterator[list[corpus.Chunk] | corpus.CorpusStats]:
    """One piece's chunks, PLAN_GROUP at a time, then its counts (a Ray streaming generator)."""
    stats = corpus.CorpusStats()
    chunks = _piece_chunks(piece, request, stats)
    while group := list(itertools.islice(chunks, PLAN_GROUP)):
        yield group
    yield stats


def _ahead(items: Iterable[T], width: int) -> Iterator[T]:
    """`items` in order, drawn up to `width` - 1 ahead of the one yielded: drawing an item submits its work,
    so at most `width` are under way (or done and waiting to be read) at once."""
    iterator = iter(items)
    waiting = collections.deque(itertools.islice(iterator, width))
    while waiting:
        yield waiting.popleft()
        waiting.extend(itertools.islice(iterator, 1))


def _add_counts(total: corpus.CorpusStats, piece: corpus.CorpusStats) -> None:
    """Add one piece's CorpusStats to the running `total`."""
    for name in ("documents", "documents_too_short", "tokens", "tokens_in_chunks", "chunks_available"):
        setattr(total, name, getattr(total, name) + getattr(piece, name))
    total.longest_document_tokens = max(total.longest_document_tokens, piece.longest_document_tokens)


def _merged_sample(pieces: list[corpus.Source], request: ChunkRequest, options: RayOptions,
                   stats: corpus.CorpusStats) -> list[corpus.Chunk]:
    """The bottom-k sample of all pieces, merged as each piece's sample arrives; counts added to `stats`."""
    import ray

    task = ray.remote(num_cpus=0)(_sample_piece)
    sample: list[corpus.Chunk] = []
    for ref in _ahead((task.remote(piece, request) for piece in pieces), options.num_workers):
        piece_sample, piece_stats = ray_get(ref)
        sample = corpus.sample_chunks(itertools.chain(sample, piece_sample), request.num_chunks or 0)
        _add_counts(stats, piece_stats)
    return sample


def _streamed_chunks(pieces: list[corpus.Source], request: ChunkRequest, options: RayOptions,
                     stats: corpus.CorpusStats) -> Iterator[corpus.Chunk]:
    """Every chunk of the pieces in order, as their tasks yield them; each piece's counts added to `stats`."""
    import ray

    task = ray.remote(num_cpus=0, _generator_backpressure_num_objects=PLAN_AHEAD)(_chunk_groups)
    for groups in _ahead((task.remote(piece, request) for piece in pieces), options.num_workers):
        for ref in groups:
            item = ray_get(ref)
            if isinstance(item, corpus.CorpusStats):
                _add_counts(stats, item)
            else:
                yield from item
