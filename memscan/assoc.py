"""The associative-memory scaling-law sandbox of Cabannes, Dohmatob and Bietti (ICLR 2024).

Tokens x in [N] are Zipf, p(x) ~ (x + 1)^-alpha; the target is f*(x) = x mod M; embeddings
e_x ~ N(0, I/d) and unit u_y; the memory is W = sum_x q(x) u_f*(x) e_x^T and predicts
argmax_y u_y^T W e_x. The error is the exact population error sum_x p(x) 1[wrong], a tie
counting as wrong. Scores for any weighting q are S = G (q * F) with the Gram matrix
G = E E^T (N, N) and F = U[f*] U^T (N, M), so one O(N^2 d) product per (seed, d) serves
every scheme and every sample size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import memscan.store as store
from memscan import files, folders
from memscan.errors import InputError
from memscan.fields import setting
from memscan.results import StageResult

log = logging.getLogger(__name__)

SCHEMES = ("p", "p_hat", "seen", "threshold", "top_seen", "sgd_small", "sgd_large", "adam")
MAX_ARRAY_NUMBERS = 4 * 10**9   # float64s in the largest array a sweep may allocate (32 GB); a larger sweep is refused
THEORY_SLOPES = {  # (axis, slope as a function of alpha): docs/theory.md's rates
    "p": ("d", lambda a: -(a - 1) / (2 * a)),
    "threshold": ("d", lambda a: -a + 1),
    "seen": ("T", lambda a: -1 + 1 / a),
    "p_hat": ("d", lambda a: -(a - 1) / (2 * a)),
    "top_seen": ("d", lambda a: -a + 1),
}


@dataclass(frozen=True)
class SweepSettings:
    """A sweep over dimensions d, sample sizes T, schemes and seeds at one (N, M, alpha)."""

    n_tokens: int = setting(1000, "N, the number of input tokens.")
    classes: int = setting(5, "M, the number of classes (x mod M).")
    alpha: float = setting(2.0, "Zipf exponent of the inputs.")
    dims: tuple[int, ...] = setting((10, 20, 50, 100, 200, 500, 1000), "Dimensions d, comma-separated (1e3 allowed).")
    samples: tuple[int, ...] = setting((10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000),
                                       "Sample sizes T, comma-separated (1e3 allowed).")
    seeds: int = setting(20, "Seeds per (d, T) cell.")
    schemes: tuple[str, ...] = setting(SCHEMES, "Memory schemes, comma-separated.")
    sgd_dims: tuple[int, ...] = (50, 200)          # SGD and Adam train W: a few dimensions and seeds keep it short
    sgd_samples: tuple[int, ...] = (100, 1000, 10000)
    sgd_seeds: int = 5
    sgd_steps: tuple[float, float] = (1e-3, 50.0)  # (small, large) step gamma
    adam_lr: float = 0.1
    threshold_ratio: float = 1 / 8                 # P ~ d / 8 (docs/theory.md)
    top_seen_ratio: float = 1 / 12                 # P ~ d / 12
    learn_embeddings: bool = setting(False, "SGD and Adam also learn the input embeddings.")

    def check(self) -> None:
        """Refuse settings a sweep cannot run, in one line naming the flag."""
        if not self.dims or not self.samples:
            raise InputError(f"--dims and --samples need at least one value each; got dims {list(self.dims)}, "
                             f"samples {list(self.samples)}")
        if min(self.dims) < 1 or min(self.samples) < 1 or min(self.sgd_dims, default=1) < 1:
            raise InputError(f"d and T must be positive; got dims {self.dims}, samples {self.samples}")
        if self.classes > self.n_tokens:
            raise InputError(f"M = {self.classes} classes is larger than the N = {self.n_tokens} tokens")
        if self.classes < 2 or self.seeds < 1:
            raise InputError(f"need at least 2 classes and 1 seed; got M = {self.classes}, seeds = {self.seeds}")
        if not self.alpha > 1:
            raise InputError(f"alpha must be above 1 for the rates to exist; got {self.alpha}")
        unknown = set(self.schemes) - set(SCHEMES)
        if unknown:
            raise InputError(f"unknown scheme(s) {sorted(unknown)}; known: {', '.join(SCHEMES)}")
        if set(self.schemes) & {"sgd_small", "sgd_large", "adam"} and not (self.trained_dims and self.trained_samples):
            raise InputError(f"trained schemes run at d in {self.sgd_dims} and T in {self.sgd_samples}, which must "
                             f"appear in --dims and --samples to be compared with p_hat and seen")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Refuse a sweep whose largest array (E (N, d), G (N, N) or the scores S (K, N, M) of the module docstring)
        could not be held, before any is allocated: one line naming the flag to lower."""
        n, d, k = self.n_tokens, max(self.dims), len(self.schemes) * len(self.samples)
        arrays = ((n * d, "--dims", f"--dims {d} with --n-tokens {n}"), (n * n, "--n-tokens", f"--n-tokens {n}"),
                  (k * n * self.classes, "--classes", f"--classes {self.classes} with --n-tokens {n} and {k} "
                   "weightings"))
        numbers, flag, what = max(arrays)
        if numbers > MAX_ARRAY_NUMBERS:
            raise InputError(f"{what} needs an array of {numbers:.1e} numbers; a sweep holds at most "
                             f"{MAX_ARRAY_NUMBERS:.0e} (32 GB): lower {flag}")

    @property
    def trained_dims(self) -> tuple[int, ...]:
        """The dimensions where trained memories run: those of sgd_dims that the sweep also has."""
        return tuple(d for d in self.sgd_dims if d in self.dims)

    @property
    def trained_samples(self) -> tuple[int, ...]:
        """The sample sizes the trained schemes run at: --sgd-samples that the sweep also has."""
        return tuple(t for t in self.sgd_samples if t in self.samples)


