"""Membership inference: per-token statistics, per-chunk scores and their ROC metrics.

The field's first view of memorization beside the activation geometry: can a score tell
training chunks (members) from held-out ones? Arrays in, arrays out, no I/O.

Orientation: every score here is the quantity its name says (`loss_score` the loss, `zlib_score`
the zlib ratio), and MEMBER_WHEN names the side members lie on: "larger" or "smaller".
`membership_metrics` ranks each score by its side (a "smaller" score is negated before the ROC),
so every AUC and TPR reads the same way (labels: 1 = member, 0 = non-member; an AUC above 0.5
says members lie on the expected side). The ROC functions below take scores already oriented
larger = member. Per-token inputs are (m, T) arrays with NaN where a position has no token (no
next token, or a position that was not kept).

Sources of the definitions (re-implemented from the papers; mimir's attacks were read
for the conventions the field uses):
- loss: Yeom et al. 2018; the mean next-token nll of the chunk.
- Min-K% Prob: Shi et al. 2023, "Detecting Pretraining Data from Large Language Models".
- Min-K%++: Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training Data".
- zlib ratio: Carlini et al. 2021, "Extracting Training Data from Large Language Models".
- reference model: Carlini et al. 2021 (and mimir's `ref`): the target's loss against a
  reference model's loss on the same text.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memscan.errors import InputError

log = logging.getLogger(__name__)

# float32 logits upcast at once in `token_statistics`: 4 MiB is 20 rows of a 50k vocabulary (the
# softmax and its products add a few temporaries of the same size).
BLOCK_BYTES = 4 * 2**20
# Bootstrap resamples weighed at once: (resamples, n) float64 weights of at most this many bytes
# (sorting and summing them takes a few times that).
BOOTSTRAP_BLOCK_BYTES = 16 * 2**20
DEFAULT_K = 0.2
DEFAULT_FPRS = (0.01, 0.001)
SIDES = ("larger", "smaller")
# The side members lie on, for each score of this module (named as `memscan score` names its columns).
MEMBER_WHEN = {"loss": "smaller", "min_k": "larger", "min_k_plus_plus": "larger", "zlib": "smaller",
               "reference": "larger"}

# A metric over (scores (n,), labels (n,), weights (R, n) or None) -> (R,) values (a float without
# weights); `roc_auc` and `tpr_at_fpr` are of this kind, which lets the bootstrap weigh many
# resamples with one sort.
Metric = Callable[..., Any]


# ---------------------------------------------------------------- per-token statistics


def row_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nll, mu and sigma^2 of rows of logits (rows, V) for targets (rows,) int64 >= 0.

    nll = -log p(target); mu = sum_z p(z) log p(z) (minus the entropy); sigma^2 = sum_z
    p(z) (log p(z) - mu)^2, computed about mu (two passes) for accuracy. All (rows,)
    float32, on the logits' device. The block a caller passes decides the memory used.
    """
    logp = F.log_softmax(logits.float(), dim=-1)                   # (rows, V)
    p = logp.exp()
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]).square()).sum(-1)
    return nll, mu, var


def block_rows(vocab: int, budget: int = BLOCK_BYTES) -> int:
    """Rows of float32 logits over `vocab` words that fit `budget` bytes (at least one)."""
    return max(1, budget // (4 * vocab))


@torch.inference_mode()
def token_statistics(logits: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                     budget: int = BLOCK_BYTES) -> dict[str, np.ndarray]:
    """Per-token nll and the mean and variance of log p under p, for the membership scores.

    logits: (B, T, V) float (any dtype; CPU or CUDA); targets: (B, T) int64, -1 where a
    position has no target. Rows with a target are taken `block_rows(V, budget)` at a
    time, upcast to float32 one block at a time, so a 50k vocabulary never holds more
    than a few MB of float32 logits at once.

    Returns {"nll", "mu", "var"}: (B, T) float32 numpy arrays, NaN where the target is -1.
    Min-K%++ uses mu and var (Zhang et al. 2024, eq. 3); loss, Min-K% and zlib use nll.
    """
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, dtype=torch.int64, device=logits.device)
    _check_statistics_input(logits, targets)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    out = torch.full((3, flat_targets.numel()), float("nan"), dtype=torch.float32, device=logits.device)
    rows = (flat_targets >= 0).nonzero().squeeze(1)
    for block in rows.split(block_rows(vocab, budget)):
        out[:, block] = torch.stack(row_statistics(flat_logits[block], flat_targets[block]))
    stats = out.reshape(3, *targets.shape).cpu().numpy()
    return {"nll": stats[0], "mu": stats[1], "var": stats[2]}


