"""Membership scores and metrics against sklearn and direct float64 computations."""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from memscan import membership
from memscan.errors import InputError


def tied_scores(n: int, seed: int, levels: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Scores on a few distinct values (many ties), members shifted up a little."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(0.6 * labels, 1.0) * levels / 3) / levels
    return scores, labels


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Every member/non-member pair: 1 when the member scores higher, 1/2 on a tie."""
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def brute_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Every threshold (call >= t a member): the largest TPR with FPR <= fpr."""
    best = 0.0
    for t in np.r_[np.inf, np.unique(scores)]:
        called = scores >= t
        if called[labels == 0].mean() <= fpr:
            best = max(best, called[labels == 1].mean())
    return best


def padded(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def ragged_nll(seed: int, m: int = 12, width: int = 23) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.exponential(2.0, rng.integers(1, width + 1)) for _ in range(m)]


def direct_min_k(logp: np.ndarray, k: float) -> float:
    take = max(1, int(len(logp) * k + 1e-9))
    return float(np.sort(logp)[:take].mean())


# ---------------------------------------------------------------- ROC metrics


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_and_pairs_with_ties(seed):
    scores, labels = tied_scores(300, seed)
    assert len(np.unique(scores)) < 20  # the case under test: many ties
    auc = membership.roc_auc(scores, labels)
    assert auc == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert auc == pytest.approx(brute_auc(scores, labels), abs=1e-12)


def test_auc_orientation_larger_is_member():
    labels = np.array([0, 0, 1, 1])
    assert membership.roc_auc(np.array([0.0, 1.0, 2.0, 3.0]), labels) == 1.0
    assert membership.roc_auc(np.array([3.0, 2.0, 1.0, 0.0]), labels) == 0.0
    assert membership.roc_auc(np.zeros(4), labels) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed):
    scores, labels = tied_scores(200, seed)
    fpr, tpr, thresholds = membership.roc_curve(scores, labels)
    want_fpr, want_tpr, want_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, want_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds, want_thresholds)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr", [0.0, 0.001, 0.01, 0.05, 0.3, 1.0])
def test_tpr_at_fpr_matches_brute_force_and_sklearn(seed, fpr):
    scores, labels = tied_scores(400, seed, levels=40)
    got = membership.tpr_at_fpr(scores, labels, fpr)
    assert got == pytest.approx(brute_tpr_at_fpr(scores, labels, fpr), abs=1e-12)
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert got == pytest.approx(sk_tpr[sk_fpr <= fpr].max(), abs=1e-12)


def test_tpr_at_fpr_is_not_interpolated_between_points():
    # Points (0, 0), (1/2, 1/2), (1, 1) lie on a line; at FPR 0.4 only (0, 0) is allowed.
    scores = np.array([2.0, 2.0, 1.0, 1.0])
    labels = np.array([1, 0, 1, 0])
    assert membership.tpr_at_fpr(scores, labels, 0.4) == 0.0
    assert membership.tpr_at_fpr(scores, labels, 0.5) == 0.5


def test_weights_equal_repeated_samples():
    scores, labels = tied_scores(60, 0)
    rng = np.random.default_rng(1)
    weights = rng.integers(0, 4, (3, len(scores)))
    weights[:, :2] = 1  # both classes stay present
    aucs = membership.roc_auc(scores, labels, weights=weights)
    tprs = membership.tpr_at_fpr(scores, labels, 0.1, weights=weights)
    for r in range(3):
        repeated_scores, repeated_labels = np.repeat(scores, weights[r]), np.repeat(labels, weights[r])
        assert aucs[r] == pytest.approx(skm.roc_auc_score(repeated_labels, repeated_scores), abs=1e-12)
        assert tprs[r] == pytest.approx(brute_tpr_at_fpr(repeated_scores, repeated_labels, 0.1), abs=1e-12)


