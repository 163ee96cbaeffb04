"""`memscan score`: the field's views of memorization on a dataset's chunks.

`score` rates every train and test chunk of an extraction with the membership scores of
`memscan.membership` (from the per-chunk table that `extract` writes, plus a reference
model's forward pass when asked), and with the activation geometry of `memscan query`
runs over the same dataset (a test-split run rates the non-members, a leave-one-out
train-split run the members); it measures each score's ROC-AUC and TPR at low FPR against
the dataset's split (train = member), and crosses the views on the same chunks (the
bridge: rank correlations, AUCs side by side), with the columns of a `memscan verbatim` run
(`memscan.verbatim`) where one is given. Every column holds the quantity its name says (the
loss, a distance, an energy); MEMBER_WHEN gives the side members lie on, which the metrics apply
and metrics.json records (`orientation`), so every AUC reads larger = better. Reading a
dataset's rated chunks and its checked model (`rated_chunks`, `dataset_model`) is shared with
the verbatim job (`memscan.verbatim.job`). The report layer draws the plots
(`memscan.report.render_scores`), not this module.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow.compute as pc
import torch
from scipy.stats import spearmanr

import memscan.query as query
import memscan.store as store
from memscan import checks, files, folders, geometry, membership, models
from memscan.errors import DataError, InputError
from memscan.fields import setting
from memscan.knn import exact
from memscan.layout import parse_positions
from memscan.progress import progress
from memscan.results import StageResult

log = logging.getLogger(__name__)

SCORES, METRICS = "scores.parquet", "metrics.json"
SPLITS = ("train", "test")            # members, non-members; other splits (qf's "gen") are not rated
VERBATIM_COLUMNS = ("leading_match", "match_fraction", "extractable")
GEOMETRY_MODES = ("none", "views")
ID_COLUMNS = ("doc_id", "chunk_id", "split", "label")
# The side members lie on, per score column ("larger" where a column is not named: the views, geom_*).
MEMBER_WHEN = {**membership.MEMBER_WHEN, "nearest": "smaller", "inside_ball": "larger", "energy": "smaller",
               "retrieved": "larger"}
# Format version 1 wrote every score larger = member: these columns held minus what their name says.
NEGATED_IN_VERSION_1 = ("loss", "zlib", "nearest", "energy")


@dataclass(frozen=True)
class ScoreSettings:
    """Everything that decides a score run (see `memscan score --help`)."""

    data: str
    query_run: tuple[str, ...] = setting(
        (), "A `memscan query` run over DATA_DIR: adds nearest-pattern distance, energy, inside-ball, retrieved for the "
            "chunks of its split. Repeat it: a test-split run rates the non-members, a leave-one-out train-split run "
            "(queries = the index's own patterns) the members.")
    reference_model: str | None = setting(None, "A reference model (hub id or folder): adds reference - target loss.")
    verbatim: str | None = setting(None, "A `memscan verbatim` folder of DATA_DIR: its match columns join the bridge.")
    min_k: float = setting(membership.DEFAULT_K, "Fraction of tokens of Min-K% and Min-K%++.")
    layer: int | None = setting(None, "Layer of the --query-run runs to use [default: their last].")
    resamples: int = setting(1000, "Bootstrap resamples of each interval.")
    seed: int = setting(0)          # the shared --seed
    device: str = setting("auto")   # the shared --device (where the reference model runs)
    batch_size: int = 8
    trust_remote_code: bool = setting(False, "Allow a hub model's own code to run.")
    allow_other_model: bool = setting(False, "Use the dataset's model even when its weights differ from the "
                                             "manifest's weights_sha256 (the summary records it).")
    geometry: str = setting("none", "views: minus the distance to the nearest other member (leave-one-chunk-out, "
                                    "exact) at every (site, layer) DATA_DIR stores and every kept position, mean and "
                                    "max per chunk, each view's AUC and the best view under a Holm-Bonferroni "
                                    "correction. Needs no --query-run; quadratic in rows.", choices=GEOMETRY_MODES)

    def check(self) -> None:
        """Refuse out-of-range settings with one line that names the flag, the range and the value."""
        checks.choice("--geometry", self.geometry, GEOMETRY_MODES)
        checks.number("--min-k", self.min_k, 0, 1, low_open=True, high_open=False)
        checks.at_least("--resamples", self.resamples, 1)
        checks.at_least("--seed", self.seed, 0)
        checks.at_least("--batch-size", self.batch_size, 1)


class DatasetSettings(Protocol):
    """What reading a dataset and its model takes from a job's settings (ScoreSettings, VerbatimSettings)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]   # a dataclass: the job's fingerprint records every setting

    @property
    def data(self) -> str: ...

    @property
    def trust_remote_code(self) -> bool: ...

    @property
    def allow_other_model(self) -> bool: ...