def _check_statistics_input(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Refuse logits that are not (B, T, V) with targets (B, T)."""
    if logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise InputError(f"logits must be (B, T, V) and targets (B, T); got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    vocab = logits.shape[-1]
    if targets.numel() and (targets.max() >= vocab or targets.min() < -1):
        raise InputError(f"target token ids must lie in [0, {vocab:,}) (the model's vocabulary) or be -1; "
                         f"got {int(targets.min())}..{int(targets.max())}")


# ---------------------------------------------------------------- per-chunk scores


def _per_token(values: np.ndarray, name: str) -> np.ndarray:
    """A per-token array as (m, T) float64; NaN marks positions without a token."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"{name} must be a (chunks, tokens) array; got shape {values.shape}")
    return values


def _check_k(k: float) -> None:
    """Refuse a Min-K% fraction outside (0, 1]."""
    if not 0.0 < k <= 1.0:
        raise InputError(f"k (the Min-K% fraction of tokens) must be in (0, 1]; got {k}")


def _row_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the non-NaN entries of each row (m,); NaN for a row without any."""
    present = ~np.isnan(values)
    count = present.sum(axis=1)
    total = np.where(present, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _lowest_fraction_mean(values: np.ndarray, k: float) -> np.ndarray:
    """Mean of each row's k-fraction lowest non-NaN values (m,): max(1, floor(k n)) of n.

    The count follows Shi et al.'s code (int(n * k), here at least one token); a 1e-9
    slack keeps floor(0.29 * 100) at 29, where the float product is 28.999999999999996.
    NaN for a row without values.
    """
    count = (~np.isnan(values)).sum(axis=1)
    take = np.maximum(1, np.floor(count * k + 1e-9).astype(np.int64))
    ordered = np.sort(values, axis=1)                              # NaN sort last
    prefix = np.cumsum(np.nan_to_num(ordered, nan=0.0), axis=1)    # (m, T)
    rows = np.arange(len(values))
    means = prefix[rows, np.minimum(take, values.shape[1]) - 1] / take
    return np.where(count > 0, means, np.nan)


def loss_score(nll: np.ndarray) -> np.ndarray:
    """The loss: mean nll of each chunk (m,) in nats, from per-token nll (m, T); smaller = member.

    The LOSS attack (Yeom et al. 2018): a model fits its training chunks better. NaN for
    a chunk without a scored token.
    """
    return _row_mean(_per_token(nll, "nll"))


def min_k_score(nll: np.ndarray, k: float = DEFAULT_K) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2023): mean log p of each chunk's k% least likely tokens (m,).

    From per-token nll (m, T) (log p = -nll). The k% least likely tokens are
    max(1, floor(k n)) of the chunk's n scored tokens. Returned as the mean log-likelihood
    itself (<= 0): larger = member (members have fewer surprising tokens). Shi et al. and
    mimir report its negation, where smaller = member.
    """
    _check_k(k)
    return _lowest_fraction_mean(-_per_token(nll, "nll"), k)


def min_k_plus_plus_score(nll: np.ndarray, mu: np.ndarray, var: np.ndarray, k: float = DEFAULT_K) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): Min-K% over normalised log-likelihoods (m,).

    Per token, z_t = (log p(x_t) - mu_t) / sigma_t with mu_t and sigma_t^2 the mean and
    variance of log p(z) under the model's next-token distribution p (from
    `token_statistics`); the score is the mean of the k% lowest z_t, as in `min_k_score`.
    Larger = member (a training token sits at a local maximum of the likelihood, far
    above the distribution's mean). A token whose distribution is a point mass
    (sigma_t = 0) gets z_t = 0: it says nothing either way.
    """
    _check_k(k)
    logp = -_per_token(nll, "nll")
    mu = _per_token(mu, "mu")
    sigma = np.sqrt(np.maximum(_per_token(var, "var"), 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sigma > 0, (logp - mu) / sigma, np.where(np.isnan(logp), np.nan, 0.0))
    return _lowest_fraction_mean(z, k)


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (default level): Carlini et al.'s zlib entropy."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(nll: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """The zlib ratio (Carlini et al. 2021): mean_nll / zlib_length(text), (m,); smaller = member.

    mean_nll is the chunk's mean next-token nll in nats (Carlini's log-perplexity) and
    zlib_length the byte length of the chunk's zlib-compressed UTF-8 text (its "zlib
    entropy"), the ratio mimir computes. Text that compresses well is easy for any model;
    dividing by it discounts that.
    """
    nll = _per_token(nll, "nll")
    if len(texts) != len(nll):
        raise InputError(f"zlib score needs one text per chunk: {len(nll):,} chunks, {len(texts):,} texts")
    lengths = np.array([zlib_length(text) for text in texts], dtype=np.float64)
    return _row_mean(nll) / lengths


def reference_score(nll: np.ndarray, reference_nll: np.ndarray) -> np.ndarray:
    """Reference-model calibration (Carlini et al. 2021): reference loss - target loss, (m,).

    The target model's mean nll over each chunk, taken from the reference model's mean
    nll over the same chunk (each (m, T) per-token nll; the two may have different token
    counts when the tokenizers differ). This is the target-minus-reference loss difference
    negated, so that larger = member: the target fits its own training text better than a
    model that never saw it.
    """
    nll = _per_token(nll, "nll")
    reference_nll = _per_token(reference_nll, "reference nll")
    if len(nll) != len(reference_nll):
        raise InputError(f"the reference model scored {len(reference_nll):,} chunks, the target {len(nll):,}")
    return _row_mean(reference_nll) - _row_mean(nll)


# ---------------------------------------------------------------- ROC metrics


def _check_labelled(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scores (n,) finite float64 and labels (n,) in {0, 1} with both classes, or InputError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise InputError(f"scores and labels must be 1-d arrays of one length; got {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():
        raise InputError(f"scores must be finite; {int((~np.isfinite(scores)).sum()):,} of {len(scores):,} are not")
    values = np.unique(labels)
    if not np.isin(values, [0, 1]).all():
        raise InputError(f"labels must be 1 (member) or 0 (non-member); got values {values.tolist()[:5]}")
    members = int((labels == 1).sum())
    if members == 0 or members == len(labels):
        raise InputError(f"membership metrics need members and non-members; got {members:,} members and "
                         f"{len(labels) - members:,} non-members")
    return scores, labels.astype(np.float64)


def _roc_counts(scores: np.ndarray, labels: np.ndarray,
                weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted false and true positive counts at each distinct threshold, highest first.

    weights: None, (n,) or (R, n). Returns fps and tps (..., G + 1) and thresholds
    (G + 1,), starting at (0, 0) for threshold +inf, as sklearn's roc_curve without
    dropping points. Tied scores form one step, which is what counts a tie as 1/2 in
    the area under the curve.
    """
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]   # last index of each tie group
    w = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)[..., order]
    positive = labels[order]
    tps = np.cumsum(w * positive, axis=-1)[..., ends]
    fps = np.cumsum(w * (1.0 - positive), axis=-1)[..., ends]
    zero = np.zeros(tps.shape[:-1] + (1,))
    thresholds = np.r_[np.inf, ordered[ends]]
    return np.concatenate([zero, fps], axis=-1), np.concatenate([zero, tps], axis=-1), thresholds


