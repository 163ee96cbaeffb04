"""Training: the loss falls, a resumed run equals an uninterrupted one, splits agree with extraction."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from memscan import files, store
from memscan.errors import InputError
from memscan.extract import ExtractSettings, extract
from memscan.train import RUN_FILE, TrainSettings, checkpoint_steps, checkpoints, load_data, load_tokenizer, train

SMALL = TrainSettings(source="qf:documents=12,lines=16", tokens=3000, n_layer=2, n_embd=32, n_head=4, context=32,
                      batch_size=4, steps=40, lr=1e-2, warmup_steps=5, eval_every=10, eval_chunks=16,
                      checkpoints=4, save_every=7, dtype="fp32", test_fraction=0.2, seed=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    losses = []
    info = train(SMALL, out, on_step=lambda step, loss: losses.append(loss))
    return out, info, losses


def test_training_lowers_the_loss_and_logs_and_checkpoints(finished):
    out, info, losses = finished
    log = pq.read_table(out / "log.parquet").to_pandas()
    assert log.step.tolist() == [1, 10, 20, 30, 40]
    assert log.train_loss.iloc[-1] < log.train_loss.iloc[0] - 0.7
    assert log.heldout_loss.iloc[-1] < log.heldout_loss.iloc[0] - 0.7
    assert info["complete"] and info["steps"] == 40 and len(losses) == 40
    assert [step for step, _ in checkpoints(out)] == checkpoint_steps(40, 4) == [1, 3, 12, 40]
    assert (out / "checkpoints" / "step-0000040" / "model.safetensors").exists()
    assert not (out / "checkpoints" / "resume").exists()


def test_a_resumed_run_equals_an_uninterrupted_one(finished, tmp_path):
    reference, info, losses = finished
    out = tmp_path / "run"

    def interrupt(step: int, loss: float) -> None:
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(SMALL, out, on_step=interrupt)
    assert json.loads((out / "checkpoints" / "resume" / "state.json").read_text())["step"] == 14
    resumed_losses = []
    resumed = train(SMALL, out, on_step=lambda step, loss: resumed_losses.append(loss))
    assert resumed_losses == pytest.approx(losses[14:], rel=1e-6)
    assert resumed["final_heldout_loss"] == pytest.approx(info["final_heldout_loss"], rel=1e-6)
    final, expected = (load_file(path / "checkpoints" / "step-0000040" / "model.safetensors") for path in (out, reference))
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-6)
    assert pq.read_table(out / "log.parquet").to_pandas().equals(pq.read_table(reference / "log.parquet").to_pandas()) or \
        np.allclose(pq.read_table(out / "log.parquet").to_pandas().drop(columns="seconds"),
                    pq.read_table(reference / "log.parquet").to_pandas().drop(columns="seconds"), rtol=1e-6)


def test_train_and_extract_splits_agree_row_for_row(finished, tmp_path):
    out, info, _ = finished
    data = load_data(SMALL, load_tokenizer(SMALL))
    provenance = info["data"]
    extract(ExtractSettings(model=info["final"], source=SMALL.source, max_documents=provenance["documents"],
                            chunk_tokens=SMALL.context, test_fraction=SMALL.test_fraction, seed=SMALL.seed,
                            positions="all"), tmp_path / "acts")
    rows = pq.read_table(sorted((tmp_path / "acts").glob("vectors/part-*.parquet")), columns=["split", "position", "token_id"]).to_pandas()
    for split, tokens in (("train", data.train), ("test", data.heldout)):
        chosen = rows[rows.split == split].token_id.to_numpy().reshape(-1, SMALL.context)
        assert np.array_equal(chosen, tokens.numpy())
    assert provenance["train_chunks"] == len(data.train) and provenance["train_tokens"] >= SMALL.tokens


def test_bad_training_input(finished, tmp_path):
    with pytest.raises(InputError, match="more than the"):
        train(replace(SMALL, tokens=10_000_000), tmp_path / "a")
    with pytest.raises(InputError, match="configuration was rejected"):
        train(replace(SMALL, n_embd=30), tmp_path / "b")
    out, _, _ = finished
    with pytest.raises(InputError, match="holds another training run"):
        train(replace(SMALL, lr=1e-3), out)
    other = tmp_path / "c"
    train(replace(SMALL, steps=8), other)
    state = json.loads((other / RUN_FILE).read_text())
    state["complete"] = False
    store.write_json_atomic(other / RUN_FILE, files.signed(state))   # as memscan signs it: only the state differs
    step8 = other / "checkpoints" / "step-0000008" / "state.json"
    step8.write_text(json.dumps({**json.loads(step8.read_text()), "fingerprint": "someone-else"}))
    with pytest.raises(InputError, match="belongs to another run"):
        train(replace(SMALL, steps=8), other)
    with pytest.raises(InputError, match="--tokenizer is needed"):
        train(replace(SMALL, source=str(tmp_path)), tmp_path / "d")


def test_an_epoch_puts_every_training_chunk_in_exactly_one_batch():
    from memscan.train import batch_rows, total_steps

    rows, batch = 103, 8
    steps = total_steps(replace(SMALL, steps=None, epochs=1, batch_size=batch), rows)
    seen = torch.cat([batch_rows(5, step, batch, rows) for step in range(steps)])
    assert steps == 13 and sorted(seen.tolist()) == list(range(rows))
