"""FAISS indexes over a dataset's vectors: choose, train, fill, save, load, search, evaluate.

An index folder holds `index.faiss` (always a CPU index), `row_ids.npy` (FAISS id i is
dataset row `row_ids[i]`) and `index.json` (factory and why it was chosen, metric,
dimension, count, the dataset manifest's sha256, device, build parameters and times,
search parameters, recall against exact search, and the files of every shard). A
sharded index (`--shards N`) holds `shard-000.faiss` and `shard-000.row_ids.npy`, ...
instead: copies of one trained index filled with consecutive row ranges, searched as one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memscan import files, store
from memscan.errors import DataError, InputError
from memscan.knn import exact
from memscan.knn.shards import (UNSHARDED, LocalShards, Shard, Shards, fill_shard, load_shard, remove_stale_files,
                                row_ranges)

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "memscan.index", 1
INFO_FILE = "index.json"
FLAT_MAX = 50_000            # below this, exact search costs less than training an IVF
MIN_TRAIN_PER_LIST = 39      # FAISS warns below 39 training points per centroid
TRAIN_PER_LIST = 256         # default sample: FAISS's own cap on points per centroid


@dataclass(frozen=True)
class IndexSettings:
    """What `memscan index` builds (see `memscan index --help`)."""

    split: str = "train"
    layer: int | None = None         # None: the dataset's last layer
    factory: str = "auto"
    metric: str = "l2"
    device: str = "auto"
    train_size: int | None = None    # None: 256 per IVF list, at least 39 per list
    seed: int = 0
    nprobe: int | None = None        # None: 1/16 of the lists, at least 8
    ef_search: int | None = None     # None: 64
    eval_recall: int = 0             # queries for recall against exact (0: none)
    recall_k: int = 10
    shards: int = 1                  # copies of the trained index, each over one range of rows


def auto_factory(count: int) -> tuple[str, str]:
    """FAISS's guidelines: exact while it pays, then IVF with nlist in [4, 16] x sqrt(count).

    nlist is a power of 2 near 8 sqrt(count), and never more than count / 39 so that
    every list gets FAISS's minimum of 39 training points.
    """
    if count < FLAT_MAX:
        return "Flat", f"{count:,} vectors: below {FLAT_MAX:,}, exact search is cheaper than training IVF"
    root, most = math.sqrt(count), count / MIN_TRAIN_PER_LIST
    nlist = int(min(max(2 ** round(math.log2(min(8 * root, most))), 4 * root), 16 * root, most))
    return f"IVF{nlist},Flat", (f"{count:,} vectors: IVF with {nlist} lists, a power of 2 near 8 sqrt(count) "
                                f"within [4, 16] sqrt(count) = [{4 * root:.0f}, {16 * root:.0f}] and at most "
                                f"count / {MIN_TRAIN_PER_LIST} = {most:.0f}")


def _faiss_metric(metric: str) -> int:
    import faiss

    if metric not in exact.METRICS:
        raise InputError(f"--metric must be l2 or ip; got '{metric}'")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _make_index(factory: str, n: int, metric: str) -> Any:
    import faiss

    try:
        return faiss.index_factory(n, factory, _faiss_metric(metric))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(f"--factory '{factory}' is not a FAISS factory string FAISS accepts ({reason})") from None


def _train_sample(dataset: store.ActivationDataset, split: str, layer: int, count: int, size: int,
                  seed: int) -> np.ndarray:
    """A seeded uniform sample of `size` of the `count` vectors, gathered in one streaming pass."""
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))
    sample, seen, filled = np.empty((size, dataset.n), np.float32), 0, 0
    for X, _ in dataset.iter_batches(split=split, layer=layer):
        lo, hi = np.searchsorted(chosen, [seen, seen + len(X)])
        sample[filled:filled + hi - lo] = X[chosen[lo:hi] - seen]
        filled, seen = filled + hi - lo, seen + len(X)
    return sample


def manifest_sha256(data_dir: Path) -> str:
    return files.sha256_of(Path(data_dir) / store.MANIFEST)


def resolve_layer(dataset: store.ActivationDataset, layer: int | None) -> int:
    if layer is None:
        return max(dataset.layers)
    if layer not in dataset.layers:
        raise InputError(f"--layer {layer} is not in dataset '{dataset.directory}' (layers: {dataset.layers})")
    return layer


def _open_shards(makers: list[functools.partial[Shard]], metric: str, device: str,
                 ray_options: Any = None) -> tuple[Shards, exact.Engine]:
    """The shards, made here or each in a Ray actor (`ray_options`: ray_runner.RayOptions), and
    the engine that runs exact searches beside them; `makers` take the device as `device=`."""
    if ray_options is None:
        shards = LocalShards([make(device=device) for make in makers], metric)
        return shards, exact.LocalEngine(exact.choose_backend(device))
    from memscan.engines import ray_runner

    shards = ray_runner.RayShards(makers, metric, device, ray_options)
    search = shards.search_options
    return shards, ray_runner.RayEngine(search, search.worker_device(device))


def build(data_dir: str | Path, out_dir: str | Path, settings: IndexSettings = IndexSettings(),
          overwrite: bool = False, ray_options: Any = None) -> dict[str, Any]:
    """Build, evaluate and save an index over one split and layer of a dataset; returns index.json.

    With `ray_options` (memscan.engines.ray_runner.RayOptions) each shard is filled by a Ray
    actor that reads its own rows and writes its own files; `out_dir` must be on a file
    system every worker sees.
    """
    import faiss

    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()  # workers may run elsewhere
    if (out_dir / INFO_FILE).exists() and not overwrite:
        raise InputError(f"--out '{out_dir}' already holds an index; choose another folder or pass --overwrite")
    if settings.shards < 1:
        raise InputError(f"--shards must be at least 1; got {settings.shards}")
    problems = store.verify(data_dir)
    if problems:
        raise DataError(f"dataset '{data_dir}' fails verification: {problems[0]}")
    dataset = store.ActivationDataset(data_dir)
    layer = resolve_layer(dataset, settings.layer)
    count = dataset.count(settings.split, layer)
    if count == 0:
        raise InputError(f"split '{settings.split}' has no rows at layer {layer} in '{data_dir}' "
                         f"(splits: {', '.join(dataset.manifest['counts']['rows'])})")
    if settings.shards > count:
        raise InputError(f"--shards {settings.shards} is more than the {count:,} vectors of split '{settings.split}'")
    factory, reason = (auto_factory(count) if settings.factory == "auto"
                       else (settings.factory, "given with --factory"))
    index = _make_index(factory, dataset.n, settings.metric)
    lists = nlist(index)
    backend = exact.choose_backend(settings.device)
    on_gpu = backend.name == "faiss-gpu"
    if on_gpu:
        index = faiss.index_cpu_to_gpu(backend.resources, 0, index)

    train_seconds, train_size = 0.0, 0
    if not index.is_trained:
        minimum = MIN_TRAIN_PER_LIST * (lists or 1)
        train_size = min(count, settings.train_size or max(minimum, TRAIN_PER_LIST * (lists or 256)))
        if lists and train_size < minimum:
            hint = "raise --train-size" if count >= minimum else "use fewer lists or --factory Flat"
            raise InputError(f"IVF with {lists:,} lists needs at least {minimum:,} training vectors "
                             f"({MIN_TRAIN_PER_LIST} per list); got {train_size:,} of the split's {count:,}; {hint}")
        t = time.perf_counter()
        sample = _train_sample(dataset, settings.split, layer, count, train_size, settings.seed)
        exact.check_finite(sample, f"split '{settings.split}'")
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise InputError(f"FAISS could not train '{factory}' on {train_size:,} vectors: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
        train_seconds = time.perf_counter() - t

    trained = faiss.serialize_index(faiss.index_gpu_to_cpu(index) if on_gpu else index)
    search = _default_search_params(factory, lists, settings)
    t = time.perf_counter()
    makers = [functools.partial(fill_shard, trained, data_dir, settings.split, layer, rows, search)
              for rows in row_ranges(dataset.row_ids(settings.split, layer), settings.shards)]
    sharded, engine = _open_shards(makers, settings.metric, settings.device, ray_options)
    add_seconds = time.perf_counter() - t

    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "factory": factory, "factory_reason": reason, "metric": settings.metric,
        "n": dataset.n, "ntotal": sharded.ntotal,
        "dataset": {"path": str(data_dir.resolve()), "manifest_sha256": manifest_sha256(data_dir),
                    "model": dataset.manifest["model"]["id"], "layer": layer, "split": settings.split},
        "device": backend.name if on_gpu else "cpu",
        "engine": "local" if ray_options is None else "ray",
        "build": {"settings": asdict(settings), "train_size": train_size, "train_seconds": round(train_seconds, 3),
                  "add_seconds": round(add_seconds, 3), "faiss": faiss.__version__},
        "search": search,
        "recall": None,
    }
    loaded = KnnIndex(sharded, info, dataset, engine)
    if settings.eval_recall:
        info["recall"] = loaded.recall(settings.eval_recall, settings.recall_k, settings.seed)
    (out_dir / INFO_FILE).unlink(missing_ok=True)  # index.json comes last: its presence means complete
    info["shards"] = sharded.save(out_dir)
    remove_stale_files(out_dir, info["shards"])
    info["build"]["total_seconds"] = round(time.perf_counter() - started, 3)
    files.write_json_atomic(out_dir / INFO_FILE, info)
    log.info("indexed %d vectors (%s, %d shard%s) into %s in %.1f s", sharded.ntotal, factory, len(sharded),
             "s" * (len(sharded) > 1), out_dir, info["build"]["total_seconds"])
    return info



def nlist(index: Any) -> int | None:
    """The number of inverted lists of an IVF index, None for any other kind."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def _default_search_params(factory: str, lists: int | None, settings: IndexSettings) -> dict[str, int]:
    params: dict[str, int] = {}
    if lists:
        params["nprobe"] = min(lists, settings.nprobe or max(8, lists // 16))
    if "HNSW" in factory:
        params["efSearch"] = settings.ef_search or 64
    return params


class KnnIndex:
    """A loaded index: search by vectors, self-join, and recall against exact search."""

    def __init__(self, shards: Shards, info: dict[str, Any], dataset: store.ActivationDataset,
                 engine: exact.Engine):
        self.shards, self.info, self.dataset, self.engine = shards, info, dataset, engine
        self.row_ids = shards.row_ids  # every indexed row, in row order
        self.metric = info["metric"]

    @classmethod
    def load(cls, index_dir: str | Path, device: str = "cpu", ray_options: Any = None) -> KnnIndex:
        """Open an index folder; refuses a stale one.

        Shards load here (on the GPU with device auto|gpu where faiss sees one) or, with
        `ray_options` (ray_runner.RayOptions), each in a Ray actor, searched in parallel.
        """
        index_dir = Path(index_dir)
        if not (index_dir / INFO_FILE).exists():
            raise DataError(f"'{index_dir}' is not a memscan index folder: it has no {INFO_FILE}")
        info = json.loads((index_dir / INFO_FILE).read_text())
        if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{index_dir / INFO_FILE} is not a memscan index of format version {FORMAT_VERSION}")
        data_dir = Path(info["dataset"]["path"])
        if manifest_sha256(data_dir) != info["dataset"]["manifest_sha256"]:
            raise DataError(f"dataset '{data_dir}' changed since index '{index_dir}' was built; rebuild the index")
        entries = info.get("shards") or [UNSHARDED]   # indexes written before shards existed list none
        makers = [functools.partial(load_shard, index_dir.resolve(), entry, info["search"]) for entry in entries]
        sharded, engine = _open_shards(makers, info["metric"], device, ray_options)
        return cls(sharded, info, store.ActivationDataset(data_dir), engine)

    @property
    def exact(self) -> bool:
        return self.info["factory"] == "Flat"

    def check_queries(self, dataset: store.ActivationDataset, layer: int | None = None) -> int:
        """The layer to query at; refuses queries from another model, layer or dimension than the index's."""
        built = self.info["dataset"]
        layer = built["layer"] if layer is None else layer
        if dataset.n != self.info["n"]:
            raise InputError(f"queries in '{dataset.directory}' have dimension {dataset.n}; "
                             f"the index holds dimension {self.info['n']}")
        if dataset.manifest["model"]["id"] != built["model"]:
            raise InputError(f"queries in '{dataset.directory}' come from model '{dataset.manifest['model']['id']}'; "
                             f"the index was built from '{built['model']}'")
        if layer != built["layer"] or layer not in dataset.layers:
            raise InputError(f"the index holds layer {built['layer']}; the queries ask for layer {layer} "
                             f"(dataset '{dataset.directory}' has layers {dataset.layers})")
        return layer

    def search_dataset(self, data_dir: str | Path, k: int, split: str = "test",
                       batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kNN of one split of another dataset: (query row ids, D, I), checked for compatibility."""
        dataset = store.ActivationDataset(data_dir)
        layer = self.check_queries(dataset)
        if dataset.count(split, layer) == 0:
            raise InputError(f"split '{split}' of '{data_dir}' has no rows to query")
        parts = [(meta["row_id"], *self.search(X, k))
                 for X, meta in dataset.iter_batches(split=split, layer=layer, batch_rows=batch_rows)]
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def exact_self_join(self, k: int, block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact self-join of the indexed patterns, blockwise over the dataset (no index used)."""
        self.check_k(k, exclude_self=True)
        blocks = dataset_blocks(self.dataset, self.info["dataset"]["split"], self.info["dataset"]["layer"], block_rows)
        return self.engine.self_join(blocks, k, metric=self.metric)

    def exact_search_dataset(self, data_dir: str | Path, k: int, split: str = "test",
                             block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact kNN of one split of another dataset against the indexed patterns, blockwise."""
        self.check_k(k)
        queries = store.ActivationDataset(data_dir)
        layer = self.check_queries(queries)
        if queries.count(split, layer) == 0:
            raise InputError(f"split '{split}' of '{data_dir}' has no rows to query")
        database = dataset_blocks(self.dataset, self.info["dataset"]["split"], layer, block_rows)
        return self.engine.knn(dataset_blocks(queries, split, layer, block_rows)(), database, k, metric=self.metric)

    def set_search_params(self, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """nprobe (IVF) and efSearch (HNSW) on every shard; above faiss-gpu's 2048 the CPU copies search."""
        for name, value in (("nprobe", nprobe), ("efSearch", efSearch)):
            if value is not None:
                if value < 1:
                    raise InputError(f"--{name.lower()} must be at least 1; got {value}")
                self.shards.set_parameter(name, value)
                self.info["search"][name] = value

    def check_k(self, k: int, exclude_self: bool = False) -> None:
        available = self.shards.ntotal - int(exclude_self)
        if not 1 <= k <= available:
            raise InputError(f"--k must be between 1 and the {available:,} indexed patterns"
                             f"{' other than the query itself' if exclude_self else ''}; got {k:,}")

    def search(self, X: np.ndarray, k: int, query_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) exact float32 scores, I (nq, k) row ids); with query_ids, each query's own row is excluded."""
        self.check_k(k, query_ids is not None)
        if X.shape[1] != self.info["n"]:
            raise InputError(f"queries have dimension {X.shape[1]}; the index holds dimension {self.info['n']}")
        exact.check_finite(X, "the queries")
        wanted = k + int(query_ids is not None)
        _, ids = self.shards.search(X, wanted)
        return self._finish(X, ids, k, query_ids)

    def self_join(self, k: int, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every indexed pattern its k nearest OTHER patterns: (row ids, D, I).

        IVF indexes on the CPU group the queries by inverted list (faiss.contrib.big_batch_search),
        so each list's codes are scanned once per query batch instead of once per query.
        """
        self.check_k(k, exclude_self=True)
        split, layer = self.info["dataset"]["split"], self.info["dataset"]["layer"]
        parts = []
        for X, meta in self.dataset.iter_batches(split=split, layer=layer, batch_rows=batch_rows):
            _, ids = self.shards.search(X, k + 1, grouped=True)
            parts.append((meta["row_id"], *self._finish(X, ids, k, meta["row_id"])))
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def _finish(self, X: np.ndarray, ids: np.ndarray, k: int, query_ids: np.ndarray | None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Drop each query's own row, keep k, recompute scores exactly, re-sort."""
        if query_ids is not None:
            ids = np.where(ids == query_ids[:, None], -1, ids)
        order = np.argsort(ids < 0, axis=1, kind="stable")[:, :k]            # valid ids first, rank kept
        ids = np.take_along_axis(ids, order, axis=1)
        valid = ids >= 0
        vectors = self.dataset.take(np.where(valid, ids, self.row_ids[0]).ravel()).reshape(*ids.shape, -1)
        D = exact.exact_scores(X, vectors.reshape(-1, X.shape[1]),
                               np.arange(ids.size).reshape(ids.shape), self.metric)
        D = np.where(valid, D, np.inf if self.metric == "l2" else -np.inf)
        resort = np.argsort(-D if self.metric == "ip" else D, axis=1, kind="stable")
        return (np.take_along_axis(D, resort, axis=1).astype(np.float32),
                np.take_along_axis(np.where(valid, ids, -1), resort, axis=1))

    def recall(self, queries: int, k: int, seed: int = 0) -> dict[str, Any]:
        """1-recall@1 and k-recall@k of the self-join on a seeded sample of indexed patterns."""
        k = min(k, self.shards.ntotal - 1)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(self.row_ids), size=min(queries, len(self.row_ids)), replace=False))
        query_ids = self.row_ids[pick]
        X = self.dataset.take(query_ids)
        _, approx = self.search(X, k, query_ids)
        split, layer = self.info["dataset"]["split"], self.info["dataset"]["layer"]
        database = dataset_blocks(self.dataset, split, layer)
        _, _, truth = self.engine.knn(iter([(query_ids, X)]), database, k, metric=self.metric, exclude_self=True)
        at_k = np.mean([len(np.intersect1d(a, t)) / k for a, t in zip(approx, truth)])
        return {"queries": len(query_ids), "k": k, "recall_1_at_1": float(np.mean(approx[:, 0] == truth[:, 0])),
                "recall_k_at_k": float(at_k), "search": dict(self.info["search"])}


def dataset_blocks(dataset: store.ActivationDataset, split: str, layer: int,
                   block_rows: int = 65536) -> Any:
    """A dataset's split and layer as a re-startable iterator of (row ids, X) blocks."""
    def blocks():
        for X, meta in dataset.iter_batches(split=split, layer=layer, batch_rows=block_rows):
            yield meta["row_id"], X
    return blocks
