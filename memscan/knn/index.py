"""FAISS indexes over a dataset's vectors: choose, train, fill, save, load, search, evaluate.

An index folder holds `index.faiss` (always a CPU index), `row_ids.npy` (FAISS id i is
dataset row `row_ids[i]`) and `index.json` (factory and why it was chosen, metric,
dimension, count, the dataset manifest's sha256, device, build parameters and times,
search parameters and the recall curves they were chosen on, recall against exact search,
and the files of every shard with their sizes and sha256, the whole record signed by its
`self_sha256`). A sharded index (`--shards N`) holds `shard-000.faiss` and
`shard-000.row_ids.npy`, ... instead: copies of one trained index filled with consecutive
row ranges, searched as one. An index built
to replace another puts a build id in its file names (`index.1a2b3c4d.faiss`), so the two
never share a file: index.json, replaced last and atomically, says which files are the index.

Where the shards live and the exact searches run is the caller's `engine` (`shards.Engine`:
this process by default, Ray actors with `memscan.engines.ray_runner.RayEngine`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
from tqdm.auto import tqdm

import memscan.store as store
from memscan import checks, files, folders, layout
from memscan.fields import setting
from memscan.errors import DataError, InputError
from memscan.knn import exact, kmeans, tuning
from memscan.knn.shards import (OWN_FILE, Engine, InProcess, LocalShards, Shards, entry_names, file_names,
                                 fill_shard, load_shard, nlist, row_ranges)
from memscan.knn.tuning import MIN_TRAIN_PER_LIST, auto_factory
from memscan.results import StageResult

log = logging.getLogger(__name__)

INFO_FILE = "index.json"
SHARD_PARAMS = ("nprobe", "efSearch")     # FAISS's own, set on every shard
# k_factor: candidates re-ranked exactly per neighbour wanted; compressed codes (PQ) misorder
# near neighbours, and fetching a few times k lets the exact re-ranking put them right.
SEARCH_PARAMS = (*SHARD_PARAMS, "k_factor")
PRODUCT_CANDIDATES = 2       # a self-join's largest products kept per pattern: its own and the best other
TUNE_QUERIES = 1_000         # the recall sample a search parameter is chosen on: +-0.007 at a recall of 0.95


def at_least(flag: str, value: int | None, minimum: int) -> None:
    """Refuses an integer setting below `minimum`, naming its flag; None (the default) passes."""
    if value is not None and value < minimum:
        raise InputError(f"{flag} must be at least {minimum}; got {value}")


@dataclass(frozen=True)
class IndexSettings:
    """What `memscan index` builds (see `memscan index --help`)."""

    split: str = setting("train", "Split whose vectors are the patterns.")
    layer: int | None = setting(None, "Layer (block, for a --sites site) to index [default: the last].")
    site: str | None = setting(None, "Site to index (hidden, attn_out, mlp_hidden, module:PATH, ...) "
                                     "[default: hidden where stored, else the first site].")
    factory: str = setting("auto", "auto | Flat | IVF<nlist>,Flat | IVF<nlist>,PQ<m> | HNSW<M> | any FAISS "
                                   "factory string.")
    metric: str = setting("l2", "Distance of the index.", choices=exact.METRICS)
    device: str = setting("auto")   # the shared --device
    train_size: int | None = setting(None, "IVF training sample [default: 64 per list, within half of "
                                           "--index-memory].")
    seed: int = setting(0)   # the shared --seed
    nprobe: int | None = setting(None, "IVF lists searched [default: tuned to --target-recall].")
    ef_search: int | None = setting(None, "HNSW search depth [default: tuned to --target-recall].")
    target_recall: float = setting(0.95, "1-recall@1 the chosen --nprobe / --ef-search reaches on a sample of the "
                                         "patterns.")
    memory: str = setting("2GB", "Memory the index may hold (512MB, 2GiB, 1.5G): auto compresses it (SQ8, PQ) "
                                 "beyond that.", flag="--index-memory")
    eval_recall: int = setting(0, "Queries for recall against exact search, written into index.json (0: none).")
    recall_k: int = 10
    shards: int = setting(1, "Copies of the trained index, each over one range of rows (with --engine ray: one "
                             "per actor).")

    def check(self) -> None:
        """Every value against its range, once, naming the flag; None means the default, never 0."""
        if self.metric not in exact.METRICS:
            raise InputError(f"--metric must be l2 or ip; got '{self.metric}'")
        checks.device("--device", self.device)
        for flag, value, minimum in (("--train-size", self.train_size, 1), ("--seed", self.seed, 0),
                                     ("--nprobe", self.nprobe, 1), ("--ef-search", self.ef_search, 1),
                                     ("--eval-recall", self.eval_recall, 0), ("--recall-k", self.recall_k, 1),
                                     ("--shards", self.shards, 1)):
            at_least(flag, value, minimum)
        checks.number("--target-recall", self.target_recall, 0.0, 1.0, low_open=True, high_open=False)
        tuning.parse_memory(self.memory)

    @property
    def budget(self) -> int:
        """--memory in bytes."""
        return tuning.parse_memory(self.memory)


def _make_index(factory: str, n: int, metric: str) -> Any:
    try:
        return faiss.index_factory(n, factory, exact.faiss_metric_of(metric))
    except RuntimeError as exc:
        raise InputError(f"--factory '{factory}' is not a FAISS factory string FAISS accepts "
                         f"({exact.faiss_reason(exc)})") from None


def _train_sample(dataset: store.ActivationDataset, split: str, layer: int, count: int, size: int,
                  seed: int) -> np.ndarray:
    """A seeded uniform sample of `size` of the `count` vectors, gathered in one streaming pass."""
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))
    sample, seen, filled = np.empty((size, dataset.n), np.float32), 0, 0
    with tqdm(total=count, desc="training sample", unit="vec", unit_scale=True, disable=None, leave=False) as bar:
        for X, _ in dataset.iter_batches(split=split, layer=layer):
            lo, hi = np.searchsorted(chosen, [seen, seen + len(X)])
            sample[filled:filled + hi - lo] = X[chosen[lo:hi] - seen]
            filled, seen = filled + hi - lo, seen + len(X)
            bar.update(len(X))
    return sample


def manifest_sha256(data_dir: Path) -> str:
    return files.sha256_of(Path(data_dir) / store.MANIFEST)


def resolve_layer(dataset: store.ActivationDataset, layer: int | None) -> int:
    if layer is None:
        return max(dataset.layers)
    if layer not in dataset.layers:
        raise InputError(f"--layer {layer} is not in dataset '{dataset.directory}' (layers: {dataset.layers})")
    return layer


# ---------------------------------------------------------------- index.json: read, checked, verified


def read_info(index_dir: str | Path) -> dict[str, Any]:
    """index.json, refused in one line unless it is a signed record of this format of sound shape."""
    path = Path(index_dir) / INFO_FILE
    info = folders.read_record(Path(index_dir), folders.INDEX)
    _check_shape(info, path)
    return info


def _check_shape(info: dict[str, Any], path: Path) -> None:
    """Every field the index is opened with, of its type and range (the signature says memscan wrote it)."""
    fields = {"factory": str, "metric": str, "n": int, "ntotal": int, "dataset": dict, "shards": list,
              "search": dict, "recall": (dict, type(None))}
    for key, kinds in fields.items():
        files.require(info, key, kinds, path)
    if info["metric"] not in exact.METRICS:
        raise DataError(f"{path}: 'metric' must be l2 or ip; got '{info['metric']}'")
    for key in ("n", "ntotal"):
        if info[key] < 1:
            raise DataError(f"{path}: '{key}' must be at least 1; got {info[key]}")
    for key, kinds in {"path": str, "manifest_sha256": str, "model": str, "layer": int, "split": str}.items():
        files.require(info["dataset"], key, kinds, path)
    if "site" in info["dataset"]:  # indexes built before sites have none: the residual stream
        files.require(info["dataset"], "site", str, path)
    for name, value in info["search"].items():
        if name not in SEARCH_PARAMS or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{path}: search parameter {name!r} must be nprobe, efSearch or k_factor, "
                            f"a positive integer; got {value!r}")
    if not info["shards"]:
        raise DataError(f"{path} lists no shards")
    for entry in info["shards"]:
        _check_shard_entry(entry, path)
    if sum(entry["ntotal"] for entry in info["shards"]) != info["ntotal"]:
        raise DataError(f"{path}: its shards hold {sum(e['ntotal'] for e in info['shards']):,} vectors; "
                        f"'ntotal' says {info['ntotal']:,}")


def _check_shard_entry(entry: Any, path: Path) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: a shard entry must be an object; got {entry!r:.60}")
    files.require(entry, "ntotal", int, path)
    for key in ("index", "row_ids"):
        files.require(entry, key, dict, path)
        files.plain_name(files.require(entry[key], "name", str, path), path)
        files.require(entry[key], "bytes", int, path)
        files.require(entry[key], "sha256", str, path)


def _dataset_problem(info: dict[str, Any], index_dir: Path) -> str | None:
    """Why the dataset an index was built from cannot serve it (missing or changed), or None."""
    data_dir = Path(info["dataset"]["path"])
    if not (data_dir / store.MANIFEST).is_file():
        return f"dataset '{data_dir}' that index '{index_dir}' was built from is missing"
    if manifest_sha256(data_dir) != info["dataset"]["manifest_sha256"]:
        return f"dataset '{data_dir}' changed since index '{index_dir}' was built; rebuild the index"
    return None


def verify(index_dir: str | Path) -> list[str]:
    """Every problem found in an index folder: its record, each listed file's size and sha256, its dataset."""
    index_dir = Path(index_dir)
    try:
        info = read_info(index_dir)
    except DataError as exc:
        return [str(exc)]
    problems = [files.file_problem(index_dir, entry[key], what)
                for entry in info["shards"] for key, what in (("index", "index file"), ("row_ids", "row-id file"))]
    problems.append(_dataset_problem(info, index_dir))
    return [problem for problem in problems if problem]


