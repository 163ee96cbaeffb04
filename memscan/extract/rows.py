"""The rows one batch adds: to the shards (chunk, site layer, position), and to the per-chunk table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from memscan import corpus, models, store
from memscan.errors import NonFiniteActivationsError


def batch_table(batch: list[corpus.Chunk], vec: list[torch.Tensor], nll: torch.Tensor | None, targets: list[models.Target],
                positions: list[int], first_row: int, table_schema: pa.Schema, vec_dtype: str) -> pa.Table:
    """Rows of one batch, ordered (chunk, target, position), from one (B, P, n_target) tensor per target;
    refuses NaN/Inf activations."""
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


def _refuse_non_finite(batch: list[corpus.Chunk], target: models.Target, positions: list[int], raw: torch.Tensor,
                       kept: torch.Tensor) -> None:
    """NonFiniteActivationsError naming the first bad row of one target's (B, P, n) vectors, as stored (`kept`)."""
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


def chunk_rows(batch: list[corpus.Chunk], stats: torch.Tensor | None, format_version: int, tokenizer: Any,
               ) -> pa.Table:
    """Per-chunk table rows of one batch (store.chunk_rows); stats (3, B, T) nll, mu, var or None (--no-loss).
    From format version 4 each chunk's doc_key and its text, its token ids decoded by `tokenizer`."""
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
    if format_version >= store.SUBFOLDERS_SINCE:
        columns["doc_key"] = [c.doc_key for c in batch]
        columns["text"] = [tokenizer.decode(c.tokens.tolist()) for c in batch]
    return store.chunk_rows(columns, format_version)
