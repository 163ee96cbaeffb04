"""Index shards: copies of one trained index, each filled with one range of a dataset's rows.

A search asks every shard for its k best and merges the lists (faiss.ResultHeap). For
Flat and IVF indexes, whose shards share the trained quantizer, that is the answer of one
index holding every row; graph indexes (HNSW) build one graph per shard, so their recall
is their own (index.json reports it). Shards live in this process (`LocalShards`) or in
Ray actors (`memscan.engines.ray_knn.RayShards`); both work through `Shards`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import faiss
import numpy as np
from faiss.contrib.big_batch_search import big_batch_search
from tqdm.auto import tqdm

import memscan.store as store
from memscan import files
from memscan.errors import DataError
from memscan.knn import cells, exact, scan, tuning

log = logging.getLogger(__name__)

ADD_BATCH_ROWS = 65536
QUANTIZER_EF_SEARCH = 64   # an HNSW coarse quantizer's search depth while vectors are added (`deepen_graph_quantizer`)


def row_ranges(row_ids: np.ndarray, count: int) -> list[tuple[int, int]]:
    """`count` contiguous ranges [start, stop) of row ids, each holding a near-equal share of
    the ascending `row_ids` (none empty when count <= len(row_ids)): one per shard."""
    cuts = row_ids[np.linspace(0, len(row_ids), count + 1).round().astype(np.int64)[1:-1]]
    bounds = [0, *cuts.tolist(), int(row_ids[-1]) + 1]
    return list(zip(bounds[:-1], bounds[1:]))


_BUILD_ID = r"(\.[0-9a-f]{8})?"
# Every name an index folder's files can have (a build id keeps a replacement's names apart
# from the index it replaces), with memscan's temporaries: what memscan may write there.
OWN_FILE = re.compile(rf"(index{_BUILD_ID}\.faiss|row_ids{_BUILD_ID}\.npy|shard-\d{{3,}}{_BUILD_ID}\.(faiss|row_ids\.npy))"
                      rf"({re.escape(files.TMP_SUFFIX)})?")


def file_names(shard: int, count: int, build_id: str | None = None) -> tuple[str, str]:
    """(index file, row-id file) of shard `shard` of `count`; an unsharded index keeps plain names.

    `build_id` (8 hex digits) goes into the names of an index built beside another, so the
    two never share a file and a kill at any moment leaves one of them whole.
    """
    tag = f".{build_id}" if build_id else ""
    if count == 1:
        return f"index{tag}.faiss", f"row_ids{tag}.npy"
    return f"shard-{shard:03d}{tag}.faiss", f"shard-{shard:03d}{tag}.row_ids.npy"


def entry_names(entry: dict[str, Any]) -> list[str]:
    """The names of the files one shard entry of index.json lists."""
    return [entry["index"]["name"], entry["row_ids"]["name"]]


def nlist(index: Any) -> int | None:
    """The number of inverted lists of an IVF index, None for any other kind."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def grouped_search(ivf: Any, X: np.ndarray, k: int, lists: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """(D, local ids) of a CPU IVF's search with each inverted list scanned once for all of X
    (faiss.contrib.big_batch_search; `lists` (nq, p) int32: the lists to probe, else the
    quantizer's nprobe nearest). None for a batch too small for its bucket sort, which needs
    more (query, list) pairs than lists + 1: the caller searches it plainly.
    """
    if len(X) * (ivf.nprobe if lists is None else lists.shape[1]) <= ivf.nlist + 1:
        return None
    # verbose=0 logs nothing (1 logs its memory use at INFO on the root logger); its
    # per-list progress still goes to print, so stdout is caught
    with contextlib.redirect_stdout(io.StringIO()):
        return big_batch_search(ivf, X, k, verbose=0, q_assign=lists)


class Shard:
    """One FAISS index and its row-id map (FAISS id i is dataset row `row_ids[i]`).

    `index` is a CPU index (what is saved); `gpu_index`, when given, is the copy searched
    while k and nprobe fit faiss-gpu's limit of 2048.
    """

    def __init__(self, index: Any, row_ids: np.ndarray, params: dict[str, int], gpu_index: Any = None):
        self.index, self.row_ids, self.gpu_index = index, row_ids, gpu_index
        self.params: dict[str, int] = {}
        for name, value in params.items():
            self.set_parameter(name, value)

    def set_parameter(self, name: str, value: int) -> None:
        """nprobe (IVF) or efSearch (HNSW); above 2048 only the CPU copy takes it, and searches use that."""
        faiss.ParameterSpace().set_index_parameter(self.index, name, value)
        if self.gpu_index is not None and value <= exact.GPU_MAX_K:
            faiss.GpuParameterSpace().set_index_parameter(self.gpu_index, name, value)
        self.params[name] = value

    def search(self, X: np.ndarray, k: int, grouped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) FAISS scores, I (nq, k) row ids, -1 where none: only where the shard holds fewer than k).

        `grouped` (for self-joins: many queries) scans each inverted list of a CPU IVF index
        once per batch of queries (faiss.contrib.big_batch_search) instead of once per query.
        """
        D, ids = self._search(X, k, grouped)
        return self._fill(X, k, D, ids)

    def _fill(self, X: np.ndarray, k: int, D: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries whose probed IVF lists (or graph walk) held fewer than k vectors, as a tuned nprobe
        of 1 or 2 can leave a query near a small cluster, searched again at twice the nprobe /
        efSearch until they have k (FAISS caps nprobe at nlist: a full scan); the setting is kept."""
        short = (ids >= 0).sum(axis=1) < min(k, len(self.row_ids))
        name = next((name for name in ("nprobe", "efSearch") if name in self.params), None)
        if name is None or not short.any():
            return D, ids
        kept = value = self.params[name]
        limit = len(self.row_ids) if name == "nprobe" else max(k, tuning.EF_SEARCH_MAX)
        D, ids, count = np.array(D), np.array(ids), int(short.sum())
        while short.any() and value < limit:
            value = min(2 * value, limit)
            self.set_parameter(name, value)
            D[short], ids[short] = self._search(X[short], k, grouped=False)
            short = (ids >= 0).sum(axis=1) < min(k, len(self.row_ids))
        self.set_parameter(name, kept)
        log.debug("searched %d queries again, %s up to %d, for %d neighbours each", count, name, value, k)
        return D, ids

    def row_ids_of(self, local: np.ndarray) -> np.ndarray:
        """Dataset row ids of FAISS ids `local` (any shape), -1 where FAISS found none."""
        return np.where(local >= 0, self.row_ids[np.maximum(local, 0)], -1)

    def _search(self, X: np.ndarray, k: int, grouped: bool) -> tuple[np.ndarray, np.ndarray]:
        on_gpu = self.gpu_index is not None and max(k, self.params.get("nprobe", 0)) <= exact.GPU_MAX_K
        ivf = faiss.downcast_index(self.index)
        found = grouped_search(ivf, X, k) if grouped and not on_gpu and isinstance(
            ivf, (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)) else None
        # else Flat, HNSW, an IVF behind a transform, the GPU copy or a small batch: the plain search
        D, local = found if found is not None else (self.gpu_index if on_gpu else self.index).search(X, k)
        return D, self.row_ids_of(local)

    def search_with_products(self, X: np.ndarray, k: int, products: int) -> scan.BothScans | None:
        """The k nearest of each query (as `search`) and the `products` largest inner products over the same
        probed lists, both from one product per list (`scan.scan_both`), ids as row ids; None unless a CPU
        IVF-Flat of metric L2 (whose stored vectors are the patterns)."""
        ivf = self._scannable()
        return None if ivf is None else self._scanned(ivf, X, ivf.quantizer.search(X, ivf.nprobe)[1], k, products)

    def self_join_scans(self, k: int, products: int, block_rows: int,
                        ) -> Iterator[tuple[np.ndarray, np.ndarray, scan.BothScans]] | None:
        """Every stored vector searched as `search_with_products` would, whole inverted lists at a time
        (`scan.own_list_blocks`: at nprobe 1 each vector probes the list it was added to, so no coarse search
        runs and each list is read once): (row ids, vectors, found) per block, none of them read from the
        dataset; None unless a CPU IVF-Flat of metric L2. Neighbours are this shard's only."""
        ivf = self._scannable()
        if ivf is None:
            return None
        return ((self.row_ids_of(local), X, self._scanned(ivf, X, lists, k, products))
                for local, X, lists in scan.own_list_blocks(ivf, block_rows))

    def _scannable(self) -> Any:
        """The shard's IVF-Flat of metric L2 held on the CPU (its stored vectors are the patterns), else None."""
        ivf = faiss.downcast_index(self.index)
        if self.gpu_index is not None or type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_L2:
            return None
        return ivf

    def _scanned(self, ivf: Any, X: np.ndarray, lists: np.ndarray, k: int, products: int) -> scan.BothScans:
        """`scan.scan_both` over `lists`, queries left short by small lists searched wider (`_fill`), as row ids."""
        found = scan.scan_both(X, lists, k, products, scan.list_vectors(ivf))
        D, ids = self._fill(X, k, found.D, self.row_ids_of(found.I))
        return scan.BothScans(D, ids, found.P, self.row_ids_of(found.J))

    def lists(self) -> int | None:
        return nlist(self.index)

    def has_exact_codes(self) -> bool:
        """Whether the index stores every vector as added (Flat codes), so `reconstruct` gives it back exactly."""
        return isinstance(faiss.downcast_index(self.index), (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat))

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors (m, n) float32 of `rows` (row ids this shard holds), from the index's codes.

        Reading them here, not from the dataset's shards, keeps each lookup O(m): a block of
        neighbours is spread over the whole dataset. An IVF index gets a direct map (id ->
        list, offset), 8 bytes a vector, which `save` leaves out of the file.
        """
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
            index.make_direct_map()
        local = np.searchsorted(self.row_ids, rows)
        return index.reconstruct_batch(local.astype(np.int64)) if len(local) else np.empty((0, index.d), np.float32)

    def search_within(self, X: np.ndarray, k: int, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(D, I row ids, lists scanned) of the exact k nearest of queries whose k-th nearest lies within
        radius[i] (`cells.search_within`); None where the index is not a CPU IVF-Flat of metric L2, or where
        the lists would prune too little to beat an exact search."""
        ivf = faiss.downcast_index(self.index)
        if not isinstance(ivf, faiss.IndexIVFFlat) or ivf.metric_type != faiss.METRIC_L2 or not flat_quantizer(ivf):
            return None   # the cells' bound needs every vector in its nearest centroid's list: a flat quantizer
        found = cells.search_within(ivf, np.ascontiguousarray(X, np.float32), k, radius)
        if found is None:
            return None
        D, local, scanned = found
        return D, self.row_ids_of(local), scanned

    def save(self, directory: str | os.PathLike[str], index_file: str, ids_file: str) -> dict[str, Any]:
        """Write the CPU index and the row-id map, each fsynced and renamed into place; returns the
        shard's entry for index.json: both files' names, sizes and sha256, and the vector count."""
        directory = Path(directory)
        index_path, ids_path = directory / index_file, directory / ids_file
        ivf = faiss.downcast_index(self.index)
        if isinstance(ivf, faiss.IndexIVF):   # the file is the same whether or not `reconstruct` ran
            ivf.make_direct_map(False)
        faiss.write_index(self.index, str(files.new_tmp(index_path)))
        files.commit_file(files.tmp_path(index_path), index_path)
        with files.new_tmp(ids_path).open("wb") as f:
            np.save(f, self.row_ids, allow_pickle=False)
        files.commit_file(files.tmp_path(ids_path), ids_path)
        return {"index": files.file_entry(index_path), "row_ids": files.file_entry(ids_path),
                "ntotal": int(self.index.ntotal)}


def _gpu(device: str) -> bool:
    return exact.choose_backend(device).name == "faiss-gpu"


def flat_quantizer(ivf: Any) -> bool:
    """Whether an IVF's coarse quantizer scans every centroid, so each vector sits in its nearest centroid's list."""
    return isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat)


def deepen_graph_quantizer(index: Any) -> None:
    """An IVF's HNSW coarse quantizer searched QUANTIZER_EF_SEARCH deep (FAISS's 16 sends about 1 vector in 8 to
    a list other than its nearest centroid's; benchmarks/README.md), for the vectors added and the searches after."""
    ivf = faiss.downcast_index(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if isinstance(ivf, faiss.IndexIVF) else None
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, QUANTIZER_EF_SEARCH)


def fill_shard(trained: np.ndarray, data_dir: str | os.PathLike[str], split: str, layer: int, rows: tuple[int, int],
               params: dict[str, int], count: int | None = None, device: str = "auto", site: str | None = None,
               ) -> Shard:
    """A copy of the trained index (faiss.serialize_index) holding the split's vectors at `site` and `layer` with row
    ids in `rows`.

    Runs wherever the shard will live (a Ray actor reads its own rows), on the GPU when
    faiss sees one; `device` as in `exact.choose_backend`. `count` (the rows it will hold)
    sizes the progress bar.
    """
    index = faiss.deserialize_index(trained)
    deepen_graph_quantizer(index)
    gpu_index = faiss.index_cpu_to_gpu(exact.gpu_resources(), 0, index) if _gpu(device) else None
    # One add on a GPU flat index: it reallocates the whole index on every add.
    flat_on_gpu = gpu_index is not None and isinstance(index, faiss.IndexFlat)
    batch_rows = max(1, rows[1] - rows[0]) if flat_on_gpu else ADD_BATCH_ROWS
    row_ids = []
    batches = store.ActivationDataset(data_dir, site).iter_batches(split=split, layer=layer, batch_rows=batch_rows, rows=rows)
    with tqdm(total=count, desc="add", unit="vec", unit_scale=True, disable=None, leave=False) as progress:
        for X, meta in batches:
            exact.check_finite(X, f"split '{split}'")
            exact.check_scale(X, f"split '{split}' (rows {meta['row_id'][0]}-{meta['row_id'][-1]})")
            (gpu_index if gpu_index is not None else index).add(X)
            row_ids.append(meta["row_id"])
            progress.update(len(X))
    if gpu_index is not None:
        index = faiss.index_gpu_to_cpu(gpu_index)
    log.debug("filled a shard with rows %d-%d: %d vectors", rows[0], rows[1] - 1, index.ntotal)
    return Shard(index, np.concatenate(row_ids) if row_ids else np.empty(0, np.int64), params, gpu_index)


def _read_index(path: Path) -> Any:
    """A FAISS index file, or one line saying FAISS cannot read it."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path} is not an index file FAISS can read ({exact.faiss_reason(exc)}); "
                        "rebuild the index") from None


def _read_row_ids(path: Path) -> np.ndarray:
    """A row-id map: a plain .npy of int64 row ids (nothing is unpickled), or one line saying why not."""
    try:
        row_ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a row-id file memscan wrote ({files.first_line(exc)}); "
                        "rebuild the index") from None
    if row_ids.dtype != np.int64 or row_ids.ndim != 1:
        raise DataError(f"{path} holds {row_ids.dtype} of shape {row_ids.shape}; a row-id file holds int64 (m,); "
                        "rebuild the index")
    return row_ids


def load_shard(directory: str | os.PathLike[str], entry: dict[str, Any], params: dict[str, int], n: int,
               metric: str, device: str = "cpu") -> Shard:
    """One saved shard (an entry of index.json's `shards`), its files checked against their entries
    and its contents against the index's dimension `n` and `metric`; on the GPU with device
    auto|gpu where faiss sees one."""
    directory = Path(directory)
    index_path = files.check_file(directory, entry["index"], "index file")
    ids_path = files.check_file(directory, entry["row_ids"], "row-id file")
    index, row_ids = _read_index(index_path), _read_row_ids(ids_path)
    if index.d != n or index.metric_type != exact.faiss_metric_of(metric):
        held = next((name for name in exact.METRICS if exact.faiss_metric_of(name) == index.metric_type),
                    f"FAISS metric {index.metric_type}")
        raise DataError(f"{index_path} holds an index of dimension {index.d} and metric {held}; "
                        f"index.json says dimension {n} and metric {metric}; rebuild the index")
    if not len(row_ids) == index.ntotal == entry["ntotal"]:
        raise DataError(f"{ids_path} maps {len(row_ids):,} ids; its index holds {index.ntotal:,} and index.json "
                        f"says {entry['ntotal']:,}; rebuild the index")
    gpu_index = faiss.index_cpu_to_gpu(exact.gpu_resources(), 0, index) if _gpu(device) else None
    return Shard(index, row_ids, params, gpu_index)


class Shards:
    """Shards searched as one: every shard's k best, merged into the k best overall.

    Subclasses say how a method runs on every shard (`_map`); `row_ids`, the shards'
    maps concatenated, lists every indexed row in row order.
    """

    def __init__(self, row_ids: Sequence[np.ndarray], metric: str):
        self.sizes = [len(ids) for ids in row_ids]
        self.row_ids = np.concatenate(row_ids)
        self.metric = metric

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def ntotal(self) -> int:
        return len(self.row_ids)

    def _map(self, method: str, arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Shard i's `method(*arguments[i])`, for every shard, in shard order."""
        raise NotImplementedError

    def _each(self, method: str, *args: Any) -> list[Any]:
        return self._map(method, [args] * len(self))

    def search(self, X: np.ndarray, k: int, grouped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) FAISS scores, I (nq, k) row ids): the best k over every shard, -1 where none."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        parts = self._each("search", X, k, grouped)
        return parts[0] if len(parts) == 1 else exact.merge(parts, k, self.metric, len(X))

    def search_with_products(self, X: np.ndarray, k: int, products: int) -> scan.BothScans | None:
        """Every shard's `Shard.search_with_products`, merged: the best k nearest and `products` largest inner
        products over the probed lists of every shard; None unless every shard can."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        parts = self._each("search_with_products", X, k, products)
        if any(part is None for part in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        D, I = exact.merge([(part.D, part.I) for part in parts], k, self.metric, len(X))
        P, J = exact.merge([(part.P, part.J) for part in parts], products, "ip", len(X))
        return scan.BothScans(D, I, P, J)

    def set_parameter(self, name: str, value: int) -> None:
        self._each("set_parameter", name, value)

    def local_shard(self) -> Shard | None:
        """The only shard, when there is one and it is held in this process; else None."""
        return None

    @functools.cached_property
    def nlist(self) -> int | None:
        """The inverted lists of every shard (copies of one trained index); None unless IVF."""
        return self._each("lists")[0]

    @functools.cached_property
    def exact_codes(self) -> bool:
        """Whether every shard stores its vectors as added, so `reconstruct` is exact."""
        return all(self._each("has_exact_codes"))

    def search_within(self, X: np.ndarray, k: int, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Every shard's `Shard.search_within`, merged: the exact k nearest of queries whose k-th nearest lies
        within radius[i], with the lists scanned; None unless every shard is an IVF-Flat (L2)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        parts = self._each("search_within", X, k, radius)
        if any(part is None for part in parts):
            return None
        D, I = exact.merge([(D, I) for D, I, _ in parts], k, self.metric, len(X))
        return D, I, sum(scanned for _, _, scanned in parts)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """Vectors (m, n) float32 of indexed `rows`, in the order given, each from the shard that holds it."""
        rows = np.asarray(rows, np.int64)
        if len(self) == 1:
            return self._each("reconstruct", rows)[0]
        shard_of = np.searchsorted(np.cumsum(self.sizes), np.searchsorted(self.row_ids, rows), side="right")
        parts = self._map("reconstruct", [(rows[shard_of == i],) for i in range(len(self))])
        out = np.empty((len(rows), parts[0].shape[1]), np.float32)
        for i, part in enumerate(parts):
            out[shard_of == i] = part
        return out

    def save(self, directory: str | os.PathLike[str], build_id: str | None = None) -> list[dict[str, Any]]:
        """Every shard's files in `directory` (shared by all workers), named with `build_id` (see
        `file_names`); returns index.json's `shards`."""
        return self._map("save", [(str(directory), *file_names(i, len(self), build_id)) for i in range(len(self))])

    def views(self, make: Callable[[Shard], Shard | None], metric: str) -> Shards | None:
        """A view of every shard made where that shard is held (`make(shard)`: e.g. its inverted lists searched
        for inner products, no copy of them), searched as one with `metric`; None where `make` declines any
        shard, or where these shards' holder makes no views (the caller then does without). `make` must pickle
        (a module-level function or a partial of one): it may travel to an actor."""
        return None

    def _row_id_parts(self) -> list[np.ndarray]:
        """Each shard's row-id map, split back out of `row_ids`."""
        return np.split(self.row_ids, np.cumsum(self.sizes)[:-1])


