"""`memscan verbatim`: greedy extraction of a seeded sample of a dataset's train and test chunks, into a folder.

A seeded sample of `num_chunks` chunks of each split is prompted with its first P tokens and
decoded greedily for S (`memscan.verbatim.match`); the folder holds their per-chunk match
statistics with the S tokens the model produced (verbatim.parquet) and summary.json, with
each split's mean match fraction and extractable rate and their bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import memscan.store as store
from memscan import checks, files, folders, models
from memscan.fields import setting
from memscan.results import StageResult
from memscan.score import SPLITS, dataset_model, job_identity, rated_chunks
from memscan.verbatim.match import SUFFIX_IDS, verbatim_table

VERBATIM = "verbatim.parquet"


@dataclass(frozen=True)
class VerbatimSettings:
    """Everything that decides a verbatim run (see `memscan verbatim --help`)."""

    data: str
    num_chunks: int = setting(100, "Seeded sample of chunks per split.", flag="--per-split")
    prompt_tokens: int = setting(32, "Prompt: the chunk's first P tokens.")
    suffix_tokens: int = setting(32, "Tokens decoded greedily and compared.")
    batch_size: int = setting(32, "Prompts decoded at once.")
    seed: int = setting(0)          # the shared --seed
    device: str = setting("auto")   # the shared --device
    dtype: str = setting("fp32", "Decoding precision; auto picks as extract does (bf16 on GPUs and on CPUs that run "
                                 "it natively).", choices=("auto", "bf16", "fp16", "fp32"))
    resamples: int = setting(1000, "Bootstrap resamples of each interval.")
    trust_remote_code: bool = setting(False, "Allow a hub model's own code to run.")
    allow_other_model: bool = setting(False, "Use the dataset's model even when its weights differ from the "
                                             "manifest's weights_sha256 (the summary records it).")

    def check(self) -> None:
        """Refuse out-of-range settings with one line that names the flag, the range and the value."""
        checks.choice("--dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        for flag, value in (("--per-split", self.num_chunks), ("--prompt-tokens", self.prompt_tokens),
                            ("--suffix-tokens", self.suffix_tokens), ("--batch-size", self.batch_size),
                            ("--resamples", self.resamples)):
            checks.at_least(flag, value, 1)
        checks.at_least("--seed", self.seed, 0)


@dataclass(frozen=True, eq=False)
class VerbatimResult(StageResult):
    """A finished `memscan verbatim` folder: its signed summary.json, read as a mapping or by property."""

    kind = folders.VERBATIM

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        """Per split: chunks, and match_fraction and extractable_rate, each {value, low, high}."""
        return dict(self.record["splits"])

    @property
    def dtype(self) -> str:
        """The precision the model decoded in (`--dtype auto` recorded as what it picked)."""
        return self.record["settings"]["dtype"]

    @property
    def model(self) -> dict[str, Any]:
        """The dataset's model as checked: path, weights_sha256, matches_dataset."""
        return dict(self.record["model"])


def sample_per_split(split: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of up to `count` chunks of each of SPLITS."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(split == s), min(count, int((split == s).sum())), replace=False)
              for s in SPLITS]
    return np.sort(np.concatenate(chosen))


def mean_interval(values: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> dict[str, float]:
    """The mean of `values` (n,) with a percentile bootstrap interval."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(values.mean()), "low": float(low), "high": float(high)}


def run(settings: VerbatimSettings, out: str | Path, overwrite: bool = False,
        allow_other_files: bool = False) -> VerbatimResult:
    """Run `memscan verbatim` into `out` (held for the job, claimed by the folder model's rules); returns its result."""
    settings.check()
    data = Path(settings.data)
    identity = job_identity(settings)
    with files.job_folder(Path(out)) as folder:
        claimed = folders.claim(folder, folders.VERBATIM, (VERBATIM,), identity, overwrite=overwrite,
                                allow_other_files=allow_other_files)
        if claimed.done:
            return VerbatimResult(folder, claimed.previous)
        pending = folders.begin(folder, folders.VERBATIM, identity, (VERBATIM,), claimed.previous)
        manifest, table, _ = rated_chunks(data)
        rows = sample_per_split(table["split"], settings.num_chunks, settings.seed)
        device = models.resolve_device(settings.device)
        loaded, model_record = dataset_model(manifest, settings, device, settings.dtype)
        used = {**settings.__dict__, "dtype": models.dtype_name(loaded.model.dtype)}
        stats = verbatim_table(loaded.model, table["token_ids"][rows].astype(np.int64), settings.prompt_tokens,
                               settings.suffix_tokens, settings.batch_size, device)
        split = table["split"][rows]
        columns = {"doc_id": table["doc_id"][rows], "chunk_id": table["chunk_id"][rows], "split": split, **stats,
                   SUFFIX_IDS: _id_lists(stats[SUFFIX_IDS])}
        entries = [store.write_table(folder / VERBATIM, columns)]
        summary = folders.write_record(folder, folders.VERBATIM, {
            "fingerprint": identity, "data": str(data.resolve()), "settings": used,
            "splits": _per_split(split, stats, settings), "tables": entries, "model": model_record}, pending)
    return VerbatimResult(folder, summary)


def _id_lists(ids: np.ndarray) -> np.ndarray:
    """Each row of `ids` (m, S) as one int32 array of an (m,) object array: a list<int32> column."""
    rows = np.empty(len(ids), dtype=object)
    for at, row in enumerate(np.asarray(ids, np.int32)):
        rows[at] = row
    return rows


def _per_split(split: np.ndarray, stats: dict[str, np.ndarray], settings: VerbatimSettings) -> dict[str, Any]:
    """Each split's chunk count, mean match fraction and extractable rate with their bootstrap intervals."""
    return {s: {"chunks": int((split == s).sum()),
                "match_fraction": mean_interval(stats["match_fraction"][split == s], settings.resamples,
                                                settings.seed),
                "extractable_rate": mean_interval(stats["extractable"][split == s], settings.resamples,
                                                  settings.seed)}
            for s in SPLITS}
