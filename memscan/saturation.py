"""Norm growth and saturated attention (Merrill et al. 2021), as docs/theory.md states them.

- Norm growth: rho(t) = ||theta_t|| over all non-scalar parameters, in total and per
  layer, across a training run's checkpoints; least-squares fits of rho against t,
  sqrt(t) and t^(1/4) with R^2; the free exponent p of rho = a + b t^p with its 95%
  profile-likelihood interval (Merrill et al.: p = 1/2); the cosine between consecutive
  checkpoints.
- Saturation: the network at c theta (every parameter scaled, c = 1000) against theta;
  per layer, the mean cosine between their hidden states over the tokens of a text.
- Heads of the saturated model: per query, the positions whose attention weight exceeds
  1e-5; per head the mean count, P(count > 1) and its spread. Count 1 is an argmax head;
  about half the causal prefix is a uniform (averaging) head.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

import memscan.store as store
from memscan import checks, corpus, files, folders, models, train
from memscan.errors import InputError
from memscan.fields import setting
from memscan.results import StageResult

log = logging.getLogger(__name__)

ATTENTION_THRESHOLD = 1e-5
GROWTH_LAWS = {"t": lambda t: t, "sqrt_t": np.sqrt, "t_quarter": lambda t: t ** 0.25}
EXPONENT_GRID = np.round(np.arange(1, 801) * 0.005, 3)  # p in (0, 4], step 0.005: sqrt(t) and t are grid points
CHI2_1_95 = 3.841458820694124              # the 95% quantile of chi-square with 1 degree of freedom
_LAYER = re.compile(r"\.h\.(\d+)\.|\.layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """'layer_3' for a block's parameter, 'other' for embeddings and the final norm."""
    match = _LAYER.search(name)
    return f"layer_{int(next(g for g in match.groups() if g is not None))}" if match else "other"