# ---------------------------------------------------------------- build


def _claim_folder(out_dir: Path, overwrite: bool, allow_other_files: bool) -> list[str]:
    """The files memscan's records in `out_dir` own (the index there, a build cut short: to remove once the
    new index is whole), after refusing to replace an index without `overwrite`, a link or a file of
    someone else's where the build writes (memscan.folders), and other files unless `allow_other_files`."""
    ours = folders.owned_names(out_dir)
    index_files = [p.name for p in out_dir.iterdir() if OWN_FILE.fullmatch(p.name)]
    folders.refuse_links(out_dir, [INFO_FILE, folders.INDEX_BUILD.record, *index_files])
    folders.refuse_in_the_way(out_dir, [INFO_FILE, *(name for name in index_files if not name.endswith(
        files.TMP_SUFFIX))], ours)
    if (out_dir / INFO_FILE).exists() and not overwrite:
        raise InputError(f"--out '{out_dir}' already holds an index; choose another folder or pass --overwrite")
    if not allow_other_files:
        scratch = {files.tmp_path(Path(name)).name for name in (INFO_FILE, folders.INDEX_BUILD.record)}
        files.refuse_foreign(out_dir, lambda name: name in ours or name in scratch or (
            name.endswith(files.TMP_SUFFIX) and bool(OWN_FILE.fullmatch(name))))
    return sorted(name for name in ours if OWN_FILE.fullmatch(name))


