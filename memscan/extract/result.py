"""What `extract` returns: the dataset folder and its signed manifest, with typed properties."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memscan import folders, store
from memscan.results import StageResult


@dataclass(frozen=True, eq=False)
class ExtractResult(StageResult):
    """A finished extraction: its folder and manifest.json, read as a mapping (`result["counts"]`) or by property."""

    kind = folders.DATASET

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Chunks and rows per split: {"chunks": {split: n}, "rows": {split: n}}."""
        return {key: dict(value) for key, value in self.record["counts"].items()}

    @property
    def sites(self) -> list[dict[str, Any]]:
        """The stored vector sets in row order within a chunk, each {name, layers, n}."""
        return list(store.sites_of(self.record))

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The Parquet shards, each {name, row_start, row_stop, bytes, sha256}."""
        return list(self.record["shards"])

    @property
    def rows(self) -> int:
        """Rows stored, all splits together."""
        return sum(self.record["counts"]["rows"].values())

    @property
    def engine(self) -> str:
        """The engine that last wrote to the dataset (`settings.engine`: local or ray)."""
        return str(self.record["settings"]["engine"])
