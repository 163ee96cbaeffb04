"""Chunk planning: which chunks an extraction stores, in which order, with the split rule's labels.

`plan_here` reads the source in this process; the Ray engine plans pieces of it in tasks
(`memscan.engines.ray_planning`) and gives the same chunks in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from memscan import corpus


@dataclass(frozen=True)
class ChunkRequest:
    """What decides the chunks: the model whose tokenizer cuts them, the documents read, their length, the
    hash split's test fraction and seed, and the seeded sample's size (None: every chunk)."""

    model: str
    revision: str | None
    trust_remote_code: bool
    max_documents: int | None
    chunk_tokens: int
    test_fraction: float
    seed: int
    num_chunks: int | None


@dataclass
class ChunkPlan:
    """The chunks in row order (a list when sampled, else a stream), the corpus counts (complete once the
    chunks are read to the end) and the split rule's tally of labels."""

    chunks: Iterable[corpus.Chunk]
    stats: corpus.CorpusStats
    tally: corpus.LabelTally


def first_documents(source: corpus.Source, request: ChunkRequest, rule: corpus.SplitRule,
                    tally: corpus.LabelTally) -> Iterable[corpus.Document]:
    """The source's first --max-documents documents, labelled by `rule` and counted into `tally`."""
    return corpus.label_documents(itertools.islice(source.documents(), request.max_documents), rule, tally)


def plan_here(source: corpus.Source, rule: corpus.SplitRule, request: ChunkRequest,
              tokenizer: PreTrainedTokenizerBase) -> ChunkPlan:
    """The chunks of `source` read and tokenized in this process, sampled when `request` asks."""
    stats, tally = corpus.CorpusStats(), corpus.LabelTally()
    chunks: Iterable[corpus.Chunk] = corpus.iter_chunks(first_documents(source, request, rule, tally), tokenizer,
                                                        request.chunk_tokens, request.test_fraction, request.seed,
                                                        stats)
    if request.num_chunks is not None:
        chunks = corpus.sample_chunks(chunks, request.num_chunks)
    return ChunkPlan(chunks, stats, tally)
