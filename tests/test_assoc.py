"""The associative-memory sandbox against brute force, definitions and docs/theory.md's rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memscan import assoc
from memscan.cli import main


def brute_error(q, E, U, target, p):
    """Build W = sum_x q(x) u_f(x) e_x^T explicitly and count the mass of wrong (or tied) predictions."""
    W = sum(q[x] * np.outer(U[target[x]], E[x]) for x in range(len(q)))
    wrong = 0.0
    for x in range(len(q)):
        scores = U @ W @ E[x]
        others = np.delete(scores, target[x])
        wrong += p[x] * (scores[target[x]] <= others.max())
    return wrong


def test_exact_population_error_equals_a_brute_force_count():
    p = assoc.zipf(12, 1.5)
    E, U, target = assoc.embeddings(12, 3, 4, seed=1)
    rng = np.random.default_rng(0)
    Q = np.stack([p, rng.random(12), (rng.random(12) > 0.5).astype(float), np.zeros(12)])
    got = assoc.population_errors(Q, E @ E.T, U[target] @ U.T, target, p)
    np.testing.assert_allclose(got, [brute_error(q, E, U, target, p) for q in Q], rtol=1e-12)
    assert got[-1] == pytest.approx(1.0)  # an empty memory ties everywhere: all wrong


def test_each_scheme_weighting_follows_its_definition():
    p = assoc.zipf(40, 2.0)
    counts = assoc.sample_counts(3, 200, p)
    d = 96
    q = assoc.schemes_q(p, counts, d, assoc.SweepSettings())
    np.testing.assert_array_equal(q["p"], p)
    np.testing.assert_allclose(q["p_hat"], counts / 200)
    np.testing.assert_array_equal(q["seen"], counts > 0)
    np.testing.assert_array_equal(q["threshold"], np.arange(40) < 12)          # P = d / 8
    top = np.argsort(-counts, kind="stable")[:8]                                # P = d / 12
    assert set(np.flatnonzero(q["top_seen"])) == {x for x in top if counts[x] > 0}
    assert counts.sum() == 200 and np.array_equal(counts, assoc.sample_counts(3, 200, p))


def test_q_gamma_and_one_sgd_step_by_hand():
    f = lambda q: q + 0.7 / (1 + math.exp(q) / 5)  # noqa: E731
    assert assoc.q_gamma(np.array([0, 1, 3]), 0.7, 5).tolist() == pytest.approx([0.0, f(0.0), f(f(f(0.0)))])
    E, U, target = assoc.embeddings(6, 3, 5, seed=2)
    W, same = assoc.train_memory(np.array([[4]]), E[None], U[None], target, 0.3, "sgd")
    probs = np.full(3, 1 / 3)
    probs[target[4]] -= 1                          # softmax of zero logits minus the one-hot target
    np.testing.assert_allclose(W[0], -0.3 * np.outer(U.T @ probs, E[4]), rtol=1e-12)
    assert np.array_equal(same[0], E)
    tokens = np.array([[4, 1, 4]])
    W2, learned = assoc.train_memory(tokens, E[None], U[None], target, 0.3, "sgd", learn_embeddings=True)
    w, e = np.zeros((5, 5)), E.copy()               # the same three steps by hand
    for x in tokens[0]:
        z = U @ w @ e[x]
        g = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        g[target[x]] -= 1
        back = U.T @ g
        grad_w = np.outer(back, e[x])
        e[x] = e[x] - 0.3 * w.T @ back
        w = w - 0.3 * grad_w
    np.testing.assert_allclose(W2[0], w, rtol=1e-12)
    np.testing.assert_allclose(learned[0], e, rtol=1e-12)


@pytest.fixture(scope="module")
def short_sweep():
    settings = assoc.SweepSettings(seeds=8, samples=(10, 30, 100, 300, 1000, 3000), sgd_dims=(50,),
                                   sgd_samples=(100,), sgd_seeds=4)
    table, q = assoc.sweep(settings)
    return table, q, assoc.fit(table, assoc.settings_dict(settings))


def test_short_sweep_slopes_land_in_the_theory_bands(short_sweep):
    _, _, result = short_sweep
    slopes = result["slopes"]
    assert slopes["threshold"]["slope"] == pytest.approx(-1.0, abs=0.15)
    assert slopes["p"]["slope"] == pytest.approx(-0.25, abs=0.1)
    assert slopes["seen"]["slope"] == pytest.approx(-0.5, abs=0.1)
    assert slopes["seen"]["low"] <= slopes["seen"]["slope"] <= slopes["seen"]["high"]
    overflow = result["overflow"]["error_by_T"]
    assert overflow[3000] > 2 * overflow[10]     # at d = 10, storing more tokens than d makes it worse


def test_sgd_small_steps_act_like_p_hat_and_large_steps_like_seen(short_sweep):
    table, q, result = short_sweep
    cell = "d=50,T=100"
    small, large = result["trained"]["sgd_small"][cell], result["trained"]["sgd_large"][cell]
    assert small["error"] == pytest.approx(small["p_hat"], abs=0.02)
    assert large["error"] == pytest.approx(large["seen"], abs=0.02)
    rows = q["scheme"] == "sgd_small"
    assert np.corrcoef(q["q_measured"][rows], q["q_gamma"][rows])[0, 1] > 0.95


@pytest.mark.parametrize("flags,match", [
    (["--alpha", "1"], "alpha must be above 1"),
    (["--dims", "0,10"], "must be positive"),
    (["--samples", "-5"], "must be positive"),
    (["--classes", "20", "--n-tokens", "10"], "larger than the N = 10 tokens"),
    (["--schemes", "p,magic"], "unknown scheme"),
])
def test_bad_sweep_input(capsys, tmp_path, flags, match):
    with pytest.raises(SystemExit) as exit_info:
        main(["assoc", "sweep", "--out", str(tmp_path / "s"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and match in err.strip().splitlines()[-1] and "Traceback" not in err


def test_sweep_and_fit_commands(capsys, tmp_path):
    args = ["assoc", "sweep", "--out", str(tmp_path / "s"), "--dims", "10,40", "--samples", "10,100", "--seeds", "2",
            "--n-tokens", "60", "--schemes", "p,seen,threshold"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["assoc", "fit", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "threshold  slope in d" in out
    assert (tmp_path / "s" / "report.html").stat().st_size > 0 and (tmp_path / "s" / "fit.json").exists()


def test_zero_error_points_are_left_out_of_the_fit_not_clamped():
    x = np.array([10, 100, 1000] * 2)
    fitted = assoc.slope(x, np.array([0.1, 0.01, 0.0] * 2), np.array([0, 0, 0, 1, 1, 1]))
    assert fitted["slope"] == pytest.approx(-1.0) and fitted["dropped_zero_error"] == 1 and fitted["points"] == 2


def test_trained_schemes_need_a_grid_shared_with_the_fixed_ones():
    from memscan.errors import InputError

    with pytest.raises(InputError, match="must appear in --dims"):
        assoc.SweepSettings(dims=(10, 100), schemes=("p_hat", "sgd_small")).check()
    assert assoc.SweepSettings(dims=(10, 50, 100), sgd_dims=(50, 200)).trained_dims == (50,)


def test_fit_refuses_a_sweep_table_that_changed_after_the_sweep(capsys, tmp_path):
    args = ["assoc", "sweep", "--out", str(tmp_path / "s"), "--dims", "10,40", "--samples", "10,100", "--seeds", "2",
            "--n-tokens", "60", "--schemes", "p"]
    with pytest.raises(SystemExit):
        main(args)
    table = tmp_path / "s" / "sweep.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 1
    table.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["assoc", "fit", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "sweep.parquet fails its sha256" in err and not (tmp_path / "s" / "fit.json").exists()


def test_sweep_refuses_a_folder_with_files_memscan_did_not_write(capsys, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    args = ["assoc", "sweep", "--out", str(tmp_path / "s"), "--dims", "10", "--samples", "10", "--seeds", "1",
            "--n-tokens", "20", "--schemes", "p"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and "notes.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--allow-other-files"])
    assert exit_info.value.code == 0 and (tmp_path / "s" / "notes.txt").read_text() == "mine"