def _rates(scores: np.ndarray, labels: np.ndarray,
           weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the ROC curve, with the (0, 0) point first."""
    fps, tps, thresholds = _roc_counts(scores, labels, weights)
    return fps / fps[..., -1:], tps / tps[..., -1:], thresholds


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR and thresholds (G + 1,) of scores (n,) against labels (n,), 1 = member.

    As sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False): one point per
    distinct score, from highest to lowest, after a first point (0, 0) at threshold +inf;
    a chunk is called a member when its score is >= the threshold.
    """
    scores, labels = _check_labelled(scores, labels)
    return _rates(scores, labels, None)


def roc_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """Area under the ROC curve: P(member score > non-member score), a tie counted 1/2.

    The Mann-Whitney statistic, here the trapezoidal area of `roc_curve`, where a tie
    group is one diagonal step. weights (R, n): per-sample multiplicities of R resamples
    (as `bootstrap_interval` passes them), giving an (R,) array; without, a float.
    """
    scores, labels = _check_labelled(scores, labels)
    fpr, tpr, _ = _rates(scores, labels, weights)
    area = (np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]) / 2).sum(axis=-1)
    return float(area) if weights is None else area


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float,
               weights: np.ndarray | None = None) -> float | np.ndarray:
    """The largest TPR among the ROC points whose FPR is <= `fpr`, as the field reports it.

    Carlini et al. 2022 ("Membership Inference Attacks From First Principles") argue for
    this low-FPR operating point over the AUC. With fewer than 1/fpr non-members it is
    the TPR at zero false positives (`membership_metrics` reports null there). weights: as
    in `roc_auc`.
    """
    if not 0.0 <= fpr <= 1.0:
        raise InputError(f"the false positive rate must be in [0, 1]; got {fpr}")
    scores, labels = _check_labelled(scores, labels)
    rates, tpr, _ = _rates(scores, labels, weights)
    # Both rates grow along the curve, so the last point within the budget has the largest TPR.
    best = np.where(rates <= fpr, tpr, 0.0).max(axis=-1)
    return float(best) if weights is None else best


