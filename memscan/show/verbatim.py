"""A verbatim folder's chunks side by side: the prompt, the true suffix and the model's suffix, token by token.

A version-2 verbatim table keeps the tokens the model produced (`model_suffix_ids`): they are shown with the
dataset's tokenizer alone, and no weights are loaded. A version-1 table keeps only the match counts: its
tokens are decoded again with the dataset's model (its weights checked against the manifest, as `memscan
verbatim` checks them), on the CPU in float32, greedily with the same tie rule, so `leading_match` reads as
recorded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import memscan.store as store
from memscan import folders, models, score
from memscan.verbatim import VerbatimResult, VerbatimSettings
from memscan.verbatim.match import SUFFIX_IDS, greedy_continuations


def read(folder: Path) -> VerbatimResult:
    """The verbatim folder at `folder` as its stage returned it."""
    return VerbatimResult(folder, folders.read_record(folder, folders.VERBATIM))


def suffixes(result: VerbatimResult, chosen: pd.DataFrame) -> pd.DataFrame:
    """`chosen` rows of the verbatim table with `prompt`, `true_suffix` and `model_suffix` (texts) and `tokens`:
    per suffix position {true, model, match}. The model's suffix is the stored one, or for a version-1 folder
    (no `model_suffix_ids`) the dataset's model decodes it again."""
    recorded = result.record["settings"]
    names = {f.name for f in dataclasses.fields(VerbatimSettings)}
    settings = VerbatimSettings(**{key: value for key, value in recorded.items() if key in names})
    data = Path(result.record["data"])
    tokens = store.chunk_tokens(data, chosen.doc_id.to_numpy(), chosen.chunk_id.to_numpy())
    prompts, truth = tokens[:, :settings.prompt_tokens], tokens[:, settings.prompt_tokens:][:, :settings.suffix_tokens]
    manifest = store.read_manifest(data)
    if SUFFIX_IDS in chosen:
        decode = _tokenizer(manifest, settings).decode
        generated = np.array(chosen[SUFFIX_IDS].tolist(), np.int64).reshape(len(chosen), settings.suffix_tokens)
    else:
        loaded, _ = score.dataset_model(manifest, settings, torch.device("cpu"), "fp32")
        decode = loaded.tokenizer.decode
        generated = greedy_continuations(loaded.model, prompts, truth.shape[1], torch.device("cpu"))
    return chosen.drop(columns=[SUFFIX_IDS], errors="ignore").assign(
        prompt=[decode(row.tolist()) for row in prompts], true_suffix=[decode(row.tolist()) for row in truth],
        model_suffix=[decode(row.tolist()) for row in generated],
        tokens=[_token_matches(decode, true, model) for true, model in zip(truth, generated)])


def _tokenizer(manifest: dict[str, Any], settings: VerbatimSettings) -> Any:
    """The dataset's tokenizer alone: the stored ids need no weights, so none are read or hashed."""
    ref, revision = score.model_ref(manifest)   # not dataset_model: it hashes the weights
    return models.load_tokenizer(ref, revision, settings.trust_remote_code)


def _token_matches(decode: Any, true: np.ndarray, model: np.ndarray) -> list[dict[str, Any]]:
    return [{"true": decode([int(t)]), "model": decode([int(m)]), "match": bool(t == m)} for t, m in zip(true, model)]
