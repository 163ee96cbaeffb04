"""Verbatim extraction: greedy decoding with the cache, exact cuts, memorized vs untrained models."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memscan import store, verbatim
from memscan.errors import InputError, ModelError
from memscan.extract import ExtractSettings, extract
from tests.fixtures.make_fixtures import EXTRACT

VOCAB = 71  # the Question-Formation tokenizer's size


def tiny_gpt2(seed: int = 0, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config)


def overtrained(sequences: np.ndarray, steps: int = 300):
    """A tiny GPT-2 trained on `sequences` (m, T) until it has learnt them by heart."""
    model = tiny_gpt2()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ids = torch.as_tensor(sequences)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class PlusOne(torch.nn.Module):
    """A stand-in causal LM whose next token is always the last one + 1 (mod V); its cache counts tokens."""

    def __init__(self, vocab: int = 1000):
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.fed = []  # the shape of every input, to see the cache at work

        self.eval()

    def forward(self, input_ids, cache=None, use_cache=True):
        self.fed.append(tuple(input_ids.shape))
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()
        return SimpleNamespace(logits=logits, cache=(cache or 0) + input_ids.shape[1])


class LegacyPlusOne(PlusOne):
    """The same under the cache's older name (transformers before the rename, remote code)."""

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        out = super().forward(input_ids, past_key_values, use_cache)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


class TwoWays(PlusOne):
    """A stand-in causal LM whose two best next tokens tie exactly: last + 1 and last + 3 (mod V)."""

    def forward(self, input_ids, cache=None, use_cache=True):
        out = super().forward(input_ids, cache, use_cache)
        return SimpleNamespace(logits=out.logits + torch.roll(out.logits, 2, dims=-1), cache=out.cache)


def random_chunks(m: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (m, length))


@pytest.fixture(scope="module")
def memorized():
    """A tiny GPT-2 over-trained on 4 random chunks (members), and 4 other chunks it never saw."""
    members = random_chunks(4, 24, seed=5)
    return overtrained(members), members, random_chunks(4, 24, seed=6)


def naive_greedy(model, prompts: np.ndarray, steps: int) -> np.ndarray:
    """Argmax of a full forward pass over everything so far, once per step, without a cache."""
    ids = torch.as_tensor(prompts)
    with torch.no_grad():
        for _ in range(steps):
            next_ids = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.shape[1]:].numpy()


def test_cached_greedy_equals_naive_loop():
    model = tiny_gpt2(seed=1).eval()
    prompts = random_chunks(5, 9, seed=0)
    got = verbatim.greedy_continuations(model, prompts, 12, "cpu")
    assert got.dtype == np.int64 and got.shape == (5, 12)
    np.testing.assert_array_equal(got, naive_greedy(model, prompts, 12))


@pytest.mark.parametrize("model_class", [PlusOne, LegacyPlusOne])
def test_greedy_feeds_the_prompt_once_then_one_token_a_step(model_class):
    model = model_class()
    prompts = np.array([[3, 4, 5], [10, 11, 12]])
    got = verbatim.greedy_continuations(model, prompts, 4, "cpu")
    np.testing.assert_array_equal(got, [[6, 7, 8, 9], [13, 14, 15, 16]])
    assert model.fed == [(2, 3), (2, 1), (2, 1), (2, 1)]


def test_greedy_refuses_a_model_in_training_mode():
    with pytest.raises(ModelError, match="eval"):
        verbatim.greedy_continuations(tiny_gpt2().train(), random_chunks(1, 4, 0), 2, "cpu")


def test_match_statistics():
    truth = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    generated = np.array([[1, 2, 3, 4], [1, 2, 9, 4], [9, 2, 3, 4], [9, 9, 9, 9]])
    stats = verbatim.match_statistics(generated, truth)
    np.testing.assert_array_equal(stats["leading_match"], [4, 2, 0, 0])
    np.testing.assert_allclose(stats["match_fraction"], [1.0, 0.75, 0.75, 0.0])
    np.testing.assert_array_equal(stats["extractable"], [True, False, False, False])


def test_cuts_exactly_at_prompt_and_prompt_plus_suffix():
    p, s = 5, 4
    chunks = np.arange(20)[None, :] + 100 * np.arange(4)[:, None]  # consecutive ids: PlusOne reproduces them
    chunks[1, p + s] = 999          # just after the suffix: not part of the test
    chunks[2, p + s - 1] = 999      # the suffix's last token
    chunks[3, p - 1] = 999          # the prompt's last token: the continuation follows it
    prompts, truth = verbatim.split_chunks(chunks, p, s)
    np.testing.assert_array_equal(prompts, chunks[:, :p])
    np.testing.assert_array_equal(truth, chunks[:, p:p + s])
    table = verbatim.verbatim_table(PlusOne(), chunks, prompt_tokens=p, suffix_tokens=s, batch_size=3)
    np.testing.assert_array_equal(table["leading_match"], [4, 4, 3, 0])
    np.testing.assert_allclose(table["match_fraction"], [1.0, 1.0, 0.75, 0.0])
    np.testing.assert_array_equal(table["extractable"], [True, True, False, False])


def test_chunks_too_short_or_context_too_small_are_one_line_errors():
    with pytest.raises(InputError, match="chunks have 10 tokens.*--prompt-tokens 8 \\+ --suffix-tokens 4 = 12"):
        verbatim.verbatim_table(PlusOne(), np.zeros((2, 10), np.int64), prompt_tokens=8, suffix_tokens=4)
    with pytest.raises(InputError, match="at least 1"):
        verbatim.split_chunks(np.zeros((2, 10), np.int64), 0, 4)
    with pytest.raises(InputError, match="context of 16 tokens"):
        verbatim.verbatim_table(tiny_gpt2(n_positions=16).eval(), np.zeros((1, 24), np.int64), 8, 10)