def parameter_norms(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """||theta|| over non-scalar parameters, in total ('total') and per layer group."""
    squares: dict[str, float] = {}
    for name, tensor in state.items():
        if tensor.numel() > 1:
            value = float(tensor.double().square().sum())
            squares["total"] = squares.get("total", 0.0) + value
            squares[layer_of(name)] = squares.get(layer_of(name), 0.0) + value
    return {group: float(np.sqrt(value)) for group, value in squares.items()}


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """cos(theta_a, theta_b) over their shared non-scalar parameters, as one flat vector each."""
    dot = norm_a = norm_b = 0.0
    for name, tensor in a.items():
        if tensor.numel() > 1 and name in b:
            x, y = tensor.double().flatten(), b[name].double().flatten()
            dot, norm_a, norm_b = dot + float(x @ y), norm_a + float(x @ x), norm_b + float(y @ y)
    return dot / np.sqrt(norm_a * norm_b)


def fit_growth(steps: np.ndarray, norms: np.ndarray) -> dict[str, dict[str, float]]:
    """Least squares rho = a + b f(t) for f in t, sqrt(t), t^(1/4): a, b and R^2 for each."""
    steps, norms = np.asarray(steps, np.float64), np.asarray(norms, np.float64)
    fits = {}
    for law, f in GROWTH_LAWS.items():
        design = np.column_stack([np.ones_like(steps), f(steps)])
        (a, b), *_ = np.linalg.lstsq(design, norms, rcond=None)
        residual = norms - design @ np.array([a, b])
        total = ((norms - norms.mean()) ** 2).sum()
        fits[law] = {"a": float(a), "b": float(b), "r2": float(1 - (residual ** 2).sum() / total) if total else 1.0}
    return fits


def _profile_sse(steps: np.ndarray, norms: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """Per exponent p, the residual sum of squares of the least-squares fit rho = a + b t^p (t scaled to [0, 1])."""
    powers = (steps / steps.max())[None, :] ** exponents[:, None]       # (exponents, checkpoints)
    centred = powers - powers.mean(1, keepdims=True)
    y = norms - norms.mean()
    cross, spread = centred @ y, (centred ** 2).sum(1)
    explained = np.divide(cross ** 2, spread, out=np.zeros_like(cross), where=spread > 0)
    return np.maximum((y ** 2).sum() - explained, 0.0)


def fit_exponent(steps: np.ndarray, norms: np.ndarray) -> dict[str, float] | None:
    """The exponent p of rho = a + b t^p minimising squared error over EXPONENT_GRID, and its 95% profile
    interval (the p whose residuals are within the likelihood-ratio bound): Merrill et al.'s sqrt(t) is p = 1/2.

    None with fewer than 4 checkpoints at distinct positive steps (a, b and p leave no residual to judge by).
    """
    steps, norms = np.asarray(steps, np.float64), np.asarray(norms, np.float64)
    if len(np.unique(steps[steps > 0])) < 4:
        return None
    sse = _profile_sse(steps, norms, EXPONENT_GRID)
    best = int(np.argmin(sse))
    inside = EXPONENT_GRID[sse <= sse[best] * math.exp(CHI2_1_95 / len(steps))]
    return {"value": float(EXPONENT_GRID[best]), "low": float(inside.min()), "high": float(inside.max()),
            "grid_step": float(EXPONENT_GRID[1] - EXPONENT_GRID[0]), "grid_max": float(EXPONENT_GRID[-1])}


def norm_growth(checkpoints: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, np.ndarray]:
    """Per checkpoint (step order): step, norms per group, cosine to the previous checkpoint (NaN first)."""
    rows: dict[str, list[Any]] = {"step": [], "group": [], "norm": []}
    cosines: list[float] = []
    previous = None
    for step, state in checkpoints:
        for group, value in parameter_norms(state).items():
            rows["step"].append(step)
            rows["group"].append(group)
            rows["norm"].append(value)
        cosines.append(float("nan") if previous is None else cosine(previous, state))
        previous = state
    return {**{k: np.asarray(v) for k, v in rows.items()}, "cosine_to_previous": np.asarray(cosines)}


def scaled(model: Any, c: float) -> Any:
    """A float32 copy of the model with every parameter multiplied by c."""
    copy_ = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for parameter in copy_.parameters():
            parameter.mul_(c)
    return copy_


@torch.inference_mode()
def saturation_cosines(model: Any, input_ids: torch.Tensor, c: float = 1000.0) -> np.ndarray:
    """Per layer (0 = embeddings), the mean over tokens of cos(h_theta, h_{c theta}): (layers + 1,)."""
    base = scaled(model, 1.0)(input_ids=input_ids, output_hidden_states=True).hidden_states
    big = scaled(model, c)(input_ids=input_ids, output_hidden_states=True).hidden_states
    return np.array([float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())
                     for a, b in zip(base, big)])


@torch.inference_mode()
def saturated_attentions(model: Any, input_ids: torch.Tensor, c: float = 1000.0) -> np.ndarray:
    """Attention weights of the saturated model: (layers, batch, heads, T, T) float64."""
    big = scaled(model, c)
    big.set_attn_implementation("eager")  # only eager attention returns its weights
    attentions = big(input_ids=input_ids, output_attentions=True).attentions
    return np.stack([a.double().numpy() for a in attentions])


def head_statistics(attentions: np.ndarray, threshold: float = ATTENTION_THRESHOLD) -> dict[str, np.ndarray]:
    """Per (layer, head) from weights (layers, batch, heads, T, T): counts of weights above threshold.

    Returns arrays of length layers x heads: layer, head, mean_count, p_count_above_1,
    std_count, and mean_fraction = count / (query position + 1), 1/T-ish for argmax heads and
    near 1 for heads that spread over the whole causal prefix.
    """
    layers, _, heads, length, _ = attentions.shape
    counts = (attentions > threshold).sum(-1).astype(np.float64)            # (L, B, H, T)
    prefix = np.arange(1, length + 1, dtype=np.float64)
    per_head = counts.transpose(0, 2, 1, 3).reshape(layers, heads, -1)        # (L, H, B * T)
    fraction = (counts / prefix).transpose(0, 2, 1, 3).reshape(layers, heads, -1)
    return {
        "layer": np.repeat(np.arange(layers), heads), "head": np.tile(np.arange(heads), layers),
        "mean_count": per_head.mean(-1).ravel(), "p_count_above_1": (per_head > 1).mean(-1).ravel(),
        "std_count": per_head.std(-1).ravel(), "mean_fraction": fraction.mean(-1).ravel(),
    }


SUMMARY = folders.SATURATION.record
TABLES = ("norms.parquet", "saturation.parquet", "heads.parquet")


@dataclass(frozen=True)
class SaturationSettings:
    """What `memscan saturation` measures (see its --help); None: the training run's own, else qf and 64."""

    source: str | None = setting(None, "Text for the hidden states [default: the run's source, else qf].")
    chunk_tokens: int | None = setting(None, "Tokens per chunk [default: the run's context, else 64].")
    chunks: int = setting(8, "Chunks of text whose hidden states are compared at theta and c theta.")
    scale: float = setting(1000.0, "c in f(x; c theta).")
    seed: int = setting(0)   # the shared --seed (a training run's own seed where TARGET is one)

    def check(self) -> None:
        """Refuse out-of-range settings with one line that names the flag, the range and the value."""
        checks.at_least("--chunk-tokens", self.chunk_tokens, 1)
        checks.at_least("--chunks", self.chunks, 1)
        checks.number("--scale", self.scale, 0, low_open=True)
        checks.at_least("--seed", self.seed, 0)


@dataclass(frozen=True, eq=False)
class SaturationResult(StageResult):
    """A finished `memscan saturation` folder: its signed summary.json, read as a mapping or by property."""

    kind = folders.SATURATION

    @property
    def layer_cosines(self) -> list[float]:
        """Per layer (0 = embeddings), the mean cosine between the hidden states at theta and at c theta."""
        return list(self.record["layer_cosines"])

    @property
    def norm_growth(self) -> dict[str, Any] | None:
        """The fits, exponent, steps, norms and cosines over the training run's checkpoints (None: not a run)."""
        return self.record["norm_growth"]

    @property
    def argmax_heads(self) -> int:
        """The heads of the saturated model that attend to about one position."""
        return self.record["argmax_heads"]

    @property
    def heads(self) -> int:
        """Every head of the model."""
        return self.record["heads"]

    @property
    def scale(self) -> float:
        """c, the factor every parameter was scaled by."""
        return self.record["scale"]


def analyse(target: str, out: str, settings: SaturationSettings = SaturationSettings(),
            allow_incomplete: bool = False, overwrite: bool = False,
            allow_other_files: bool = False) -> SaturationResult:
    """Norm growth over a training run's checkpoints (if `target` is one) and saturation of its model.

    `target` is a `memscan train` run folder (its last checkpoint and its own source and
    context are used) or any model; the text is the first `chunks` chunks of the source.
    A run that did not finish is refused unless `allow_incomplete`: then its checkpoints so
    far are analysed, and summary.json says so. The job holds `out` from start to end and claims
    it by the folder model's rules (memscan.folders.claim).
    """
    settings.check()
    target_path = Path(target)
    if not target_path.exists() and models.looks_like_path(target):
        raise InputError(f"'{target}' does not exist (give a `memscan train` run folder or a model)")
    run_record = target_path / folders.TRAINING.record
    target_record = files.sha256_of(run_record) if run_record.is_file() else None
    identity = folders.job_fingerprint(settings=asdict(settings), target=target, target_record=target_record,
                                       allow_incomplete=allow_incomplete)
    with files.job_folder(Path(out)) as out_path:
        claimed = folders.claim(out_path, folders.SATURATION, TABLES, identity, overwrite=overwrite,
                                allow_other_files=allow_other_files)
        if claimed.done:
            return SaturationResult(out_path, claimed.previous)
        # The summary vouches for the tables: it goes first, so a run cut short leaves no mixed result.
        pending = folders.begin(out_path, folders.SATURATION, identity, TABLES, claimed.previous)
        summary = _analyse_into(target, out_path, settings, allow_incomplete)
        record = folders.write_record(out_path, folders.SATURATION, {"fingerprint": identity, **summary}, pending)
    return SaturationResult(out_path, record)


def _analyse_into(target: str, out: Path, settings: SaturationSettings, allow_incomplete: bool) -> dict[str, Any]:
    """`analyse` in a folder this job holds; returns the summary's body (its record is written by the caller)."""
    summary: dict[str, Any] = {"target": target, "scale": settings.scale, "norm_growth": None}
    source, chunk_tokens, seed = settings.source or "qf", settings.chunk_tokens or 64, settings.seed
    model_dir, text_column = target, "text"
    if (Path(target) / train.RUN_FILE).exists():
        run = train.read_run(target)
        summary.update(_run_progress(target, run, allow_incomplete))
        found = train.checkpoints(target)
        if not found:
            raise InputError(f"training run '{target}' has no checkpoints yet; train it first")
        growth = norm_growth((step, _checked_weights(folder)) for step, folder in found)
        summary["norm_growth"] = _growth_summary(growth)
        store.write_table(out / "norms.parquet", {k: v for k, v in growth.items() if k != "cosine_to_previous"})
        model_dir, source = str(found[-1][1]), settings.source or run["data"]["source"]
        chunk_tokens = settings.chunk_tokens or run["data"]["context"]
        seed, text_column = run["settings"]["seed"], run["settings"]["text_column"]
    loaded = models.load(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    stats = corpus.CorpusStats()
    text = corpus.open_source(source, seed=seed, text_column=text_column)
    taken = [c.tokens for c, _ in zip(corpus.iter_chunks(text.documents(), loaded.tokenizer, chunk_tokens, 0.0, seed,
                                                          stats), range(settings.chunks))]
    if not taken:
        raise InputError(f"no chunk of {chunk_tokens} tokens in --source '{source}'")
    input_ids = torch.from_numpy(np.stack(taken).astype(np.int64))
    cosines = saturation_cosines(loaded.model, input_ids, settings.scale)
    heads = head_statistics(saturated_attentions(loaded.model, input_ids, settings.scale))
    store.write_table(out / "saturation.parquet", {"layer": np.arange(len(cosines)), "cosine": cosines})
    store.write_table(out / "heads.parquet", heads)
    summary.update(model=model_dir, source=source, tokens=int(input_ids.numel()), layer_cosines=cosines.tolist(),
                   argmax_heads=int((heads["mean_count"] <= 1.05).sum()), heads=len(heads["head"]),
                   mean_heads_fraction=float(heads["mean_fraction"].mean()),
                   files=[files.file_entry(out / name) for name in TABLES if (out / name).exists()])
    return summary


def _run_progress(target: str, run: dict[str, Any], allow_incomplete: bool) -> dict[str, Any]:
    """complete, steps_done and steps of a training run; an unfinished one is refused unless `allow_incomplete`."""
    latest = train.latest_checkpoint(Path(target))
    done = run["steps"] if run["complete"] else (train.read_state(latest)["step"] if latest else 0)
    if not run["complete"]:
        if not allow_incomplete:
            raise InputError(f"training run '{target}' is incomplete: {done:,} of {run['steps']:,} steps; rerun "
                             "`memscan train` to finish it, or pass --allow-incomplete")
        log.warning("training run '%s' is incomplete (%d of %d steps): analysing its checkpoints so far",
                    target, done, run["steps"])
    return {"complete": run["complete"], "steps_done": done, "steps": run["steps"]}


def _checked_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, after checking every file against its state.json."""
    train.check_checkpoint(folder)
    with train.loading(folder):
        return load_file(folder / "model.safetensors")


def _growth_summary(growth: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fits, steps, total norms and cosines of `norm_growth`'s tables, for summary.json (NaN cosine: None)."""
    total = growth["group"] == "total"
    return {"fits": fit_growth(growth["step"][total], growth["norm"][total]),
            "exponent": fit_exponent(growth["step"][total], growth["norm"][total]),
            "steps": growth["step"][total].tolist(), "norms": growth["norm"][total].tolist(),
            "cosine_to_previous": [None if math.isnan(c) else c for c in growth["cosine_to_previous"].tolist()]}


def read_summary(out: str | Path) -> dict[str, Any]:
    """summary.json of a saturation folder, checked: its keys, and every table it lists against its sha256."""
    out = Path(out)
    summary = folders.read_record(out, folders.SATURATION)
    for key, kinds in {
        "target": str, "scale": (int, float), "norm_growth": (dict, type(None)), "layer_cosines": list,
            "argmax_heads": int, "heads": int, "files": list}.items():
        files.require(summary, key, kinds, out / SUMMARY)
    for entry in summary["files"]:
        files.check_file(out, entry, "table")
    return summary