def _resample_counts(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """Multiplicities (resamples, size) of `size` draws with replacement from `size` items."""
    draws = rng.integers(0, size, (resamples, size)) + size * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * size).reshape(resamples, size)


def _stratified_weights(labels: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (b, n) weights: members and non-members each resampled to their own count."""
    rng = np.random.default_rng(seed)
    members = np.flatnonzero(labels == 1)
    others = np.flatnonzero(labels != 1)
    block = max(1, BOOTSTRAP_BLOCK_BYTES // (8 * len(labels)))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        weights = np.zeros((size, len(labels)))
        weights[:, members] = _resample_counts(rng, len(members), size)
        weights[:, others] = _resample_counts(rng, len(others), size)
        yield weights


def _check_level(level: float) -> None:
    """Refuse an interval level outside (0, 1)."""
    if not 0.0 < level < 1.0:
        raise InputError(f"the interval level must be in (0, 1); got {level}")


def bootstrap_interval(metric: Metric, scores: np.ndarray, labels: np.ndarray, resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of metric(scores, labels).

    Stratified: each resample draws the members and the non-members separately, with
    replacement, each to its own count, so every resample keeps the class balance (and
    both classes). A resample is a weight vector of multiplicities, and the metric is
    called as metric(scores, labels, weights=(b, n)) for b resamples at once, returning
    (b,) values: one sort serves a block. `roc_auc` and `functools.partial(tpr_at_fpr,
    fpr=...)` take that form. Seeded: the same inputs give the same interval.
    """
    if resamples < 1:
        raise InputError(f"the bootstrap needs at least 1 resample; got {resamples}")
    _check_level(level)
    scores, labels = _check_labelled(scores, labels)
    values = np.concatenate([np.asarray(metric(scores, labels, weights=w), dtype=np.float64)
                             for w in _stratified_weights(labels, resamples, seed)])
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def separation_bound(members: int, non_members: int, level: float = 0.95) -> float:
    """(alpha/2)^(1/k), k = min(m, n): the exact lower bound on the AUC where the sample separates perfectly.

    The bootstrap cannot see past a perfect separation (every resample of separated samples
    is separated, so its interval is [1, 1]). Any k = min(m, n) disjoint member/non-member
    pairs are independent, each concordant with probability at most theta = P(member score
    > non-member score) (ties counted 1/2), and a perfect separation makes all k concordant:
    P(AUC = 1) <= theta^k (Hoeffding 1963, section 5). theta^k = alpha/2 is the one-sided
    Clopper-Pearson bound for k successes in k trials, at the lower end of a `level`
    two-sided interval.
    """
    _check_level(level)
    if min(members, non_members) < 1:
        raise InputError(f"the AUC needs members and non-members; got {members:,} and {non_members:,}")
    return float(((1.0 - level) / 2) ** (1.0 / min(members, non_members)))


def auc_interval(scores: np.ndarray, labels: np.ndarray, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """The AUC's stratified bootstrap interval, widened at the boundaries to a perfect separation's exact bound.

    The low end is at most `separation_bound` and the high end at least 1 minus it: where the
    AUC is 1 (or 0) these are the exact Clopper-Pearson ends in place of the bootstrap's
    [1, 1] (or [0, 0]), and no sample gets a tighter end than a perfectly separated one of
    its size. Where the bootstrap's ends are wider (the interior) they are returned unchanged.
    """
    low, high = bootstrap_interval(roc_auc, scores, labels, resamples, level, seed)
    members = int((np.asarray(labels) == 1).sum())
    bound = separation_bound(members, len(labels) - members, level)
    return min(low, bound), max(high, 1.0 - bound)


def non_members_needed(fpr: float) -> int:
    """ceil(1/fpr): the fewest non-members at which one false positive stays within `fpr` (1 for fpr 0)."""
    return math.ceil(1.0 / fpr - 1e-9) if fpr > 0 else 1


def _tpr_key(fpr: float) -> str:
    """The metrics key of the TPR at `fpr`: tpr@1%fpr."""
    return f"tpr@{100 * fpr:g}%fpr"


def _estimate(value: float, interval: tuple[float, float]) -> dict[str, float]:
    """An estimate as metrics.json records it: {value, low, high}."""
    return {"value": float(value), "low": interval[0], "high": interval[1]}


def _tpr_estimate(scores: np.ndarray, labels: np.ndarray, fpr: float, resamples: int, level: float,
                  seed: int) -> dict[str, Any]:
    """TPR at `fpr` with its interval; null with the reason where too few non-members make it the TPR at 0 FPR."""
    needed, non_members = non_members_needed(fpr), int((labels != 1).sum())
    if non_members < needed:
        return {"value": None, "low": None, "high": None,
                "reason": f"needs at least {needed:,} non-members for a {100 * fpr:g}% FPR; has {non_members:,}"}
    metric = functools.partial(tpr_at_fpr, fpr=fpr)
    return _estimate(metric(scores, labels), bootstrap_interval(metric, scores, labels, resamples, level, seed))


def oriented(values: np.ndarray, side: str) -> np.ndarray:
    """A score (n,) as larger = member: negated where members lie on the smaller side."""
    if side not in SIDES:
        raise InputError(f"a score's member side must be one of {', '.join(SIDES)}; got {side!r}")
    values = np.asarray(values, dtype=np.float64)
    return -values if side == "smaller" else values


def membership_metrics(scores: Mapping[str, np.ndarray], labels: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS,
                       resamples: int = 1000, level: float = 0.95, seed: int = 0,
                       member_when: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """AUC and TPR at each FPR in `fprs`, each with its interval, per named score.

    scores: name -> (n,) scores, NaN for a chunk the score cannot rate; member_when: name ->
    "larger" or "smaller", the side members lie on (default "larger"; a "smaller" score is
    ranked by its negation, so its AUC is P(member score < non-member score)); labels: (n,)
    1 = member, 0 = non-member. Each score is measured on its own finite rows, whose counts
    are recorded. Returns, e.g. for "loss":
    {"loss": {"member_when": "smaller", "members": 500, "non_members": 500,
              "auc": {"value": .71, "low": .68, "high": .74},
              "tpr@1%fpr": {...}, "tpr@0.1%fpr": {...}}}
    (the content of metrics.json). The AUC's interval is `auc_interval`'s, a TPR's the
    bootstrap's; a TPR at an FPR below 1 / non-members is null, its reason beside it
    ({"value": None, "low": None, "high": None, "reason": "needs at least 1,000
    non-members for a 0.1% FPR; has 500"}). Every number is finite.
    """
    labels = np.asarray(labels)
    table = {}
    sides = member_when or {}
    for name, values in scores.items():
        side = sides.get(name, "larger")
        values = oriented(values, side)
        if values.shape != labels.shape:
            raise InputError(f"score {name!r} has {values.shape} values for {labels.shape} labels")
        keep = np.isfinite(values)
        kept_scores, kept_labels = values[keep], labels[keep]
        row: dict[str, Any] = {"member_when": side, "members": int((kept_labels == 1).sum()),
                               "non_members": int((kept_labels != 1).sum())}
        row["auc"] = _estimate(roc_auc(kept_scores, kept_labels),
                               auc_interval(kept_scores, kept_labels, resamples, level, seed))
        for fpr in fprs:
            row[_tpr_key(fpr)] = _tpr_estimate(kept_scores, kept_labels, fpr, resamples, level, seed)
        log.info("%s: AUC %.3f [%.3f, %.3f] over %d members, %d non-members", name, row["auc"]["value"],
                 row["auc"]["low"], row["auc"]["high"], row["members"], row["non_members"])
        table[name] = row
    return table
