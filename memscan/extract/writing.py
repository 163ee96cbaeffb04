"""Overlapping the work of an extraction: the next batches read ahead in a thread, shards written in another."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import pyarrow as pa

from memscan import corpus, store

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class BackgroundWriter:
    """Feeds a ShardWriter from a thread, so Parquet encoding and hashing overlap the forward pass."""

    _CLOSE, _ABORT = object(), object()

    def __init__(self, writer: store.ShardWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue[pa.Table | object] = queue.Queue(maxsize=depth)
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

    def put(self, table: pa.Table) -> None:
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
