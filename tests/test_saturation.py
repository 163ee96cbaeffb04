"""Norm growth, saturation and saturated heads against direct computations and hand-built patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from memscan import saturation
from memscan.cli import main
from memscan.errors import DataError, InputError


def test_norms_and_cosines_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    state = {"transformer.h.0.attn.c_attn.weight": torch.tensor(rng.normal(size=(4, 6))),
             "transformer.h.1.mlp.c_fc.bias": torch.tensor(rng.normal(size=5)),
             "transformer.wte.weight": torch.tensor(rng.normal(size=(3, 4))),
             "scalar": torch.tensor([2.0])}
    norms = saturation.parameter_norms(state)
    flat = torch.cat([t.flatten() for n, t in state.items() if n != "scalar"])
    assert norms["total"] == pytest.approx(float(flat.norm()))
    assert norms["layer_0"] == pytest.approx(float(state["transformer.h.0.attn.c_attn.weight"].norm()))
    assert norms["other"] == pytest.approx(float(state["transformer.wte.weight"].norm()))
    other = {n: t * 2 + 0.1 for n, t in state.items()}
    flat2 = torch.cat([t.flatten() for n, t in other.items() if n != "scalar"])
    assert saturation.cosine(state, other) == pytest.approx(float(flat @ flat2 / (flat.norm() * flat2.norm())))


def test_fits_pick_the_true_growth_law():
    t = np.array([1, 3, 10, 30, 100, 300, 1000], float)
    fits = saturation.fit_growth(t, 3 + 2 * np.sqrt(t))
    assert fits["sqrt_t"]["r2"] == pytest.approx(1.0) and fits["sqrt_t"]["b"] == pytest.approx(2.0)
    assert fits["t"]["r2"] < 0.99 and fits["t_quarter"]["r2"] < 0.999


def test_head_statistics_of_hand_built_argmax_and_uniform_heads():
    T = 6
    argmax = np.eye(T)                                        # each query attends to itself only
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    tiny = np.where(np.eye(T) == 1, 1 - 1e-7, np.tril(np.full((T, T), 1e-7), -1))  # below the threshold off-diagonal
    weights = np.stack([argmax, uniform, tiny])[None, None]   # (layers 1, batch 1, heads 3, T, T)
    stats = saturation.head_statistics(weights)
    counts = np.arange(1, T + 1)
    assert stats["mean_count"].tolist() == pytest.approx([1.0, counts.mean(), 1.0])
    assert stats["p_count_above_1"].tolist() == pytest.approx([0.0, (T - 1) / T, 0.0])
    assert stats["std_count"].tolist() == pytest.approx([0.0, counts.std(), 0.0])
    assert stats["mean_fraction"].tolist() == pytest.approx([(1 / counts).mean(), 1.0, (1 / counts).mean()])


def test_saturation_cosine_is_one_at_c_one_and_heads_harden(qf_model):
    model = AutoModelForCausalLM.from_pretrained(qf_model)
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    assert saturation.saturation_cosines(model, ids, c=1.0) == pytest.approx(np.ones(3))
    soft = saturation.head_statistics(saturation.saturated_attentions(model, ids, c=1.0))
    hard = saturation.head_statistics(saturation.saturated_attentions(model, ids, c=1000.0))
    assert (hard["mean_count"] <= soft["mean_count"] + 1e-9).all() and hard["mean_count"].mean() < soft["mean_count"].mean()


def test_saturation_command_on_a_training_run(tmp_path, capsys):
    from tests.test_train import SMALL
    from memscan.train import train

    train(SMALL, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["saturation", str(tmp_path / "run"), "--out", str(tmp_path / "sat"), "--chunks", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "sqrt_t" in out and "argmax heads" in out
    for name in ("norms.parquet", "saturation.parquet", "heads.parquet", "report.html"):
        assert (tmp_path / "sat" / name).stat().st_size > 0
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "run.json").write_text("{}")
    with pytest.raises(DataError, match="run.json has no 'fingerprint'"):
        saturation.analyse(str(empty), str(tmp_path / "x"))
    (empty / "run.json").write_text((tmp_path / "run" / "run.json").read_text())
    with pytest.raises(InputError, match="has no checkpoints"):
        saturation.analyse(str(empty), str(tmp_path / "x"))
    with pytest.raises(InputError, match="does not exist"):
        saturation.analyse(str(tmp_path / "nowhere"), str(tmp_path / "x"))


def test_the_free_exponent_recovers_sqrt_and_linear_growth_within_its_interval():
    t = np.unique(np.round(np.logspace(0, np.log10(3000), 24)))
    noise = np.random.default_rng(0).normal(0, 0.05, len(t))
    for curve, exponent in ((3 + 2 * np.sqrt(t), 0.5), (3 + 0.01 * t, 1.0)):
        exact = saturation.fit_exponent(t, curve)
        assert exact["value"] == pytest.approx(exponent) and exact["low"] <= exponent <= exact["high"]
        noisy = saturation.fit_exponent(t, curve + noise)
        assert noisy["low"] <= exponent <= noisy["high"] and noisy["high"] - noisy["low"] < 0.2
    assert saturation.fit_exponent(t[:3], 3 + np.sqrt(t[:3])) is None   # a, b and p leave no residual
