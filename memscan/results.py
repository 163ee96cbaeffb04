"""What a stage returns: the folder it wrote, its kind and its signed record, with its tables read on demand.

Each stage's library call returns a subclass of `StageResult` with typed properties over its record. A result
is also a read-only mapping over the record (`result["counts"]`), so code that read the returned JSON reads on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from memscan import folders


@dataclass(frozen=True, eq=False)
class StageResult(Mapping[str, Any]):
    """A finished stage's folder and record; equal to any mapping with the same items (its record as JSON)."""

    folder: Path
    record: Mapping[str, Any]
    kind: ClassVar[folders.Kind]

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    @property
    def table_names(self) -> list[str]:
        """The Parquet tables the record lists, by name without `.parquet`."""
        return [Path(entry["name"]).stem for entry in folders.entries(self.kind, self.record)
                if entry["name"].endswith(".parquet")]

    def table(self, name: str) -> pd.DataFrame:
        """One listed table as a DataFrame (`memscan verify` checks its bytes against the record)."""
        if name not in self.table_names:
            raise KeyError(f"a memscan {self.kind.name} folder has no table '{name}' "
                           f"(it has: {', '.join(self.table_names) or 'none'})")
        return pd.read_parquet(self.folder / f"{name}.parquet")