class LocalShards(Shards):
    """Shards held in this process, searched one after another."""

    def __init__(self, members: Sequence[Shard], metric: str):
        super().__init__([shard.row_ids for shard in members], metric)
        self.members = list(members)

    def _map(self, method: str, arguments: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [getattr(shard, method)(*args) for shard, args in zip(self.members, arguments)]

    def local_shard(self) -> Shard | None:
        return self.members[0] if len(self.members) == 1 else None

    def views(self, make: Callable[[Shard], Shard | None], metric: str) -> Shards | None:
        """Every shard's view, made here; None where `make` declines any."""
        made = [make(shard) for shard in self.members]
        return None if any(view is None for view in made) else LocalShards(made, metric)


T = TypeVar("T")


class Engine(Protocol):
    """Where nearest-neighbour work runs: who holds the shards and runs the exact searches. The caller builds
    one at the edge and passes it in (memscan.engines.knn: this process or Ray); knn never imports engines."""

    name: ClassVar[str]   # recorded in index.json

    def open_shards(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str,
                    ) -> tuple[Shards, Engine]:
        """The shards `makers` make (each called with `device=`) and the engine searching beside them."""
        ...

    def knn(self, query_blocks: Iterable[exact.Block], database_blocks: Callable[[], Iterable[exact.Block]], k: int,
            *, metric: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query ids (nq,), D (nq, k), I (nq, k)) exactly as `exact.knn`."""
        ...

    def self_join(self, blocks: Callable[[], Iterable[exact.Block]], k: int, *, metric: str = "l2",
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every pattern its k nearest OTHER patterns: (row ids, D, I)."""
        ...

    def knn_each(self, requests: Sequence[exact.Request], database_blocks: Callable[[], Iterable[exact.Block]], *,
                 block_rows: int = 65536) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every request's (D, I) exactly as `exact.knn_each` gives them, from one pass over the database."""
        ...

    def map_blocks(self, function: Callable[..., T], blocks: Callable[[], Iterable[exact.Block]],
                   *args: Any) -> Iterator[T]:
        """`function(block, *args)` for every block, in block order."""
        ...


@dataclass(frozen=True)
class InProcess:
    """The `Engine` knn opens an index with when its caller passes none: shards held in this process, exact
    searches with `backend` (None: faiss on the CPU), as memscan.engines.knn.LocalEngine does."""

    backend: exact.Backend | None = None
    name: ClassVar[str] = "local"

    def open_shards(self, makers: Sequence[Callable[..., Shard]], metric: str, device: str,
                    ) -> tuple[Shards, Engine]:
        """The shards made here, one after another; exact searches by a copy of this engine with `choose_backend(device)`."""
        return LocalShards([make(device=device) for make in makers], metric), replace(self, backend=exact.choose_backend(device))

    def knn(self, query_blocks: Iterable[exact.Block], database_blocks: Callable[[], Iterable[exact.Block]], k: int,
            *, metric: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`exact.knn` with this engine's backend."""
        return exact.knn(query_blocks, database_blocks, k, metric=metric, exclude_self=exclude_self,
                         backend=self.backend)

    def knn_each(self, requests: Sequence[exact.Request], database_blocks: Callable[[], Iterable[exact.Block]], *,
                 block_rows: int = 65536) -> list[tuple[np.ndarray, np.ndarray]]:
        """`exact.knn_each` with this engine's backend."""
        return exact.knn_each(requests, database_blocks, block_rows=block_rows, backend=self.backend)

    def self_join(self, blocks: Callable[[], Iterable[exact.Block]], k: int, *, metric: str = "l2",
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every pattern its k nearest OTHER patterns: (row ids, D, I)."""
        return self.knn(blocks(), blocks, k, metric=metric, exclude_self=True)

    def map_blocks(self, function: Callable[..., T], blocks: Callable[[], Iterable[exact.Block]],
                   *args: Any) -> Iterator[T]:
        """`function(block, *args)` for every block, in block order."""
        return (function(block, *args) for block in blocks())