def zipf(n_tokens: int, alpha: float) -> np.ndarray:
    """p(x) proportional to (x + 1)^-alpha over x = 0..N-1: (N,)."""
    weights = (np.arange(n_tokens) + 1.0) ** -alpha
    return weights / weights.sum()


def embeddings(n_tokens: int, classes: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E (N, d) ~ N(0, I/d), U (M, d) unit rows, f* (N,)) for one (seed, d), the same in every pass."""
    rng = np.random.default_rng([seed, d])
    E = rng.normal(size=(n_tokens, d)) / math.sqrt(d)
    U = rng.normal(size=(classes, d))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    return E, U, np.arange(n_tokens) % classes


def population_errors(Q: np.ndarray, G: np.ndarray, F: np.ndarray, target: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Exact error sum_x p(x) 1[f(x) != f*(x)] for each weighting in Q (K, N): (K,). Ties are wrong."""
    S = np.matmul(G, Q[:, :, None] * F[None])                                 # (K, N, M) scores, batched BLAS
    own = np.take_along_axis(S, target[None, :, None], axis=2)[..., 0]
    np.put_along_axis(S, target[None, :, None], -np.inf, axis=2)
    return (~(own > S.max(axis=2))).astype(np.float64) @ p                 # ties and NaN are wrong


def sample_counts(seed: int, T: int, p: np.ndarray) -> np.ndarray:
    """How often each token occurs in T draws: (N,), a function of (seed, T) alone."""
    return np.random.default_rng([seed, T]).multinomial(T, p)


def schemes_q(p: np.ndarray, counts: np.ndarray, d: int, settings: SweepSettings) -> dict[str, np.ndarray]:
    """The fixed memory schemes' weightings q (N,) from the sample counts (N,) of T draws."""
    n = len(p)
    threshold = max(1, round(d * settings.threshold_ratio))
    top = max(1, round(d * settings.top_seen_ratio))
    order = np.lexsort((np.arange(n), -counts))                    # most frequent first, ties by token id
    top_seen = np.zeros(n)
    top_seen[order[:top]] = counts[order[:top]] > 0
    return {"p": p, "p_hat": counts / counts.sum(), "seen": (counts > 0).astype(float),
            "threshold": (np.arange(n) < threshold).astype(float), "top_seen": top_seen}


