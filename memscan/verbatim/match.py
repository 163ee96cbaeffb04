"""Verbatim extraction's algorithm: does the model reproduce a chunk's continuation from its prefix?

The field's second view of memorization beside the activation geometry. Each chunk is
cut at fixed token positions: the prompt is tokens[:P], the true suffix tokens[P:P+S].
The model continues the prompt greedily for S tokens, and we record
- leading_match: how many leading tokens of the continuation equal the suffix;
- match_fraction: the fraction of the S positions that are equal, Biderman et al.
  2023's memorization score ("Emergent and Predictable Memorization in LLMs");
- extractable: all S equal, Carlini et al. 2022's k-extractability with k = P
  ("Quantifying Memorization Across Neural Language Models");
- model_suffix_ids: the S tokens themselves, so showing them needs no second decode.
Held-out chunks get the same numbers as the baseline.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch

from memscan.errors import InputError, ModelError
from memscan.progress import progress

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TOKENS = 32
DEFAULT_SUFFIX_TOKENS = 32
DEFAULT_BATCH_SIZE = 32
SUFFIX_IDS = "model_suffix_ids"   # the greedy continuation (m, S), beside its match statistics


def greedy_continuations(model: Any, prompts: np.ndarray | torch.Tensor, suffix_tokens: int,
                         device: str | torch.device) -> np.ndarray:
    """The S = `suffix_tokens` greedy next tokens after each prompt: (B, S) int64.

    prompts: (B, P) int64 token ids, all of one length, so no padding or attention mask
    is needed. `model` is any Hugging Face causal LM, already on `device` and in eval
    mode. The prompt is read once; each further step feeds only the last token with the
    key/value cache, so a step costs one token's forward pass. Each step takes
    `lowest_argmax` of the last position's logits: exact ties go to the lowest token id.
    """
    if model.training:
        raise ModelError("the model is in training mode (dropout on), so its greedy continuations are random: "
                         "call model.eval() first")
    keyword = cache_keyword(model)
    generated = []
    with torch.inference_mode():
        step_ids = torch.as_tensor(prompts, dtype=torch.int64).to(device)          # (B, P), then (B, 1)
        cache = None
        for _ in range(suffix_tokens):
            out = model(input_ids=step_ids, use_cache=True, **{keyword: cache})
            cache = getattr(out, keyword)
            step_ids = lowest_argmax(out.logits[:, -1])                                # (B, 1)
            generated.append(step_ids)
    return torch.cat(generated, dim=1).cpu().numpy()


def lowest_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The lowest id among each row's maximal logits (rows, V) as (rows, 1) int64: a tie rule every backend keeps.

    torch.argmax does not document which of several equal maxima it returns on every
    device, so two dtypes that rank the tokens alike could still decode differently. The
    logits are compared in float32, which holds every bf16 and fp16 value exactly: only
    exact ties in the model's own dtype are ties here.
    """
    values = logits.float()
    if not torch.isfinite(values).all():
        raise ModelError("the model's next-token logits hold NaN or Inf: it cannot be decoded greedily "
                         "(try --dtype fp32)")
    ids = torch.arange(values.shape[-1], device=values.device)
    is_max = values == values.max(dim=-1, keepdim=True).values
    return torch.where(is_max, ids, values.shape[-1]).min(dim=-1, keepdim=True).values


def cache_keyword(model: Any) -> str:
    """The name a causal LM's forward takes and returns its key/value cache under.

    transformers renamed `past_key_values` to `cache` (the old name still works there,
    with a deprecation warning); older versions and remote code know only the old name.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def match_statistics(generated: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row agreement of generated (B, S) and true (B, S) suffixes.

    Returns leading_match (B,) int64 (leading positions equal), match_fraction (B,)
    float32 (share of the S positions equal: Biderman et al.'s memorization score) and
    extractable (B,) bool (all S equal).
    """
    generated = np.asarray(generated)
    truth = np.asarray(truth)
    if generated.shape != truth.shape or generated.ndim != 2:
        raise InputError(f"generated and true suffixes must be (B, S) arrays of one shape; got {generated.shape} "
                         f"and {truth.shape}")
    equal = generated == truth                                                      # (B, S)
    return {
        "leading_match": np.cumprod(equal, axis=1).sum(axis=1).astype(np.int64),
        "match_fraction": equal.mean(axis=1).astype(np.float32),
        "extractable": equal.all(axis=1),
    }


def split_chunks(chunks: np.ndarray, prompt_tokens: int, suffix_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts chunks[:, :P] (m, P) and true suffixes chunks[:, P:P+S] (m, S) of chunks (m, T).

    Tokens after P + S are not used. A chunk shorter than P + S is an InputError.
    """
    chunks = np.asarray(chunks)
    if prompt_tokens < 1 or suffix_tokens < 1:
        raise InputError(f"--prompt-tokens and --suffix-tokens must be at least 1; got {prompt_tokens} and "
                         f"{suffix_tokens}")
    if chunks.ndim != 2:
        raise InputError(f"chunks must be a (chunks, tokens) array of token ids; got shape {chunks.shape}")
    need = prompt_tokens + suffix_tokens
    if chunks.shape[1] < need:
        raise InputError(f"chunks have {chunks.shape[1]} tokens, fewer than --prompt-tokens {prompt_tokens} + "
                         f"--suffix-tokens {suffix_tokens} = {need}")
    return chunks[:, :prompt_tokens], chunks[:, prompt_tokens:need]


def _check_context(model: Any, prompt_tokens: int, suffix_tokens: int) -> None:
    """Prompt and suffix must fit the model's context (where the model declares one)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and prompt_tokens + suffix_tokens > context:
        raise InputError(f"--prompt-tokens {prompt_tokens} + --suffix-tokens {suffix_tokens} must fit the "
                         f"model's context of {context:,} tokens")


def verbatim_table(model: Any, chunks: np.ndarray, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                   suffix_tokens: int = DEFAULT_SUFFIX_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Greedy extraction of every chunk (m, T) int64: the `match_statistics` columns, (m,) each, and
    `SUFFIX_IDS`, the continuations compared (m, S) int64.

    Each chunk is cut by `split_chunks` (prompt tokens[:P], truth tokens[P:P+S]); prompts
    run `batch_size` chunks at a time through `greedy_continuations` on `device`, where
    the model must already be.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1; got {batch_size}")
    prompts, truth = split_chunks(chunks, prompt_tokens, suffix_tokens)
    _check_context(model, prompt_tokens, suffix_tokens)
    starts = range(0, len(prompts), batch_size)
    generated = [greedy_continuations(model, prompts[start:start + batch_size], suffix_tokens, device)
                 for start in progress(len(starts), "verbatim", "batch", starts)]
    generated = np.concatenate(generated) if generated else np.zeros((0, suffix_tokens), np.int64)
    table = {**match_statistics(generated, truth), SUFFIX_IDS: generated}
    log.info("verbatim: %d chunks, %d extractable, mean match fraction %.3f", len(prompts),
             int(table["extractable"].sum()), float(table["match_fraction"].mean()) if len(prompts) else 0.0)
    return table