def test_overtrained_model_reproduces_its_documents_and_untrained_does_not(memorized):
    model, members, held_out = memorized
    seen = verbatim.verbatim_table(model, members, prompt_tokens=8, suffix_tokens=16, batch_size=3)
    assert seen["match_fraction"].mean() >= 0.95
    assert seen["extractable"].all()
    np.testing.assert_array_equal(seen["leading_match"], 16)
    unseen = verbatim.verbatim_table(model, held_out, prompt_tokens=8, suffix_tokens=16)
    assert unseen["match_fraction"].mean() <= 0.2
    untrained = verbatim.verbatim_table(tiny_gpt2(seed=2).eval(), members, prompt_tokens=8, suffix_tokens=16)
    assert untrained["match_fraction"].mean() <= 0.1
    assert not untrained["extractable"].any()


def test_lowest_argmax_takes_the_lowest_id_among_exact_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -0.5], [2.0, 1.0, 2.0, 0.0]])
    np.testing.assert_array_equal(verbatim.lowest_argmax(logits), [[1], [0], [3], [0]])
    many = torch.from_numpy(np.random.default_rng(0).integers(-3, 4, (200, 9)).astype(np.float32))  # ties everywhere
    np.testing.assert_array_equal(verbatim.lowest_argmax(many)[:, 0], np.argmax(many.numpy().astype(np.float64), 1))


def test_lowest_argmax_ties_are_the_models_own_dtypes_ties():
    close = torch.tensor([[1.0, 1.001, 0.5]])          # 1.001 rounds to 1.0 in bf16, not in fp32
    assert verbatim.lowest_argmax(close).item() == 1
    assert verbatim.lowest_argmax(close.to(torch.bfloat16)).item() == 0
    wide = torch.tensor([[0.0, 7.0, 7.0, 1.0]], dtype=torch.float16)
    assert verbatim.lowest_argmax(wide).dtype == torch.int64 and verbatim.lowest_argmax(wide).item() == 1


def test_greedy_decoding_breaks_exact_ties_by_the_lowest_id():
    model = TwoWays(vocab=10)
    prompts = np.array([[3], [7], [8]])
    expected = []
    for token in prompts[:, 0]:
        row = []
        for _ in range(5):
            token = min((token + 1) % 10, (token + 3) % 10)
            row.append(token)
        expected.append(row)
    np.testing.assert_array_equal(verbatim.greedy_continuations(model, prompts, 5, "cpu"), expected)


def path_logits(model, prompts: np.ndarray, generated: np.ndarray) -> torch.Tensor:
    """float64 logits (B, S, V) that chose each generated token, from one forward pass without a cache."""
    ids = torch.as_tensor(np.concatenate([prompts, generated], axis=1))
    with torch.no_grad():
        return model(input_ids=ids[:, :-1], use_cache=False).logits[:, prompts.shape[1] - 1:].double()


def test_fp32_and_bf16_decode_alike_without_near_ties(memorized):
    model, members, _ = memorized
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32 and next(half.parameters()).dtype == torch.bfloat16
    prompts, _ = verbatim.split_chunks(members, 8, 16)
    generated = verbatim.greedy_continuations(model, prompts, 16, "cpu")
    full = path_logits(model, prompts, generated)
    top = full.topk(2, dim=-1).values
    # no near-tie: the best logit leads by more than twice what bf16 moves any logit, so the ranking is bf16's too
    assert (top[..., 0] - top[..., 1]).min() > 2 * (path_logits(half, prompts, generated) - full).abs().max()
    np.testing.assert_array_equal(verbatim.greedy_continuations(half, prompts, 16, "cpu"), generated)
    tables = [verbatim.verbatim_table(m, members, 8, 16, batch_size=3) for m in (model, half)]
    for name in tables[0]:
        np.testing.assert_array_equal(tables[0][name], tables[1][name])


def test_the_folder_keeps_the_tokens_the_model_produced_in_row_and_position_order(qf_model, tmp_path):
    from transformers import GPT2LMHeadModel

    extract(ExtractSettings(model=str(qf_model), **EXTRACT), tmp_path / "data")
    result = verbatim.run(verbatim.VerbatimSettings(data=str(tmp_path / "data"), num_chunks=5, prompt_tokens=8,
                                                    suffix_tokens=6, batch_size=3, resamples=10, device="cpu"),
                          tmp_path / "verbatim")
    written = pq.read_table(tmp_path / "verbatim" / verbatim.VERBATIM)
    assert result.record["format_version"] == 2
    assert written.schema.field("model_suffix_ids").type == pa.list_(pa.int32())
    rows = written.to_pandas()
    chunks = store.read_chunk_table(tmp_path / "data")
    at = [int(np.flatnonzero((chunks["doc_id"] == d) & (chunks["chunk_id"] == c))[0])
          for d, c in zip(rows.doc_id, rows.chunk_id)]
    tokens = chunks["token_ids"][at].astype(np.int64)                              # (m, T), in the table's row order
    stored = np.stack(rows.model_suffix_ids.to_numpy())                            # (m, S)
    fresh = naive_greedy(GPT2LMHeadModel.from_pretrained(qf_model).eval(), tokens[:, :8], 6)
    np.testing.assert_array_equal(stored, fresh)
    assert not (stored == tokens[:, 8:14]).all()                                   # an untrained model: not the truth
    recomputed = verbatim.match_statistics(stored, tokens[:, 8:14])
    for name in ("leading_match", "match_fraction", "extractable"):
        np.testing.assert_array_equal(rows[name], recomputed[name])