def _build_id(taken: set[str], count: int) -> str | None:
    """None (plain file names) unless those are taken by the index being replaced; then the
    first 8 hex digits of a fingerprint of the taken names, the first that frees every name."""
    def names(build_id: str | None) -> set[str]:
        return {name for shard in range(count) for name in file_names(shard, count, build_id)}

    build_id, attempt = None, 0
    while taken & names(build_id):
        attempt += 1
        build_id = files.fingerprint([sorted(taken), attempt])[:8]
    return build_id


def _train(index: Any, factory: str, dataset: store.ActivationDataset, split: str, layer: int, count: int,
           settings: IndexSettings) -> tuple[int, float]:
    """Train `index` on a seeded sample of the split; returns (sample size, seconds)."""
    lists = nlist(index)
    minimum = MIN_TRAIN_PER_LIST * (lists or 1)
    wanted = (settings.train_size if settings.train_size is not None
              else tuning.train_rows(lists, dataset.n, settings.budget))
    train_size = min(count, wanted)
    if lists and train_size < minimum:
        hint = "raise --train-size" if count >= minimum else "use fewer lists or --factory Flat"
        raise InputError(f"IVF with {lists:,} lists needs at least {minimum:,} training vectors "
                         f"({MIN_TRAIN_PER_LIST} per list); got {train_size:,} of the split's {count:,}; {hint}")
    started = time.perf_counter()
    sample = _train_sample(dataset, split, layer, count, train_size, settings.seed)
    exact.check_finite(sample, f"split '{split}'")
    exact.check_scale(sample, f"split '{split}' (a training sample of {train_size:,})")
    log.info("training %s on %d vectors", factory, train_size)
    try:
        kmeans.train(index, sample, settings.seed)
    except RuntimeError as exc:
        raise InputError(f"FAISS could not train '{factory}' on {train_size:,} vectors: "
                         f"{exact.faiss_reason(exc)}") from None
    return train_size, time.perf_counter() - started