def test_bootstrap_is_stratified_and_seeded():
    scores, labels = tied_scores(50, 0)

    def weighted_members(scores, labels, weights=None):
        return (weights * labels).sum(axis=-1)

    members = int(labels.sum())
    assert membership.bootstrap_interval(weighted_members, scores, labels, resamples=200) == (members, members)
    first = membership.bootstrap_interval(membership.roc_auc, scores, labels, resamples=200, seed=3)
    assert first == membership.bootstrap_interval(membership.roc_auc, scores, labels, resamples=200, seed=3)
    assert first != membership.bootstrap_interval(membership.roc_auc, scores, labels, resamples=200, seed=4)


def test_bootstrap_blocks_cover_every_resample_once(monkeypatch):
    scores, labels = tied_scores(80, 1)
    blocks = []

    def record(scores, labels, weights=None):
        blocks.append(weights.copy())
        return (weights * labels).sum(axis=-1)

    monkeypatch.setattr(membership, "BOOTSTRAP_BLOCK_BYTES", 8 * 80 * 7)  # blocks of 7 resamples
    membership.bootstrap_interval(record, scores, labels, resamples=100)
    assert [len(b) for b in blocks] == [7] * 14 + [2]
    weights = np.concatenate(blocks)
    np.testing.assert_array_equal(weights[:, labels == 1].sum(axis=1), labels.sum())
    np.testing.assert_array_equal(weights[:, labels == 0].sum(axis=1), (labels == 0).sum())
    assert len(np.unique(weights, axis=0)) == 100  # each block draws afresh


def gaussian_sample(n: int, delta: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(delta, 1.0, n), rng.normal(0.0, 1.0, n)]
    return scores, np.r_[np.ones(n, int), np.zeros(n, int)]


def test_bootstrap_interval_covers_the_true_auc():
    delta = 1.0
    true_auc = 0.5 * (1.0 + math.erf(delta / 2.0))  # Phi(delta / sqrt 2)
    covered = []
    for seed in range(20):
        scores, labels = gaussian_sample(150, delta, seed)
        low, high = membership.bootstrap_interval(membership.roc_auc, scores, labels, resamples=400, seed=seed)
        assert low <= membership.roc_auc(scores, labels) <= high
        covered.append(low <= true_auc <= high)
    assert np.mean(covered) >= 0.8


def test_bootstrap_interval_shrinks_with_more_samples():
    widths = []
    for n in (50, 200, 800):
        low, high = membership.bootstrap_interval(membership.roc_auc, *gaussian_sample(n, 1.0, 0), resamples=400)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.5 * widths[0]  # ~1/sqrt(n): a quarter, with room for noise