def train_memory(tokens: np.ndarray, E: np.ndarray, U: np.ndarray, target: np.ndarray, step: float,
                 optimizer: str, learn_embeddings: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(W (S, d, d), E (S, N, d)) trained by cross-entropy from W = 0, one sample per step, one pass.

    tokens (S, T); E (S, N, d) and U (S, M, d) hold each seed's embeddings and the S runs
    advance together. With `learn_embeddings` the input embeddings take plain SGD steps too.
    """
    seeds, d = E.shape[0], E.shape[2]
    E = E.copy()
    W = np.zeros((seeds, d, d))
    first, second = np.zeros_like(W), np.zeros_like(W)
    U_t = U.transpose(0, 2, 1)                                                  # (S, d, M)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported as NaN, not warned per step
        return _steps(tokens, E, U, U_t, target, W, first, second, step, optimizer, learn_embeddings)


def _steps(tokens: np.ndarray, E: np.ndarray, U: np.ndarray, U_t: np.ndarray, target: np.ndarray, W: np.ndarray,
           first: np.ndarray, second: np.ndarray, step: float, optimizer: str,
           learn_embeddings: bool) -> tuple[np.ndarray, np.ndarray]:
    """SGD or Adam on S runs at once (tokens (S, T), one step per column); returns the memories W and embeddings E."""
    rows = np.arange(len(W))
    for t in range(tokens.shape[1]):
        x = tokens[:, t]
        e = E[rows, x][:, :, None]                                              # (S, d, 1)
        logits = np.matmul(U, np.matmul(W, e))[:, :, 0]                         # (S, M)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        probs[rows, target[x]] -= 1.0
        back = np.matmul(U_t, probs[:, :, None])                                  # (S, d, 1) = U^T g
        grad = np.matmul(back, e.transpose(0, 2, 1))                              # (S, d, d) = U^T g e^T
        if learn_embeddings:
            E[rows, x] -= step * np.matmul(W.transpose(0, 2, 1), back)[:, :, 0]    # dL/de = W^T U^T g
        if optimizer == "sgd":
            W -= step * grad
        else:  # Adam with the usual betas, bias-corrected
            first = 0.9 * first + 0.1 * grad
            second = 0.999 * second + 0.001 * grad * grad
            W -= step * (first / (1 - 0.9 ** (t + 1))) / (np.sqrt(second / (1 - 0.999 ** (t + 1))) + 1e-8)
    return W, E


def q_gamma(counts: np.ndarray, step: float, classes: int) -> np.ndarray:
    """The q_gamma approximation: f iterated count(x) times from 0, f(q) = q + gamma / (1 + e^q / M)."""
    q = np.zeros(len(counts))
    for _ in range(int(counts.max(initial=0))):
        active = counts > 0
        q[active] += step / (1 + np.exp(q[active]) / classes)
        counts = counts - active
    return q


def measured_q(W: np.ndarray, E: np.ndarray, U: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each token's correct-class logit u_f*(x)^T W e_x (W, E, U of one seed): the q SGD has learned."""
    return np.einsum("xd,de,xe->x", U[target], W, E)


def trained_errors(W: np.ndarray, E: np.ndarray, U: np.ndarray, target: np.ndarray, p: np.ndarray) -> float:
    """Population error of one trained memory W (d, d); NaN when training diverged."""
    if not (np.isfinite(W).all() and np.isfinite(E).all()):
        return float("nan")
    return float(population_errors(np.ones((1, len(p))), np.eye(len(p)), E @ W.T @ U.T, target, p)[0])


def sweep(settings: SweepSettings) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Errors for every (scheme, d, T, seed), and SGD's measured q against q_gamma; as column dicts.

    Trained memories (SGD, Adam) see a shuffled copy of the very sample whose counts give
    q = p_hat and q = 1[seen], so the regimes compare like with like.
    """
    settings.check()
    started = time.perf_counter()
    p = zipf(settings.n_tokens, settings.alpha)
    rows: dict[str, list[Any]] = {"scheme": [], "d": [], "T": [], "seed": [], "error": [], "seen": []}
    draws = {seed: {T: sample_counts(seed, T, p) for T in settings.samples} for seed in range(settings.seeds)}
    fixed = [s for s in settings.schemes if s in ("p", "p_hat", "seen", "threshold", "top_seen")]
    for seed in range(settings.seeds):
        for d in settings.dims if fixed else ():
            E, U, target = embeddings(settings.n_tokens, settings.classes, d, seed)
            labels, Q = [], []
            for T, counts in draws[seed].items():
                for scheme, q in schemes_q(p, counts, d, settings).items():
                    if scheme in fixed and (T == settings.samples[0] or scheme not in ("p", "threshold")):
                        labels.append((scheme, 0 if scheme in ("p", "threshold") else T, int((counts > 0).sum())))
                        Q.append(q)
            errors = population_errors(np.array(Q), E @ E.T, U[target] @ U.T, target, p)
            for (scheme, T, seen), error in zip(labels, errors):
                _append(rows, scheme, d, T, seed, error, seen)
        log.info("fixed schemes, seed %d (%.1f s)", seed, time.perf_counter() - started)
    q_rows = _trained(settings, p, rows)
    log.info("sweep done in %.1f s", time.perf_counter() - started)
    return ({k: np.asarray(v) for k, v in rows.items()}, {k: np.asarray(v) for k, v in q_rows.items()})


def _trained(settings: SweepSettings, p: np.ndarray, rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """SGD (small and large steps) and Adam, all seeds at once; q of seed 0 against q_gamma."""
    q_rows: dict[str, list[Any]] = {"scheme": [], "d": [], "T": [], "token": [], "count": [],
                                    "q_measured": [], "q_gamma": []}
    trained = [s for s in settings.schemes if s in ("sgd_small", "sgd_large", "adam")]
    steps = {"sgd_small": settings.sgd_steps[0], "sgd_large": settings.sgd_steps[1], "adam": settings.adam_lr}
    seeds = range(min(settings.seeds, settings.sgd_seeds))
    for d in settings.trained_dims if trained else ():
        geometry = [embeddings(settings.n_tokens, settings.classes, d, seed) for seed in seeds]
        E, U, target = np.stack([g[0] for g in geometry]), np.stack([g[1] for g in geometry]), geometry[0][2]
        for T in settings.trained_samples:
            counts = [sample_counts(seed, T, p) for seed in seeds]
            tokens = np.stack([np.random.default_rng([seed, d, T]).permutation(np.repeat(np.arange(len(p)), c))
                               for seed, c in zip(seeds, counts)])
            for scheme in trained:
                W, learned = train_memory(tokens, E, U, target, steps[scheme], "adam" if scheme == "adam" else "sgd",
                                          settings.learn_embeddings)
                for seed in seeds:
                    error = trained_errors(W[seed], learned[seed], U[seed], target, p)
                    if math.isnan(error):
                        log.warning("%s diverged at d=%d, T=%d, seed %d: its error is NaN", scheme, d, T, seed)
                    _append(rows, scheme, d, T, seed, error, int((counts[seed] > 0).sum()))
                if scheme != "adam":
                    seen = np.flatnonzero(counts[0])
                    for name, values in (("scheme", [scheme] * len(seen)), ("d", [d] * len(seen)),
                                         ("T", [T] * len(seen)), ("token", seen.tolist()),
                                         ("count", counts[0][seen].tolist()),
                                         ("q_measured", measured_q(W[0], learned[0], U[0], target)[seen].tolist()),
                                         ("q_gamma", q_gamma(counts[0], steps[scheme], settings.classes)[seen].tolist())):
                        q_rows[name] += values
    return q_rows


def _append(rows: dict[str, list[Any]], scheme: str, d: int, T: int, seed: int, error: float, seen: int) -> None:
    """One row of the sweep table."""
    for name, value in zip(("scheme", "d", "T", "seed", "error", "seen"), (scheme, d, T, seed, error, seen)):
        rows[name].append(value)


def slope(x: np.ndarray, errors: np.ndarray, seeds: np.ndarray, resamples: int = 1000,
          rng_seed: int = 0) -> dict[str, float]:
    """Log-log slope of the seed-mean error against x, with a 95% bootstrap interval over seeds."""
    xs = np.unique(x)
    by_seed = np.array([[errors[(x == v) & (seeds == s)].mean() for v in xs] for s in np.unique(seeds)])
    positive = by_seed.mean(0) > 0                 # an error of exactly 0 has no logarithm: leave the point out
    xs, by_seed = xs[positive], by_seed[:, positive]
    if len(xs) < 2:
        return {"points": int(len(xs)), "dropped_zero_error": int((~positive).sum())}

    def fit(curves: np.ndarray) -> float:
        return float(np.polyfit(np.log(xs), np.log(np.maximum(curves.mean(0), 1e-300)), 1)[0])

    rng = np.random.default_rng(rng_seed)
    boot = [fit(by_seed[rng.integers(0, len(by_seed), len(by_seed))]) for _ in range(resamples)]
    return {"slope": fit(by_seed), "low": float(np.quantile(boot, 0.025)), "high": float(np.quantile(boot, 0.975)),
            "points": int(len(xs)), "dropped_zero_error": int((~positive).sum())}


def fit(table: dict[str, np.ndarray], settings: dict[str, Any]) -> dict[str, Any]:
    """Fitted slopes beside docs/theory.md's rates, and the SGD regimes against q = p_hat and q = 1[seen]."""
    alpha = settings["alpha"]
    scheme, d, T = table["scheme"], table["d"], table["T"]
    out: dict[str, Any] = {"alpha": alpha, "slopes": {}}
    largest_T, largest_d = max(settings["samples"]), max(settings["dims"])
    for name, (axis, rate) in THEORY_SLOPES.items():
        if name not in set(scheme):
            continue
        if axis == "d":
            rows = (scheme == name) & ((T == 0) | (T == largest_T))
            x = d
        else:  # in T, at the largest d, at the T where every seed stores fewer than d/8 tokens (no overflow)
            at = (scheme == name) & (d == largest_d)
            early = [t for t in np.unique(T[at]) if table["seen"][at & (T == t)].max() <= largest_d / 8]
            rows = at & np.isin(T, early)
            x = T
        out["slopes"][name] = {"axis": axis, "theory": rate(alpha)}
        fitted = slope(x[rows], table["error"][rows], table["seed"][rows]) if rows.any() else {"points": 0}
        out["slopes"][name].update(fitted)
        if "slope" not in fitted:
            out["slopes"][name]["missing"] = f"fewer than 2 values of {axis} with a non-zero error (widen the sweep)"
    if "seen" in set(scheme):
        small = min(settings["dims"])
        rows = (scheme == "seen") & (d == small)
        worst = int(np.argmax([table["error"][rows & (T == t)].mean() for t in settings["samples"]]))
        out["overflow"] = {"d": small, "error_by_T": {int(t): float(table["error"][rows & (T == t)].mean())
                                                      for t in settings["samples"]},
                           "worst_T": int(settings["samples"][worst])}
    regimes = {}
    for name in ("sgd_small", "sgd_large", "adam"):
        rows = scheme == name
        if rows.any():
            seeds = np.unique(table["seed"][rows])  # compare on the seeds that were trained
            same = np.isin(table["seed"], seeds)
            regimes[name] = {f"d={int(dd)},T={int(tt)}": {
                "error": float(np.mean(table["error"][rows & (d == dd) & (T == tt)])),  # NaN if any seed diverged
                "p_hat": float(table["error"][same & (scheme == "p_hat") & (d == dd) & (T == tt)].mean()),
                "seen": float(table["error"][same & (scheme == "seen") & (d == dd) & (T == tt)].mean())}
                for dd in np.unique(d[rows]) for tt in np.unique(T[rows])}
    out["trained"] = regimes
    return out


def settings_dict(settings: SweepSettings) -> dict[str, Any]:
    """The settings as settings.json records them: tuples as lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


SWEEP_TABLE, Q_TABLE, SETTINGS_FILE = "sweep.parquet", "q.parquet", folders.ASSOC.record


@dataclass(frozen=True, eq=False)
class SweepResult(StageResult):
    """A finished assoc sweep folder: its signed settings.json, read as a mapping or by property."""

    kind = folders.ASSOC

    @property
    def settings(self) -> dict[str, Any]:
        """The SweepSettings as recorded (tuples as lists)."""
        return dict(self.record["settings"])

    @property
    def rows(self) -> int:
        """The rows of the sweep table."""
        return self.record["rows"]

    @property
    def seconds(self) -> float:
        """The sweep's wall-clock time."""
        return self.record["seconds"]


def run_sweep(settings: SweepSettings, out: str, overwrite: bool = False,
              allow_other_files: bool = False) -> SweepResult:
    """Run a sweep and write its tables and settings.json (its record) into `out`, claimed by the folder
    model's rules (memscan.folders.claim): the same sweep finds its finished tables, another needs `overwrite`."""
    started = time.perf_counter()
    identity = folders.job_fingerprint(settings=settings_dict(settings))
    with files.job_folder(Path(out)) as folder:
        claimed = folders.claim(folder, folders.ASSOC, (SWEEP_TABLE, Q_TABLE), identity, overwrite=overwrite,
                                allow_other_files=allow_other_files)
        if claimed.done:
            return SweepResult(folder, claimed.previous)
        pending = folders.begin(folder, folders.ASSOC, identity, (SWEEP_TABLE, Q_TABLE), claimed.previous)
        table, q = sweep(settings)
        tables = [store.write_table(folder / SWEEP_TABLE, table), store.write_table(folder / Q_TABLE, q)]
        info = {"fingerprint": identity, "settings": settings_dict(settings), "rows": int(len(table["error"])),
                "seconds": round(time.perf_counter() - started, 2), "files": tables}
        record = folders.write_record(folder, folders.ASSOC, info, pending)  # last: it vouches for the tables
    return SweepResult(folder, record)


def run_fit(folder: str) -> dict[str, Any]:
    """Fit a sweep folder's slopes, write fit.json (a record beside the sweep's, memscan.folders.FIT), return it."""
    path = Path(folder)
    info = read_settings(path)
    table = {k: np.asarray(v) for k, v in store.read_table(path / SWEEP_TABLE).to_pydict().items()}
    result = fit(table, info["settings"])
    with files.folder_lock(path, "FOLDER"):
        sweep_record = folders.identity(path)
        claimed = folders.claim(path, folders.FIT, (), sweep_record, overwrite=True, allow_other_files=True)
        return folders.write_record(path, folders.FIT, {"fingerprint": sweep_record, **result}, claimed.previous)


def read_settings(folder: Any) -> dict[str, Any]:
    """settings.json of a sweep folder, checked: its record, and both tables against their sha256."""
    path = Path(folder)
    info = folders.read_record(path, folders.ASSOC)
    files.require(info, "settings", dict, path / SETTINGS_FILE)
    for entry in folders.entries(folders.ASSOC, info):
        files.check_file(path, entry, "table")
    return info


def read_fit(folder: Any) -> dict[str, Any]:
    """fit.json of a sweep folder: a sound record of `memscan assoc fit`."""
    return folders.read_record(Path(folder), folders.FIT)