@dataclass(frozen=True, eq=False)
class IndexResult(StageResult):
    """A built index: its folder and signed index.json, read as a mapping or by property."""

    kind = folders.INDEX

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index."""
        return self.record["factory"]

    @property
    def ntotal(self) -> int:
        """The vectors indexed, over every shard."""
        return self.record["ntotal"]

    @property
    def site_key(self) -> layout.SiteKey:
        """The site and layer the index holds."""
        return layout.SiteKey(layout.site_of(self.record["dataset"]), self.record["dataset"]["layer"])

    @property
    def split(self) -> str:
        """The dataset split the index holds."""
        return self.record["dataset"]["split"]

    @property
    def search_params(self) -> dict[str, int]:
        """The search parameters chosen (given or tuned)."""
        return dict(self.record["search"])

    @property
    def measured_recall(self) -> dict[str, Any] | None:
        """The recall against exact search measured at build (--eval-recall), or None."""
        return self.record["recall"]

    def load(self, device: str = "cpu", engine: Engine | None = None) -> KnnIndex:
        """The index opened for searching (`KnnIndex.load`)."""
        return KnnIndex.load(self.folder, device=device, engine=engine)


def build(data_dir: str | Path, out_dir: str | Path, settings: IndexSettings = IndexSettings(),
          overwrite: bool = False, engine: Engine | None = None,
          allow_other_files: bool = False) -> IndexResult:
    """Build, tune, evaluate and save an index over one split and layer of a dataset; returns the index (index.json).

    The job holds `out_dir` (one job at a time); an index already there is replaced only with
    `overwrite`, and only once the new one is whole (a kill at any moment leaves the old or the
    new index loadable). Files memscan did not write are refused unless `allow_other_files`,
    and never removed. `engine` (default: this process) holds the shards and runs the exact
    searches; with `ray_runner.RayEngine` each shard is filled by a Ray actor that reads its
    own rows and writes its own files, so `out_dir` must be on a file system every worker sees.
    """
    started = time.perf_counter()
    settings.check()
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()  # workers may run elsewhere
    with files.job_folder(out_dir):
        replaced = _claim_folder(out_dir, overwrite, allow_other_files)
        info, sharded = _build(data_dir, settings, engine or InProcess())
        build_id = _build_id(set(replaced), len(sharded))
        written = [name for shard in range(len(sharded)) for name in file_names(shard, len(sharded), build_id)]
        folders.begin(out_dir, folders.INDEX_BUILD, build_id or "", [*written, *replaced], None)
        info["shards"] = sharded.save(out_dir, build_id)
        info["build"]["total_seconds"] = round(time.perf_counter() - started, 3)
        return IndexResult(out_dir, _commit(out_dir, info, replaced))


def _split_count(dataset: store.ActivationDataset, settings: IndexSettings) -> tuple[int, int]:
    """(layer, rows of the split there), refusing an empty split or more shards than rows."""
    layer = resolve_layer(dataset, settings.layer)
    count = dataset.count(settings.split, layer)
    if count == 0:
        raise InputError(f"split '{settings.split}' has no rows at layer {layer} in '{dataset.directory}' "
                         f"(splits: {', '.join(dataset.manifest['counts']['rows'])})")
    if settings.shards > count:
        raise InputError(f"--shards {settings.shards} is more than the {count:,} vectors of split '{settings.split}'")
    return layer, count


def _build(data_dir: Path, settings: IndexSettings, engine: Engine) -> tuple[dict[str, Any], Shards]:
    """The trained, filled, tuned and evaluated index in memory (or in Ray actors) and its record, unsaved."""
    problems = store.verify(data_dir)
    if problems:
        raise DataError(f"dataset '{data_dir}' fails verification: {problems[0]}")
    dataset = store.ActivationDataset(data_dir, settings.site)
    layer, count = _split_count(dataset, settings)
    backend = exact.choose_backend(settings.device)
    on_gpu = backend.name == "faiss-gpu"
    factory, reason = (auto_factory(count, dataset.n, settings.budget, gpu=on_gpu) if settings.factory == "auto"
                       else (settings.factory, "given with --factory"))
    index = cpu_index = _make_index(factory, dataset.n, settings.metric)
    lists = nlist(index)
    if on_gpu:
        index = faiss.index_cpu_to_gpu(backend.resources, 0, index)

    train_size, train_seconds = (0, 0.0) if index.is_trained else _train(
        index, factory, dataset, settings.split, layer, count, settings)
    trained = faiss.serialize_index(faiss.index_gpu_to_cpu(index) if on_gpu else index)
    search = _default_search_params(factory, lists, settings)
    t = time.perf_counter()
    row_ids = dataset.row_ids(settings.split, layer)
    makers = [functools.partial(fill_shard, trained, data_dir, settings.split, layer, rows, search,
                                int(np.searchsorted(row_ids, rows[1]) - np.searchsorted(row_ids, rows[0])),
                                site=dataset.site)
              for rows in row_ranges(row_ids, settings.shards)]
    sharded, searcher = engine.open_shards(makers, settings.metric, settings.device)
    add_seconds = time.perf_counter() - t

    info: dict[str, Any] = {
        "format": folders.INDEX.format, "format_version": folders.INDEX.version,
        "factory": factory, "factory_reason": reason, "metric": settings.metric,
        "n": dataset.n, "ntotal": sharded.ntotal,
        "dataset": {"path": str(data_dir.resolve()), "manifest_sha256": manifest_sha256(data_dir),
                    "model": dataset.manifest["model"]["id"], "site": dataset.site, "layer": layer,
                    "split": settings.split},
        "device": backend.name if on_gpu else "cpu",
        "engine": engine.name,
        "build": {"settings": asdict(settings), "train_size": train_size, "train_seconds": round(train_seconds, 3),
                  "add_seconds": round(add_seconds, 3), "faiss": faiss.__version__},
        "search": search,
        "tuning": None,
        "recall": None,
    }
    built = KnnIndex(sharded, info, dataset, searcher)
    plan = _tuning_plan(cpu_index, factory, lists, sharded.ntotal, settings)
    if plan:
        t = time.perf_counter()
        info["tuning"] = built.tune(plan, settings.target_recall, settings.seed)
        info["tuning"]["seconds"] = round(time.perf_counter() - t, 3)
    if settings.eval_recall:   # on another sample than the tuning's: an independent check of the chosen value
        info["recall"] = built.recall(settings.eval_recall, settings.recall_k, settings.seed + 1)
    return info, sharded


def _commit(out_dir: Path, info: dict[str, Any], replaced: list[str]) -> dict[str, Any]:
    """Write the signed index.json atomically over the old one (the switch: the new shard files are
    already fsynced under names the replaced index does not use), then remove the replaced index's files, then
    build.json, the record of the build's pending names that kept them memscan's until the switch."""
    info = files.signed(info)
    files.write_json_atomic(out_dir / INFO_FILE, info)
    kept = {name for entry in info["shards"] for name in entry_names(entry)}
    files.remove_owned(out_dir, [name for name in replaced if name not in kept])
    files.remove_owned(out_dir, [folders.INDEX_BUILD.record])
    shards = len(info["shards"])
    log.info("indexed %d vectors (%s, %d shard%s) into %s in %.1f s", info["ntotal"], info["factory"], shards,
             "s" * (shards > 1), out_dir, info["build"]["total_seconds"])
    return info


def _default_search_params(factory: str, lists: int | None, settings: IndexSettings) -> dict[str, int]:
    """The search parameters the shards start with: the given --nprobe / --ef-search, else nlist/16
    (at least 8) and 64, FAISS's usual starting points; `_tuning_plan` then replaces those not given."""
    params: dict[str, int] = {}
    if lists:
        params["nprobe"] = min(lists, settings.nprobe if settings.nprobe is not None else max(8, lists // 16))
    if "HNSW" in factory and not lists:   # a graph index; an IVF's HNSW quantizer keeps its own depth
        params["efSearch"] = settings.ef_search if settings.ef_search is not None else 64
    return params


def _tuning_plan(index: Any, factory: str, lists: int | None, ntotal: int,
                 settings: IndexSettings) -> list[tuple[str, int]]:
    """The search parameters to tune, in order, each with its largest value: an IVF's nprobe up to
    nlist, or an HNSW graph's efSearch up to EF_SEARCH_MAX, unless given; then, for compressed
    codes, k_factor up to RERANK_MAX. [] for a float32 scan (Flat) or everything given."""
    plan = []
    if lists and settings.nprobe is None:
        plan.append(("nprobe", lists))
    elif not lists and "HNSW" in factory and settings.ef_search is None:
        plan.append(("efSearch", min(tuning.EF_SEARCH_MAX, max(tuning.EF_SEARCH_MIN, ntotal))))
    if lossy_codes(index):
        plan.append(("k_factor", tuning.RERANK_MAX))
    return plan


def lossy_codes(index: Any) -> bool:
    """Whether a (CPU) index holds its vectors other than as float32 (PQ, SQ, a transform): its
    candidates' order is then approximate even within the lists or graph it searches."""
    return not isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat))