@dataclass(frozen=True, eq=False)
class ScoreResult(StageResult):
    """A finished `memscan score` folder: its signed summary.json, read as a mapping or by property."""

    kind = folders.SCORES

    @property
    def chunks(self) -> dict[str, int]:
        """The chunks rated, per split."""
        return dict(self.record["chunks"])

    @property
    def model(self) -> dict[str, Any]:
        """The dataset's model as checked: path, weights_sha256, matches_dataset."""
        return dict(self.record["model"])

    @property
    def query_run(self) -> dict[str, Any] | None:
        """The query runs' folders, layer and radius, or None without --query-run."""
        return self.record["query_run"]

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics.json, checked against its summary entry: per score AUC and TPRs, skipped scores, the bridge."""
        entries = {entry["name"]: entry for entry in self.record["tables"]}
        return files.read_record(files.check_file(self.folder, entries[METRICS], "metrics"), "memscan metrics")

    @property
    def scores(self) -> Any:
        """scores.parquet (a pyarrow Table), checked against its summary entry, each column holding what its name
        says: a version-1 folder's negated columns (NEGATED_IN_VERSION_1) are turned back."""
        entries = {entry["name"]: entry for entry in self.record["tables"]}
        table = store.read_table(files.check_file(self.folder, entries[SCORES], "table"))
        return current_columns(table, self.metrics)

    @property
    def orientation(self) -> dict[str, str]:
        """The side members lie on ("larger" or "smaller") for every score column of `scores`."""
        return orientation(self.metrics, self.scores.column_names)


def is_version_1(metrics: dict[str, Any]) -> bool:
    """Whether a score folder's metrics.json is of format version 1 (every score larger = member): it records no
    `orientation`."""
    return "orientation" not in metrics


def current_columns(table: Any, metrics: dict[str, Any]) -> Any:
    """A scores table (pyarrow) whose every column holds what its name says: a version-1 table's columns
    NEGATED_IN_VERSION_1 negated back; a later one as it is."""
    if not is_version_1(metrics):
        return table
    for name in NEGATED_IN_VERSION_1:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, pc.negate(table.column(name)))
    return table


def orientation(metrics: dict[str, Any], columns: list[str]) -> dict[str, str]:
    """metrics.json's `orientation` {score column: "larger" | "smaller"}; for a version-1 folder, which has none, the
    sides of the `columns` once `current_columns` has turned them back."""
    if not is_version_1(metrics):
        return dict(metrics["orientation"])
    return {name: member_side(name) for name in columns
            if name not in ID_COLUMNS and not name.startswith("verbatim_")}


def member_side(name: str) -> str:
    """The side members lie on for the score column `name` (MEMBER_WHEN; "larger" for the views)."""
    return MEMBER_WHEN.get(name, "larger")


# ---------------------------------------------------------------- reading the dataset


