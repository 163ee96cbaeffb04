"""Edges stated: TPR at an FPR too fine for the non-members, the AUC interval at the boundary, verbatim's dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from memscan import membership
from memscan.cli import main
from tests.test_membership import brute_tpr_at_fpr, gaussian_sample
from tests.test_score import settings, write_source


def separated(members: int, non_members: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every member scores above every non-member: AUC 1."""
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.uniform(2, 3, members), rng.uniform(0, 1, non_members)]
    return scores, np.r_[np.ones(members, int), np.zeros(non_members, int)]


def clopper_pearson_low(successes: int, trials: int, level: float) -> float:
    """The lower end of the two-sided Clopper-Pearson interval: the alpha/2 quantile of Beta(x, n - x + 1)."""
    return float(stats.beta.ppf((1 - level) / 2, successes, trials - successes + 1))


# ---------------------------------------------------------------- TPR at an FPR the non-members cannot resolve


@pytest.mark.parametrize("non_members, null_keys", [(500, ["tpr@0.1%fpr"]), (999, ["tpr@0.1%fpr"]), (1000, []),
                                                    (99, ["tpr@1%fpr", "tpr@0.1%fpr"]), (100, ["tpr@0.1%fpr"])])
def test_tpr_below_one_over_non_members_is_null_with_its_reason(non_members, null_keys):
    rng = np.random.default_rng(non_members)
    scores = np.r_[rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, non_members)]
    labels = np.r_[np.ones(300, int), np.zeros(non_members, int)]
    row = membership.membership_metrics({"s": scores}, labels, resamples=20)["s"]
    for key, fpr, needed in (("tpr@1%fpr", 0.01, "100"), ("tpr@0.1%fpr", 0.001, "1,000")):
        if key in null_keys:
            assert row[key] == {"value": None, "low": None, "high": None,
                                "reason": f"needs at least {needed} non-members for a {100 * fpr:g}% FPR; "
                                          f"has {non_members:,}"}
        else:
            assert row[key]["value"] == pytest.approx(brute_tpr_at_fpr(scores, labels, fpr), abs=1e-12)
            assert row[key]["low"] <= row[key]["value"] <= row[key]["high"]
    assert json.loads(json.dumps(row, allow_nan=False)) == row         # null in metrics.json, never NaN


def test_non_members_needed():
    assert [membership.non_members_needed(f) for f in (0.01, 0.001, 0.3, 0.05, 1.0, 0.0)] == [100, 1000, 4, 20, 1, 1]


# ---------------------------------------------------------------- the AUC interval at the boundary


@pytest.mark.parametrize("members, non_members, level", [(50, 50, 0.95), (500, 500, 0.95), (30, 200, 0.95),
                                                         (200, 30, 0.9), (7, 9, 0.99)])
def test_auc_interval_at_perfect_separation_excludes_1_only_as_its_method_allows(members, non_members, level):
    scores, labels = separated(members, non_members)
    k = min(members, non_members)
    want = clopper_pearson_low(k, k, level)
    # the defining property: at theta = the bound, all k disjoint pairs concordant has probability alpha/2
    assert stats.binom.pmf(k, k, want) == pytest.approx((1 - level) / 2, rel=1e-9)
    assert membership.bootstrap_interval(membership.roc_auc, scores, labels, 200, level) == (1.0, 1.0)
    low, high = membership.auc_interval(scores, labels, resamples=200, level=level)
    assert low == pytest.approx(want, rel=1e-12) and low < 1.0 and high == 1.0
    low, high = membership.auc_interval(-scores, labels, resamples=200, level=level)   # AUC 0: the mirror image
    assert (low, high) == (0.0, pytest.approx(1.0 - want, rel=1e-12))


def test_auc_interval_examples_at_95_percent():
    """The numbers reading-a-report.md quotes."""
    assert membership.separation_bound(50, 50) == pytest.approx(0.9289, abs=5e-5)
    assert membership.separation_bound(500, 500) == pytest.approx(0.9926, abs=5e-5)
    assert membership.separation_bound(500, 20) == membership.separation_bound(20, 20)


@pytest.mark.parametrize("seed", range(3))
def test_auc_interval_in_the_interior_is_the_bootstrap(seed):
    scores, labels = gaussian_sample(150, 1.0, seed)
    bootstrap = membership.bootstrap_interval(membership.roc_auc, scores, labels, resamples=300, seed=seed)
    assert membership.auc_interval(scores, labels, resamples=300, seed=seed) == bootstrap
    row = membership.membership_metrics({"s": scores}, labels, resamples=300, seed=seed)["s"]
    assert row["auc"] == {"value": membership.roc_auc(scores, labels), "low": bootstrap[0], "high": bootstrap[1]}


def test_one_discordant_pair_gets_no_tighter_low_end_than_perfect_separation():
    scores, labels = separated(50, 50)
    scores[0] = scores[50:].max() - 1e-9                   # one member below one non-member: 1 pair of 2,500 swapped
    assert membership.roc_auc(scores, labels) == pytest.approx(1 - 1 / 2500)
    low_bootstrap, high_bootstrap = membership.bootstrap_interval(membership.roc_auc, scores, labels, 300)
    assert low_bootstrap > clopper_pearson_low(50, 50, 0.95)   # the bootstrap alone would claim more
    assert membership.auc_interval(scores, labels, 300) == (pytest.approx(clopper_pearson_low(50, 50, 0.95), rel=1e-12),
                                                            high_bootstrap)


# ---------------------------------------------------------------- through the commands


@pytest.fixture(scope="module")
def dataset(qf_model, tmp_path_factory):
    from memscan.extract import extract

    root = tmp_path_factory.mktemp("edges")
    extract(settings(qf_model, write_source(root)), root / "data")
    return root


def run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 0, argv


def test_score_prints_the_reason_for_a_null_tpr(dataset, capsys):
    run(["score", str(dataset / "data"), "--out", str(dataset / "score"), "--resamples", "20"])
    printed = capsys.readouterr().out
    metrics = json.loads((dataset / "score" / "metrics.json").read_text())
    loss = metrics["scores"]["loss"]
    assert loss["non_members"] < 100 and loss["tpr@1%fpr"]["value"] is None
    assert '"value": null' in (dataset / "score" / "metrics.json").read_text()
    auc = loss["auc"]
    assert (f"loss             AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]   TPR@1%FPR n/a (needs at "
            f"least 100 non-members for a 1% FPR; has {loss['non_members']})") in printed.splitlines()


@pytest.mark.parametrize("flags, cpu_bf16, used", [([], "1", "fp32"), (["--dtype", "bf16"], "0", "bf16"),
                                                    (["--dtype", "auto"], "1", "bf16"),
                                                    (["--dtype", "auto"], "0", "fp32")])
def test_verbatim_decodes_in_the_dtype_asked_for_and_records_it(dataset, capsys, monkeypatch, flags, cpu_bf16, used):
    monkeypatch.setenv("MEMSCAN_CPU_BF16", cpu_bf16)     # pins what auto picks on this CPU
    out = dataset / f"verbatim-{'-'.join(flags) or 'default'}-{cpu_bf16}"
    run(["verbatim", str(dataset / "data"), "--out", str(out), "--num-chunks", "3", "--prompt-tokens", "8",
         "--suffix-tokens", "4", "--resamples", "20", "--device", "cpu", *flags])
    assert json.loads((out / "summary.json").read_text())["settings"]["dtype"] == used
    assert f"verbatim  {out}: greedy decoding in {used}" in capsys.readouterr().out.splitlines()