def test_membership_metrics_table():
    scores, labels = gaussian_sample(300, 2.0, 0)
    noisy = scores.copy()
    noisy[:5] = np.nan  # chunks a score cannot rate are left out of that score only
    table = membership.membership_metrics({"good": scores, "noise": -scores, "holes": noisy}, labels,
                                          resamples=200)
    assert set(table) == {"good", "noise", "holes"}
    good = table["good"]
    assert set(good) == {"member_when", "members", "non_members", "auc", "tpr@1%fpr", "tpr@0.1%fpr"}
    assert good["member_when"] == "larger"
    assert (good["members"], good["non_members"]) == (300, 300)
    assert (table["holes"]["members"], table["holes"]["non_members"]) == (295, 300)
    assert good["auc"]["value"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert good["tpr@1%fpr"]["value"] == pytest.approx(brute_tpr_at_fpr(scores, labels, 0.01))
    assert table["noise"]["auc"]["value"] == pytest.approx(1 - good["auc"]["value"])
    for row in table.values():
        for key in ("auc", "tpr@1%fpr"):
            assert row[key]["low"] <= row[key]["value"] <= row[key]["high"]
            assert all(np.isfinite(list(row[key].values())))
        # 300 non-members cannot resolve a 0.1% FPR
        assert row["tpr@0.1%fpr"] == {"value": None, "low": None, "high": None,
                                      "reason": "needs at least 1,000 non-members for a 0.1% FPR; has 300"}


def test_a_smaller_side_score_is_ranked_by_its_negation():
    scores, labels = gaussian_sample(300, 1.0, 0)
    larger = membership.membership_metrics({"s": scores}, labels, resamples=100, seed=3)["s"]
    smaller = membership.membership_metrics({"s": -scores}, labels, resamples=100, seed=3,
                                            member_when={"s": "smaller"})["s"]
    assert smaller.pop("member_when") == "smaller" and larger.pop("member_when") == "larger"
    assert smaller == larger   # every number identical, intervals included
    assert smaller["auc"]["value"] == pytest.approx(skm.roc_auc_score(labels, scores))
    with pytest.raises(InputError, match="member side"):
        membership.membership_metrics({"s": scores}, labels, member_when={"s": "up"})


@pytest.mark.parametrize("labels, scores, match", [
    (np.ones(5), np.arange(5.0), "members and non-members"),
    (np.zeros(5), np.arange(5.0), "members and non-members"),
    (np.array([0, 1, 2]), np.arange(3.0), "1 \\(member\\) or 0"),
    (np.array([0, 1]), np.arange(3.0), "one length"),
    (np.array([0, 1, 1]), np.array([0.0, np.nan, 1.0]), "finite"),
])
def test_bad_labels_and_scores_are_one_line_errors(labels, scores, match):
    with pytest.raises(InputError, match=match) as error:
        membership.roc_auc(scores, labels)
    assert "\n" not in str(error.value)


def test_bad_metric_settings():
    scores, labels = tied_scores(20, 0)
    with pytest.raises(InputError, match="false positive rate"):
        membership.tpr_at_fpr(scores, labels, 1.5)
    with pytest.raises(InputError, match="level"):
        membership.bootstrap_interval(membership.roc_auc, scores, labels, level=1.0)
    with pytest.raises(InputError, match="resample"):
        membership.bootstrap_interval(membership.roc_auc, scores, labels, resamples=0)


# ---------------------------------------------------------------- per-chunk scores


def test_loss_score_is_the_mean_nll():
    rows = ragged_nll(0)
    got = membership.loss_score(padded(rows, 23))
    np.testing.assert_allclose(got, [row.mean() for row in rows], rtol=1e-12)
    assert membership.MEMBER_WHEN["loss"] == "smaller"
    assert np.isnan(membership.loss_score(np.full((1, 4), np.nan)))[0]


@pytest.mark.parametrize("k", [0.05, 0.2, 0.3, 0.5, 1.0])
def test_min_k_matches_direct_computation(k):
    rows = ragged_nll(1)
    got = membership.min_k_score(padded(rows, 23), k)
    np.testing.assert_allclose(got, [direct_min_k(-row, k) for row in rows], rtol=1e-12)


def test_min_k_counts_and_orientation():
    nll = np.array([[5.0, 1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    assert membership.min_k_score(nll, 0.2)[0] == pytest.approx(-(5.0 + 1.0) / 2)   # 2 of 10 tokens
    assert membership.min_k_score(nll, 0.3)[0] == pytest.approx(-(5.0 + 1.0 + 0.8) / 3)  # 0.3 * 10 is 3
    assert membership.min_k_score(nll, 0.01)[0] == pytest.approx(-5.0)                # at least one token
    hundred = np.arange(100.0)[None, :]
    assert membership.min_k_score(hundred, 0.29)[0] == pytest.approx(-np.arange(71.0, 100.0).mean())  # 29 tokens
    assert membership.min_k_score(nll * 0.5, 0.2)[0] > membership.min_k_score(nll, 0.2)[0]  # likelier: larger
    with pytest.raises(InputError, match="k"):
        membership.min_k_score(nll, 0.0)


@pytest.mark.parametrize("k", [0.1, 0.2, 0.6])
def test_min_k_plus_plus_matches_direct_computation(k):
    rows = ragged_nll(2)
    rng = np.random.default_rng(3)
    mus = [-rng.exponential(2.0, len(row)) for row in rows]
    variances = [rng.exponential(1.0, len(row)) for row in rows]
    got = membership.min_k_plus_plus_score(padded(rows, 23), padded(mus, 23), padded(variances, 23), k)
    want = [direct_min_k((-row - mu) / np.sqrt(var), k) for row, mu, var in zip(rows, mus, variances)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_min_k_plus_plus_point_mass_token_is_neutral():
    nll, mu, var = np.array([[0.0, 2.0]]), np.array([[0.0, -1.0]]), np.array([[0.0, 4.0]])
    # tokens: z = 0 (point mass), z = (-2 + 1) / 2 = -0.5; k = 1 takes both
    assert membership.min_k_plus_plus_score(nll, mu, var, 1.0)[0] == pytest.approx(-0.25)


def test_zlib_score_matches_direct_computation():
    rows = ragged_nll(4, m=4)
    texts = ["", "abc abc abc abc abc abc", "naïve café, Straße " * 5, "the quick brown fox"]
    got = membership.zlib_score(padded(rows, 23), texts)
    want = [row.mean() / len(zlib.compress(text.encode("utf-8"))) for row, text in zip(rows, texts)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(InputError, match="one text per chunk"):
        membership.zlib_score(padded(rows, 23), texts[:3])


def test_reference_score_is_reference_loss_minus_target_loss():
    target, reference = ragged_nll(5, m=6), ragged_nll(6, m=6, width=30)
    got = membership.reference_score(padded(target, 23), padded(reference, 30))
    np.testing.assert_allclose(got, [r.mean() - t.mean() for t, r in zip(target, reference)], rtol=1e-12)


# ---------------------------------------------------------------- per-token statistics


def direct_statistics(logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
    p = np.exp(logp)
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[..., None]) ** 2).sum(-1)
    nll = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    none = targets < 0
    return {"nll": np.where(none, np.nan, nll), "mu": np.where(none, np.nan, mu), "var": np.where(none, np.nan, var)}


@pytest.mark.parametrize("budget", [membership.BLOCK_BYTES, 4 * 97 * 2, 1])  # one block, 2 rows, 1 row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_statistics_match_float64(budget, dtype):
    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(0, 3, (3, 7, 97)), dtype=dtype)
    targets = rng.integers(0, 97, (3, 7))
    targets[0, 2] = targets[2, 6] = targets[1, 0] = -1
    got = membership.token_statistics(logits, torch.as_tensor(targets), budget=budget)
    want = direct_statistics(logits.double().numpy(), targets)  # bf16 logits are exact in float64
    for key in ("nll", "mu", "var"):
        assert got[key].dtype == np.float32 and got[key].shape == (3, 7)
        np.testing.assert_array_equal(np.isnan(got[key]), targets < 0)
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_token_statistics_feed_min_k_plus_plus():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, 5, 11))
    targets = rng.integers(0, 11, (2, 5))
    stats = membership.token_statistics(torch.as_tensor(logits, dtype=torch.float32), targets)
    want = direct_statistics(logits, targets)
    z = (-want["nll"] - want["mu"]) / np.sqrt(want["var"])
    got = membership.min_k_plus_plus_score(stats["nll"], stats["mu"], stats["var"], 0.4)
    np.testing.assert_allclose(got, [np.sort(row)[:2].mean() for row in z], rtol=1e-4)


def test_token_statistics_bad_targets():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(InputError, match="vocabulary"):
        membership.token_statistics(logits, torch.tensor([[0, 5, -1]]))
    with pytest.raises(InputError, match="targets"):
        membership.token_statistics(logits, torch.tensor([[0, 1]]))


def test_bootstrap_metric_partial_form():
    scores, labels = gaussian_sample(100, 1.0, 0)
    metric = functools.partial(membership.tpr_at_fpr, fpr=0.05)
    low, high = membership.bootstrap_interval(metric, scores, labels, resamples=200)
    assert low <= metric(scores, labels) <= high