def rated_chunks(data: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """The manifest, the per-chunk table, and the indices (m,) of its train and test chunks."""
    manifest = store.read_manifest(data)
    table = store.read_chunk_table(data, manifest)
    rated = np.flatnonzero(np.isin(table["split"], SPLITS))
    present = set(table["split"][rated].tolist())
    if present != set(SPLITS):
        raise DataError(f"dataset '{data}' has {', '.join(sorted(present)) or 'no'} chunks only; membership needs "
                        "train (member) and test (non-member) chunks")
    return manifest, table, rated


def model_ref(manifest: dict[str, Any]) -> tuple[str, str | None]:
    """(model id or path, revision) of the dataset's model. Never whether to run its code: a record names a
    model, it does not vouch for it (trust_remote_code comes from the command line alone)."""
    model, settings = manifest["model"], manifest["settings"]
    ref, revision = model.get("path") or model["id"], settings.get("revision")
    if not isinstance(ref, str) or not (revision is None or isinstance(revision, str)):
        raise DataError(f"the dataset's manifest names the model {json.dumps(ref)[:60]} at revision "
                        f"{json.dumps(revision)[:60]}: 'model.path' and 'settings.revision' must be text")
    return ref, revision


def dataset_model(manifest: dict[str, Any], settings: DatasetSettings, device: Any = None,
                  dtype: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The dataset's model, loaded on `device` in `dtype` (None: its tokenizer alone), and the summary's record of it.

    A local folder's weights are hashed as `extract` hashed them (models.weights_digest) before
    anything is loaded from it, and must match the manifest's `model.weights_sha256` unless
    `settings.allow_other_model`; a hub model (no folder, weights_sha256 null) cannot be checked and
    is pinned by its revision alone. `trust_remote_code` is the command line's, never the manifest's.
    """
    def short(value: Any) -> str:
        return value[:12] if isinstance(value, str) else "none (a hub model)"

    ref, revision = model_ref(manifest)
    local = Path(ref).expanduser()
    digest = models.weights_digest(local) if local.is_dir() else None
    recorded = manifest["model"].get("weights_sha256")
    if digest is None and recorded is None:
        matches = None
        log.info("the dataset's model '%s' is a hub model: its weights cannot be checked against the dataset "
                 "(weights_sha256 null); its revision %s pins it", ref, revision or "(none recorded)")
    else:
        matches = digest == recorded
        if not matches and not settings.allow_other_model:
            raise DataError(f"the model '{ref}' has weights sha256 {short(digest)}, not the {short(recorded)} "
                            f"dataset '{settings.data}' was extracted with; pass --allow-other-model to use it anyway")
        if not matches:
            log.warning("--allow-other-model: the model '%s' (weights sha256 %s) is not the one dataset '%s' was "
                        "extracted with (%s)", ref, short(digest), settings.data, short(recorded))
    record = {"path": ref, "weights_sha256": digest, "matches_dataset": matches}
    if device is None:
        return models.load_tokenizer(ref, revision, settings.trust_remote_code), record
    return models.load(ref, dtype=models.resolve_dtype(dtype, device), device=device, revision=revision,
                       trust_remote_code=settings.trust_remote_code), record


def _decode(tokenizer: Any, token_ids: np.ndarray) -> list[str]:
    """Each chunk's text (m,), decoded with the dataset's tokenizer."""
    return tokenizer.batch_decode(token_ids.tolist())


# ---------------------------------------------------------------- the scores


def membership_scores(table: dict[str, np.ndarray], rows: np.ndarray, texts: list[str], k: float,
                      ) -> dict[str, np.ndarray]:
    """loss, min_k, min_k_plus_plus and zlib (m,) of the chunks `rows` from their per-token statistics (each what
    its name says; MEMBER_WHEN gives the side members lie on)."""
    nll, mu, var = (table[name][rows] for name in store.PER_TOKEN_COLUMNS)
    if np.isnan(nll).all():
        raise DataError("the dataset was extracted with --no-loss: its per-chunk table holds no per-token loss; "
                        "re-extract without --no-loss")
    return {"loss": membership.loss_score(nll), "min_k": membership.min_k_score(nll, k),
            "min_k_plus_plus": membership.min_k_plus_plus_score(nll, mu, var, k),
            "zlib": membership.zlib_score(nll, texts)}


def reference_nll(model_id: str, texts: list[str], device: str) -> np.ndarray:
    """Per-token nll (m, T') of each text under a reference model, re-tokenized with its own tokenizer.

    Each text is cut to the reference model's context; NaN pads the shorter rows. One text
    per forward pass, as the token counts differ.
    """
    resolved = models.resolve_device(device)
    loaded = models.load(model_id, dtype=models.resolve_dtype("auto", resolved), device=resolved)
    context = loaded.context_length or 1 << 30
    encoded = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    length = max(1, min(context, max(len(ids) for ids in encoded)))
    out = np.full((len(texts), length), np.nan, np.float32)
    with torch.inference_mode():
        for i, ids in enumerate(progress(len(encoded), "reference", "chunk", encoded)):
            ids = ids[:context]
            if len(ids) < 2:
                continue
            tokens = torch.tensor([ids], device=resolved)
            targets = torch.cat([tokens[:, 1:], torch.full((1, 1), -1, device=resolved)], dim=1)
            stats = membership.token_statistics(loaded.model(input_ids=tokens).logits, targets)
            out[i, :len(ids)] = stats["nll"][0]
    return out


def _query_layer(summary: dict[str, Any], layer: int | None, run: Path) -> dict[str, Any]:
    """The summary entry of a query run's `layer` (None: its last) at the run's own site."""
    site = summary.get("site", store.DEFAULT_SITE)   # runs from before sites hold the residual stream alone
    layers = {entry["layer"]: entry for entry in summary["layers"] if entry.get("site", store.DEFAULT_SITE) == site}
    chosen = max(layers) if layer is None else layer
    if chosen not in layers:
        raise InputError(f"--layer {layer} is not in --query-run '{run}' (layers: {sorted(layers)})")
    return layers[chosen]


QUERY_COLUMNS = ("nearest_dist", "energy_lower", "energy_upper", "retrieved")
# What must agree between the runs of one score, beside the index, for their numbers to be comparable.
SHARED_QUERY_SETTINGS = ("k", "exact", "beta", "radius", "epsilon", "max_steps")


@dataclass(frozen=True)
class QueryRun:
    """One `memscan query` run of a score: its folder, summary, the layer's summary entry and its query split."""

    folder: Path
    summary: dict[str, Any]
    layer: dict[str, Any]

    @property
    def split(self) -> str:
        """The split the run queried."""
        return self.summary["settings"]["split"]

    def table(self, name: str) -> Any:
        """The run's table `name`, the rows of its site and layer only."""
        entry = next(e for e in self.summary["tables"] if e["name"] == name)
        table = store.read_table(files.check_file(self.folder, entry, "table"))
        keep = np.asarray(table.column("layer")) == self.layer["layer"]
        if "site" in table.column_names:
            keep &= np.asarray(table.column("site").to_pylist(), dtype=object) == self.site
        return table.filter(keep)

    @property
    def site(self) -> str:
        """The site of the run's layer (runs from before sites: the residual stream)."""
        return self.layer.get("site", store.DEFAULT_SITE)


def _open_run(run: Path, data: Path, layer: int | None) -> QueryRun:
    """A run that queried `data` with the test split, or with the train split leaving each query's own row out."""
    summary = query.read_summary(run)
    if Path(summary["queries"]).resolve() != data.resolve():
        raise InputError(f"--query-run '{run}' queried the dataset '{summary['queries']}', not '{data}'")
    opened = QueryRun(run, summary, _query_layer(summary, layer, run))
    if opened.split not in SPLITS:
        raise InputError(f"--query-run '{run}' queried the split '{opened.split}'; score rates the splits "
                         f"{' and '.join(SPLITS)}")
    if opened.split == "train" and not summary["queries_are_patterns"]:
        raise InputError(f"--query-run '{run}' queried the train split against an index of other patterns: members "
                         "need a leave-one-out run (`memscan query` of the index's own dataset and split)")
    return opened


def _open_runs(runs: tuple[Path, ...], data: Path, layer: int | None) -> list[QueryRun]:
    """Every run opened and checked: one a split, all over `data` at one layer, with one index and its settings."""
    opened = [_open_run(run, data, layer) for run in runs]
    first = opened[0]
    seen: dict[str, Path] = {}
    for run in opened:
        if run.split in seen:
            raise InputError(f"--query-run '{seen[run.split]}' and '{run.folder}' both queried the {run.split} "
                             "split; give one run of each split")
        seen[run.split] = run.folder
        if (run.site, run.layer["layer"]) != (first.site, first.layer["layer"]):
            raise InputError(f"--query-run '{run.folder}' is scored at site {run.site} layer {run.layer['layer']}, "
                             f"'{first.folder}' at site {first.site} layer {first.layer['layer']}: the runs must share "
                             "a site and layer (pass --layer, or index the same site)")
        if _identity(run) != _identity(first):
            raise InputError(f"--query-run '{run.folder}' searched another index or with other settings "
                             f"({', '.join(SHARED_QUERY_SETTINGS)}) than '{first.folder}'; the runs must share both")
    return opened


def _identity(run: QueryRun) -> dict[str, Any]:
    """What makes two runs' geometric scores comparable: the index and the settings that shape its numbers."""
    return {"index": run.summary.get("index_info"),
            **{key: run.summary["settings"].get(key) for key in SHARED_QUERY_SETTINGS}}


def geometry_scores(runs: tuple[Path, ...], data: Path, manifest: dict[str, Any], rows: np.ndarray,
                    split: np.ndarray, layer: int | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Geometric scores (m,) of the chunks `rows` at their last position, from `memscan query` runs.

    Each run rates the chunks of its own split: a test-split run the non-members, a
    leave-one-out train-split run the members. nearest: the distance to the nearest other
    pattern (a train chunk: the patterns table's nearest_other_dist, which every run of the
    index holds and a leave-one-out run's nearest_dist equals) or to the nearest pattern (a
    test chunk: the test run's nearest_dist), smaller = member; inside_ball: that distance
    <= the runs' radius (1/0); energy: the midpoint of the certified energy interval,
    smaller = member; retrieved: 1/0. NaN where no run has a row for the chunk. Also
    returns what the summary records of the runs.
    """
    opened = _open_runs(runs, data, layer)
    first = opened[0]
    per_chunk, positions = manifest["rows_per_chunk"], len(_kept_positions(manifest))
    layer_index = store.set_index(manifest, first.site, first.layer["layer"])
    last_rows = rows * per_chunk + layer_index * positions + positions - 1     # (m,) row ids at the last position
    radius = float(first.layer["radius"]["value"])
    patterns = first.table("patterns.parquet")
    nearest_other = _lookup(np.asarray(patterns.column("row_id")), np.asarray(patterns.column("nearest_other_dist")),
                            last_rows)
    looked_up = {name: np.full(len(rows), np.nan) for name in QUERY_COLUMNS}
    for run in opened:
        mine = split == run.split
        queries = run.table("queries.parquet")
        keys = np.asarray(queries.column("query_row_id"))
        for name in QUERY_COLUMNS:
            looked_up[name][mine] = _lookup(keys, np.asarray(queries.column(name), np.float64), last_rows[mine])
    distance = np.where(split == "train", nearest_other, looked_up["nearest_dist"])
    with np.errstate(invalid="ignore"):
        scores = {"nearest": distance, "inside_ball": np.where(np.isnan(distance), np.nan, distance <= radius),
                  "energy": (looked_up["energy_lower"] + looked_up["energy_upper"]) / 2,
                  "retrieved": looked_up["retrieved"]}
    return scores, {"folders": {run.split: str(run.folder.resolve()) for run in opened},
                    "layer": first.layer["layer"], "radius": radius}


def _kept_positions(manifest: dict[str, Any]) -> list[int]:
    """The token positions the dataset keeps in each chunk."""
    return parse_positions(manifest["positions"], manifest["chunk_tokens"])


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[keys == w] for each w of `wanted` (m,) float64, NaN where a key is absent."""
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], np.asarray(values, np.float64)[order]
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    found = (len(keys) > 0) & (keys[at] == wanted) if len(keys) else np.zeros(len(wanted), bool)
    return np.where(found, values[at] if len(keys) else np.nan, np.nan)


def _verbatim_columns(folder: Path, table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """A verbatim run's columns (m,) aligned to the chunks `rows`, NaN for chunks it did not sample."""
    summary = folders.read_record(folder, folders.VERBATIM)
    run = store.read_table(files.check_file(folder, summary["tables"][0], "table"))
    chunk_key = table["doc_id"][rows] * (1 << 32) + table["chunk_id"][rows]
    run_key = np.asarray(run.column("doc_id")) * (1 << 32) + np.asarray(run.column("chunk_id"))
    return {f"verbatim_{name}": _lookup(run_key, np.asarray(run.column(name), np.float64), chunk_key)
            for name in VERBATIM_COLUMNS}


def view_metrics(scores: dict[str, np.ndarray], labels: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """Each view's AUC with its interval, one-sided Mann-Whitney p and Holm-adjusted p, and the best view."""
    metrics = membership.membership_metrics(scores, labels, resamples=resamples, seed=seed)
    p = {name: geometry.greater_p(values, labels) for name, values in scores.items()}
    adjusted = dict(zip(p, geometry.holm(list(p.values())).tolist()))
    rows = {name: {"auc": metrics[name]["auc"], "p": p[name], "p_holm": adjusted[name]} for name in scores}
    return {"views": rows, "best_view": geometry.best_view(rows)}


# ---------------------------------------------------------------- metrics and the bridge


def score_metrics(scores: dict[str, np.ndarray], labels: np.ndarray, resamples: int,
                  seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """membership_metrics of every score that rates members and non-members, each ranked by its side (MEMBER_WHEN);
    the others, with the reason."""
    rated, skipped = {}, {}
    for name, values in scores.items():
        finite = np.isfinite(values)
        classes = set(labels[finite].tolist())
        if classes != {0, 1}:
            skipped[name] = "rates no member" if 1 not in classes else "rates no non-member"
            continue
        rated[name] = values
    return membership.membership_metrics(rated, labels, resamples=resamples, seed=seed,
                                         member_when={name: member_side(name) for name in rated}), skipped


def bridge(columns: dict[str, np.ndarray], metrics: dict[str, Any]) -> dict[str, Any]:
    """Spearman rank correlations between every pair of columns as written (over the chunks both rate; a column
    whose members lie on the smaller side correlates negatively with a larger-side one it agrees with) and AUCs side
    by side."""
    names = list(columns)
    correlations: dict[str, dict[str, float | None]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i:]:
            both = np.isfinite(columns[a]) & np.isfinite(columns[b])
            with warnings.catch_warnings():  # a constant column has no rank correlation: None below
                warnings.simplefilter("ignore")
                rho = spearmanr(columns[a][both], columns[b][both]).statistic if both.sum() > 2 else np.nan
            value = float(rho) if np.isfinite(rho) else None
            correlations[a][b] = correlations[b][a] = value
    aucs = {name: metrics[name]["auc"] for name in names if name in metrics}
    return {"spearman": correlations, "auc": aucs}


# ---------------------------------------------------------------- the jobs


def job_identity(settings: DatasetSettings) -> str:
    """A score or verbatim job's fingerprint: its settings and the records of every folder it reads."""
    inputs = [settings.data, *(getattr(settings, "query_run", None) or ()), getattr(settings, "verbatim", None)]
    return folders.job_fingerprint(settings=asdict(settings),
                                   inputs={str(path): folders.identity(Path(path)) for path in inputs if path})


def score(settings: ScoreSettings, out: str | Path, overwrite: bool = False,
          allow_other_files: bool = False) -> ScoreResult:
    """Run `memscan score` into `out` (held for the job, claimed by the folder model's rules); returns its result.

    Draws no plot: the caller renders roc.png and bridge.png (`memscan.report.render_scores`).
    """
    settings.check()
    data = Path(settings.data)
    identity = job_identity(settings)
    with files.job_folder(Path(out)) as folder:
        claimed = folders.claim(folder, folders.SCORES, (SCORES, METRICS), identity, overwrite=overwrite,
                                allow_other_files=allow_other_files)
        if claimed.done:
            return ScoreResult(folder, claimed.previous)
        pending = folders.begin(folder, folders.SCORES, identity, (SCORES, METRICS), claimed.previous)
        manifest, table, rows = rated_chunks(data)
        split = table["split"][rows]
        labels = (split == "train").astype(np.int64)
        tokenizer, model_record = dataset_model(manifest, settings)
        texts = _decode(tokenizer, table["token_ids"][rows])
        scores = membership_scores(table, rows, texts, settings.min_k)
        if settings.reference_model:
            scores["reference"] = membership.reference_score(table["nll"][rows],
                                                             reference_nll(settings.reference_model, texts,
                                                                           settings.device))
        run_info = None
        if settings.query_run:
            geometry, run_info = geometry_scores(tuple(map(Path, settings.query_run)), data, manifest, rows, split,
                                                 settings.layer)
            scores.update(geometry)
        views = _views(settings, data, manifest, rows)
        metrics, skipped = score_metrics(scores, labels, settings.resamples, settings.seed)
        crossed = dict(scores)
        if settings.verbatim:
            crossed.update(_verbatim_columns(Path(settings.verbatim), table, rows))
        document = {"scores": metrics, "skipped": skipped, "split_rule": manifest.get("split_rule", {"kind": "hash"}),
                    "orientation": {name: member_side(name) for name in [*scores, *views]},
                    "bridge": bridge(crossed, metrics)}
        if views:
            document["geometry"] = view_metrics(views, labels, settings.resamples, settings.seed)
        columns = {"doc_id": table["doc_id"][rows], "chunk_id": table["chunk_id"][rows], "split": split,
                   "label": labels, **{name: np.asarray(values, np.float64) for name, values in crossed.items()},
                   **views}
        entries = [store.write_table(folder / SCORES, columns)]
        files.write_json_atomic(folder / METRICS, _finite(document))
        entries.append(files.file_entry(folder / METRICS))
        summary = folders.write_record(folder, folders.SCORES, {
            "fingerprint": identity, "data": str(data.resolve()), "settings": settings.__dict__,
            "query_run": run_info, "chunks": {s: int((split == s).sum()) for s in SPLITS}, "tables": entries,
            "model": model_record,
        }, pending)
    return ScoreResult(folder, summary)


def _views(settings: ScoreSettings, data: Path, manifest: dict[str, Any], rows: np.ndarray) -> dict[str, np.ndarray]:
    """With --geometry views, every view's chunk scores (m,) (memscan.geometry); else none."""
    if settings.geometry != "views":
        return {}
    backend = exact.choose_backend("cpu" if settings.device == "cpu" else "auto")
    return geometry.view_scores(data, manifest, rows, backend)


def _finite(value: Any) -> Any:
    """NaN and inf become None (JSON has neither), recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