class InnerMaxima(NamedTuple):
    """For every pattern the largest inner product with another found (d,) float64 (-inf: none) and that
    pattern's row id (d,) (-1: none)."""

    value: np.ndarray
    partner: np.ndarray


class KnnIndex:
    """A loaded index: search by vectors, self-join, and recall against exact search."""

    def __init__(self, shards: Shards, info: dict[str, Any], dataset: store.ActivationDataset,
                 engine: Engine):
        self.shards, self.info, self.dataset, self.engine = shards, info, dataset, engine
        self.row_ids = shards.row_ids  # every indexed row, in row order

    @classmethod
    def load(cls, index_dir: str | Path, device: str = "cpu", engine: Engine | None = None) -> KnnIndex:
        """Open an index folder: index.json checked (signature and shape), every file against its
        size and sha256, the dataset against the manifest it was built from.

        Shards load where `engine` keeps them (`shards.InProcess`, the default: here, on the GPU
        with device auto|gpu where faiss sees one; `ray_runner.RayEngine`: each in a Ray actor,
        searched in parallel), and its exact searches run on `device`.
        """
        index_dir = Path(index_dir)
        info = read_info(index_dir)
        problem = _dataset_problem(info, index_dir)
        if problem:
            raise DataError(problem)
        params = {name: value for name, value in info["search"].items() if name in SHARD_PARAMS}
        makers = [functools.partial(load_shard, index_dir.resolve(), entry, params, info["n"], info["metric"])
                  for entry in info["shards"]]
        sharded, searcher = (engine or InProcess()).open_shards(makers, info["metric"], device)
        dataset = store.ActivationDataset(info["dataset"]["path"], layout.site_of(info["dataset"]))
        return cls(sharded, info, dataset, searcher)

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index."""
        return self.info["factory"]

    @property
    def metric(self) -> str:
        """l2 or ip."""
        return self.info["metric"]

    @property
    def n(self) -> int:
        """The vectors' dimension."""
        return self.info["n"]

    @property
    def ntotal(self) -> int:
        """The vectors indexed, over every shard."""
        return self.info["ntotal"]

    @property
    def site(self) -> str:
        """The site the index holds (indexes built before sites: the residual stream)."""
        return layout.site_of(self.info["dataset"])

    @property
    def layer(self) -> int:
        """The layer of its site the index holds."""
        return self.info["dataset"]["layer"]

    @property
    def site_key(self) -> layout.SiteKey:
        """The stored set of vectors the index holds: its site and layer."""
        return layout.SiteKey(self.site, self.layer)

    @property
    def split(self) -> str:
        """The dataset split the index holds (the patterns)."""
        return self.info["dataset"]["split"]

    @property
    def model(self) -> str:
        """The id of the model whose activations the index holds."""
        return self.info["dataset"]["model"]

    @property
    def manifest_sha256(self) -> str:
        """The sha256 of the manifest of the dataset the index was built from."""
        return self.info["dataset"]["manifest_sha256"]

    @property
    def search_params(self) -> dict[str, int]:
        """The search parameters searches run with now (nprobe, efSearch, k_factor), a copy."""
        return dict(self.info["search"])

    @property
    def measured_recall(self) -> dict[str, Any] | None:
        """The recall against exact search measured at build (--eval-recall), or None where none was."""
        return self.info["recall"]

    @property
    def self_sha256(self) -> str:
        """The signature of index.json: what a query run's fingerprint names the index by."""
        return self.info[files.SELF_SHA256]

    @property
    def exact(self) -> bool:
        """Whether every search is exact (a Flat index)."""
        return self.factory == "Flat"

    def open_queries(self, data_dir: str | Path) -> store.ActivationDataset:
        """A dataset of queries opened at the index's site (one line if it does not hold that site)."""
        return store.ActivationDataset(data_dir, self.dataset.site)

    def check_queries(self, dataset: store.ActivationDataset, layer: int | None = None) -> int:
        """The layer to query at; refuses queries from another model, site, layer or dimension than the index's."""
        layer = self.layer if layer is None else layer
        if dataset.site != self.dataset.site:
            raise InputError(f"queries in '{dataset.directory}' are of site '{dataset.site}'; "
                             f"the index holds site '{self.dataset.site}'")
        if dataset.n != self.n:
            raise InputError(f"queries in '{dataset.directory}' have dimension {dataset.n}; "
                             f"the index holds dimension {self.n}")
        if dataset.manifest["model"]["id"] != self.model:
            raise InputError(f"queries in '{dataset.directory}' come from model '{dataset.manifest['model']['id']}'; "
                             f"the index was built from '{self.model}'")
        if layer != self.layer or layer not in dataset.layers:
            raise InputError(f"the index holds layer {self.layer}; the queries ask for layer {layer} "
                             f"(dataset '{dataset.directory}' has layers {dataset.layers})")
        return layer

    def search_dataset(self, data_dir: str | Path, k: int, split: str = "test",
                       batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kNN of one split of another dataset: (query row ids, D, I), checked for compatibility."""
        dataset = self.open_queries(data_dir)
        layer = self.check_queries(dataset)
        if dataset.count(split, layer) == 0:
            raise InputError(f"split '{split}' of '{data_dir}' has no rows to query")
        parts = [(meta["row_id"], *self.search(X, k))
                 for X, meta in dataset.iter_batches(split=split, layer=layer, batch_rows=batch_rows)]
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def exact_self_join(self, k: int, block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact self-join of the indexed patterns, blockwise over the dataset (no index used)."""
        self.check_k(k, exclude_self=True)
        blocks = dataset_blocks(self.dataset, self.split, self.layer, block_rows)
        return self.engine.self_join(blocks, k, metric=self.metric)

    def exact_search_dataset(self, data_dir: str | Path, k: int, split: str = "test",
                             block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact kNN of one split of another dataset against the indexed patterns, blockwise."""
        self.check_k(k)
        queries = self.open_queries(data_dir)
        layer = self.check_queries(queries)
        if queries.count(split, layer) == 0:
            raise InputError(f"split '{split}' of '{data_dir}' has no rows to query")
        database = dataset_blocks(self.dataset, self.split, layer, block_rows)
        return self.engine.knn(dataset_blocks(queries, split, layer, block_rows)(), database, k, metric=self.metric)

    def set_search_params(self, nprobe: int | None = None, efSearch: int | None = None,
                          k_factor: int | None = None) -> None:
        """nprobe (IVF) and efSearch (HNSW) on every shard (above faiss-gpu's 2048 the CPU copies search),
        and k_factor, the candidates re-ranked exactly per neighbour wanted."""
        for name, value in (("nprobe", nprobe), ("efSearch", efSearch), ("k_factor", k_factor)):
            if value is not None:
                if value < 1:
                    raise InputError(f"--{name.lower()} must be at least 1; got {value}")
                if name in SHARD_PARAMS:
                    self.shards.set_parameter(name, value)
                self.info["search"][name] = value

    @property
    def target_recall(self) -> float:
        """The 1-recall@1 the search parameters were tuned for (indexes built before --target-recall: the default)."""
        return self.info["build"]["settings"].get("target_recall", IndexSettings.target_recall)

    def recall_knob(self) -> tuple[str, int] | None:
        """The search parameter that buys recall with time and its largest useful value: (nprobe, nlist)
        for IVF, (efSearch, EF_SEARCH_MAX) for HNSW; None where every search is a full scan (Flat)."""
        lists = self.shards.nlist
        if lists:
            return "nprobe", lists
        return ("efSearch", tuning.EF_SEARCH_MAX) if "efSearch" in self.info["search"] else None

    @contextlib.contextmanager
    def searching_with(self, **params: int) -> Iterator[None]:
        """Searches with `params` (nprobe, efSearch, k_factor) inside the block; the index's own values after."""
        kept = {name: self.info["search"][name] for name in params if name in self.info["search"]}
        self.set_search_params(**params)
        try:
            yield
        finally:
            self.set_search_params(**kept)

    def check_k(self, k: int, exclude_self: bool = False) -> None:
        available = self.shards.ntotal - int(exclude_self)
        if not 1 <= k <= available:
            raise InputError(f"--k must be between 1 and the {available:,} indexed patterns"
                             f"{' other than the query itself' if exclude_self else ''}; got {k:,}")

    def search(self, X: np.ndarray, k: int, query_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) exact float32 scores, I (nq, k) row ids); with query_ids, each query's own row is excluded."""
        self.check_k(k, query_ids is not None)
        if X.shape[1] != self.n:
            raise InputError(f"queries have dimension {X.shape[1]}; the index holds dimension {self.n}")
        exact.check_finite(X, "the queries")
        exact.check_scale(X, "the queries")
        _, ids = self.shards.search(X, self.candidates(k, query_ids is not None))
        return self._finish(X, ids, k, query_ids)

    def self_join(self, k: int, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every indexed pattern its k nearest OTHER patterns: (row ids, D, I).

        IVF indexes on the CPU group the queries by inverted list (faiss.contrib.big_batch_search),
        so each list's codes are scanned once per query batch instead of once per query.
        """
        row_ids, D, I, _ = self._joined(k, batch_rows, products=0)
        return row_ids, D, I

    def self_join_with_products(self, k: int, batch_rows: int = 65536,
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, InnerMaxima | None]:
        """`self_join`, and for every pattern the largest inner product with another among the vectors the same
        scan read (`Shards.search_with_products`: one product per list gives both) and its k nearest found
        (where a pattern's probed lists held too few, they come from a wider search), recomputed exactly; its
        maxima None where the shards cannot scan both at once. How often that is the true maximum is measured
        by its caller (memscan.query.checks)."""
        return self._joined(k, batch_rows, products=PRODUCT_CANDIDATES)

    def _joined(self, k: int, batch_rows: int, products: int,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, InnerMaxima | None]:
        self.check_k(k, exclude_self=True)
        n = self.shards.ntotal
        D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        value, partner, complete = np.full(n, -np.inf), np.full(n, -1, np.int64), bool(products)
        with tqdm(total=n, desc="self-join", unit="vec", unit_scale=True, disable=None, leave=False) as progress:
            for rows, X, ids, products_found in self._join_scans(self.candidates(k, True), batch_rows, products):
                at = np.searchsorted(self.row_ids, rows)
                D[at], I[at] = self._finish(X, ids, k, rows)
                if products_found is None:
                    complete = False
                elif complete:   # the nearest found join the candidates: one alone in its lists still has products
                    value[at], partner[at] = self._largest_other(X, np.concatenate([products_found, I[at]], 1), rows)
                progress.update(len(X))
        return self.row_ids, D, I, InnerMaxima(value, partner) if complete else None

    def _join_scans(self, count: int, batch_rows: int, products: int,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """The self-join's candidates by block: (row ids, X, `count` nearest candidates' row ids, the `products`
        largest products' row ids or None). One IVF-Flat held here scans its own lists, reading nothing from the
        dataset (`Shard.self_join_scans`); else the dataset's batches are searched through every shard."""
        shard = self.shards.local_shard()
        scans = shard.self_join_scans(count, products, batch_rows) if shard is not None else None
        if scans is not None:
            yield from ((rows, X, found.I, found.J if products else None) for rows, X, found in scans)
            return
        for X, meta in self.dataset.iter_batches(split=self.split, layer=self.layer, batch_rows=batch_rows):
            found = self.shards.search_with_products(X, count, products) if products else None
            ids = found.I if found is not None else self.shards.search(X, count, grouped=True)[1]
            yield meta["row_id"], X, ids, None if found is None else found.J

    def _largest_other(self, X: np.ndarray, candidates: np.ndarray, query_ids: np.ndarray) -> InnerMaxima:
        """Each query's largest exact inner product (float64) with a candidate other than itself, and that
        candidate's row id (-inf and -1 where it has none)."""
        ids = np.where(candidates == query_ids[:, None], -1, candidates)
        valid = ids >= 0
        rows, local = np.unique(np.where(valid, ids, self.row_ids[0]).ravel(), return_inverse=True)
        scores = exact.exact_scores(X, self.vectors(rows), np.where(valid, local.reshape(ids.shape), -1), "ip")
        scores = np.where(valid, scores, -np.inf)
        best = np.argmax(scores, axis=1)
        value = scores[np.arange(len(X)), best]
        return InnerMaxima(value, np.where(np.isfinite(value), ids[np.arange(len(X)), best], -1))

    def candidates(self, k: int, exclude_self: bool) -> int:
        """Candidates to fetch for k neighbours: k (+1 for the query's own row); with compressed codes
        k_factor (k + 1) for at least TUNE_K neighbours, what the tuned search fetched, for every query."""
        if "k_factor" not in self.info["search"]:
            return k + int(exclude_self)
        return min(self.shards.ntotal, self.info["search"]["k_factor"] * (max(k, tuning.TUNE_K) + 1))

    def _finish(self, X: np.ndarray, ids: np.ndarray, k: int, query_ids: np.ndarray | None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Drop each query's own row, recompute every candidate's score exactly, keep the best k.

        ids (nq, c) candidates, -1 where none; each distinct row is read once (neighbours repeat).
        """
        if query_ids is not None:
            ids = np.where(ids == query_ids[:, None], -1, ids)
        valid = ids >= 0
        rows, local = np.unique(np.where(valid, ids, self.row_ids[0]).ravel(), return_inverse=True)
        D = exact.exact_scores(X, self.vectors(rows), np.where(valid, local.reshape(ids.shape), -1), self.metric)
        D = np.where(valid, D, np.inf if self.metric == "l2" else -np.inf)
        best = np.argsort(-D if self.metric == "ip" else D, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(D, best, axis=1).astype(np.float32),
                np.take_along_axis(np.where(valid, ids, -1), best, axis=1))

    def exact_within(self, X: np.ndarray, k: int, query_ids: np.ndarray, radius: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """The exact k nearest OTHER patterns (D squared, I) of indexed patterns X whose k-th nearest other lies
        within radius[i], through the IVF lists that can hold one (`cells`); None where the index cannot."""
        found = self.shards.search_within(X, min(k + 1, self.shards.ntotal), radius)
        if found is None:
            return None
        _, ids, scanned = found
        log.debug("exact search of %d patterns through %.1f lists each", len(X), scanned / max(1, len(X)))
        return self._finish(X, ids, k, query_ids)

    def pattern_blocks(self, block_rows: int = 65536) -> Callable[[], Iterator[exact.Block]]:
        """The indexed patterns as a re-startable iterator of (row ids, X) blocks in row order: copied out of the
        index's own codes where they are the vectors as added and held in this process (no Parquet decoding:
        at ten million patterns a pass costs seconds, not minutes), else read from the dataset."""
        if not (self.shards.exact_codes and isinstance(self.shards, LocalShards)):
            return dataset_blocks(self.dataset, self.split, self.layer, block_rows)

        def blocks() -> Iterator[exact.Block]:
            for start in range(0, self.shards.ntotal, block_rows):
                rows = self.row_ids[start:start + block_rows]
                yield rows, self.shards.reconstruct(rows)
        return blocks

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Indexed patterns' vectors (m, n) float32, in the order given: from the index's own codes where they
        are the vectors as added (Flat, IVF-Flat, HNSW-Flat: an O(m) lookup), else read from the dataset."""
        return self.shards.reconstruct(rows) if self.shards.exact_codes else self.dataset.take(rows)

    def recall_request(self, queries: int, k: int, seed: int = 0) -> exact.Request:
        """A seeded sample of `queries` indexed patterns as self-join queries for their k nearest OTHER patterns:
        the exact search a recall is measured against (`recall_of`), which may ride a shared pass."""
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(self.row_ids), size=min(queries, len(self.row_ids)), replace=False))
        query_ids = self.row_ids[pick]
        return exact.Request(query_ids, self.vectors(query_ids), min(k, self.shards.ntotal - 1), self.metric,
                             exclude_self=True)

    def truth(self, request: exact.Request) -> np.ndarray:
        """The exact scores (m, k) of `request` against the indexed split and layer, in a pass of its own."""
        return self.engine.knn_each([request], self.pattern_blocks())[0][0]

    def recall_of(self, request: exact.Request, truth: np.ndarray, found: np.ndarray | None = None) -> dict[str, Any]:
        """1-recall@1 and k-recall@k of the self-join on `request`'s patterns against their exact `truth`
        (`recall_at`): `found` is what a self-join made found for them (m, k), else they are searched now."""
        approx = found if found is not None else self.search(request.X, request.k, request.ids)[0]
        at_1, at_k = recall_at(approx, truth, self.metric)
        return {"queries": len(request.ids), "k": request.k, "recall_1_at_1": at_1, "recall_k_at_k": at_k,
                "search": self.search_params}

    def recall(self, queries: int, k: int, seed: int = 0) -> dict[str, Any]:
        """1-recall@1 and k-recall@k of the self-join on a seeded sample of indexed patterns (`recall_of`)."""
        request = self.recall_request(queries, k, seed)
        return self.recall_of(request, self.truth(request))

    def tune(self, plan: list[tuple[str, int]], target: float, seed: int = 0,
             queries: int = TUNE_QUERIES) -> dict[str, Any]:
        """Set each (parameter, largest value) of `plan` in turn (`_tuning_plan`) to the smallest value
        whose 1-recall@1 of a search for TUNE_K neighbours reaches `target` on a seeded sample of
        `queries` indexed patterns, each leaving its own row out (`tuning.sweep` over the
        tie-tolerant `recall_at`).

        With k_factor in the plan the sweeps before it run with its largest value, so nprobe
        (or efSearch) is chosen for what the codes can reach, and k_factor then for that.
        Returns index.json's record: the target, the sample, every sweep's curve and choice.
        """
        k = min(tuning.TUNE_K, self.shards.ntotal - 1)
        request = self.recall_request(queries, 1, seed)
        query_ids, X, truth = request.ids, request.X, self.truth(request)
        if "k_factor" in dict(plan):
            self.set_search_params(k_factor=dict(plan)["k_factor"])
        sweeps = []
        for parameter, limit in plan:
            measure = functools.partial(self._recall_with, parameter, X, query_ids, truth, k)
            sweeps.append(tuning.sweep(parameter, tuning.search_values(parameter, limit), measure, target))
            self.set_search_params(**{parameter: sweeps[-1]["chosen"]})
        chosen = {sweep["parameter"]: sweep["chosen"] for sweep in sweeps}
        reached = sweeps[-1]["reached"]
        log.info("tuned %s for a 1-recall@1 of %.3f on %d patterns: %s", chosen, target, len(query_ids),
                 "reached" if reached else "NOT reached")
        if not reached:
            log.warning("no search parameters up to %s reach a 1-recall@1 of %.3f; the index keeps %s "
                        "(see index.json's tuning)", dict(plan), target, chosen)
        return {"target_recall": target, "queries": len(query_ids), "k": k, "seed": seed, "sweeps": sweeps,
                "chosen": chosen, "reached": reached}

    def _recall_with(self, parameter: str, X: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, k: int,
                     value: int) -> float:
        """1-recall@1 of a k-search of X (the patterns `query_ids`, own rows left out) with `parameter` = value."""
        self.set_search_params(**{parameter: value})
        approx, _ = self.search(X, k, query_ids)
        return recall_at(approx[:, :1], truth, self.metric)[0]


RECALL_RTOL = 1e-6   # float rounding of one distance computed twice; far below any real gap


def recall_at(approx: np.ndarray, truth: np.ndarray, metric: str) -> tuple[float, float]:
    """(1-recall@1, k-recall@k) of approximate scores (nq, k) against the exact ones (nq, k), by distance.

    An approximate neighbour counts as found when its exact score is as good as the true
    nearest (@1) or the true k-th (@k), within RECALL_RTOL: an exact duplicate returned in
    place of its twin, or any of several neighbours tied at the k-th distance, is not a miss.
    Both arrays hold exact scores (l2: squared distances, smaller is better; ip: larger).
    """
    sign = 1.0 if metric == "l2" else -1.0
    found, best = sign * approx.astype(np.float64), sign * truth.astype(np.float64)   # smaller is better
    bound = best + RECALL_RTOL * np.abs(best) + np.finfo(np.float32).tiny
    at_1 = found[:, 0] <= bound[:, 0]
    at_k = (found <= bound[:, -1:]).sum(axis=1) / truth.shape[1]
    return float(at_1.mean()), float(at_k.mean())


def dataset_blocks(dataset: store.ActivationDataset, split: str, layer: int,
                   block_rows: int = 65536) -> Any:
    """A dataset's split and layer as a re-startable iterator of (row ids, X) blocks."""
    def blocks():
        for X, meta in dataset.iter_batches(split=split, layer=layer, batch_rows=block_rows):
            yield meta["row_id"], X
    return blocks
