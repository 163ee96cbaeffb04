"""Exact self-join against its floor and scikit-learn; approximate recall against speed.

Data: clustered synthetic vectors (1,000 clusters, noise half the centre spread), N x n.
Exact: memscan's blockwise self-join (faiss CPU backend, and torch's bf16 product with
exact re-ranking) against the floor 2 N^2 n flops at the machine's best measured fp32
matmul rate, and against scikit-learn's brute-force NearestNeighbors on the same data
and answers. Approximate: recall@1 and queries/s for IVF nprobe and HNSW efSearch
settings, and hnswlib at matched parameters.

With --device gpu the exact self-join runs on every GPU backend there is (faiss-gpu, torch
on CUDA in float32 and bfloat16), each against the floor at its own device's measured peak
for its input type, and on faiss-cpu for the first --cpu-queries patterns (the same work
per query); the approximate part adds the IVF index on faiss-gpu and exact GPU search.

    python benchmarks/bench_knn.py [--n-vectors 100000] [--dim 768] [--skip-sklearn]
    python benchmarks/bench_knn.py --device gpu --n-vectors 200000 --dim 1024 --block-rows 100000 \
        --cpu-queries 20000 --skip-sklearn --skip-hnsw
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np
import torch

from memscan.knn import exact


def clustered(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(1000, dim)).astype(np.float32)
    return centers[rng.integers(0, 1000, count)] + 0.5 * rng.normal(size=(count, dim)).astype(np.float32)


def fp32_matmul_rate(trials: int = 5) -> float:
    """Best fp32 GEMM rate (FLOP/s) of numpy's BLAS and torch at a 4096-square product."""
    a = np.random.default_rng(0).normal(size=(4096, 4096)).astype(np.float32)
    best = 0.0
    for multiply in (np.matmul, lambda x, y: torch.mm(torch.from_numpy(x), torch.from_numpy(y))):
        multiply(a, a)
        for _ in range(trials):
            start = time.perf_counter()
            multiply(a, a)
            best = max(best, 2 * 4096**3 / (time.perf_counter() - start))
    return best


def cuda_matmul_rate(dtype: torch.dtype, size: int = 8192, repeats: int = 10, trials: int = 5) -> float:
    """Best GEMM rate (FLOP/s) of torch on the GPU at a `size`-square product of `dtype`."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    a @ a
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def recall_k(I: np.ndarray, truth: np.ndarray) -> float:
    """k-recall@k: the mean share of each row's true k ids that `I` holds."""
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(I, truth)]))


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def exact_section(X: np.ndarray, k: int, block_rows: int, skip_sklearn: bool) -> dict:
    count, dim = X.shape
    ids = np.arange(count, dtype=np.int64)
    rate = fp32_matmul_rate()
    floor = 2 * count**2 * dim / rate
    (_, D, I), seconds = timed(exact.self_join, exact.array_blocks(ids, X, block_rows), k)
    out = {"n_vectors": count, "dim": dim, "k": k, "block_rows": block_rows, "fp32_gflops": round(rate / 1e9, 1),
           "floor_s": round(floor, 1), "memscan_faiss_cpu_s": round(seconds, 1),
           "memscan_over_floor": round(seconds / floor, 2)}
    print(f"exact: {out}", file=sys.stderr)
    (_, D16, I16), seconds16 = timed(exact.self_join, exact.array_blocks(ids, X, block_rows), k,
                                      backend=exact.TorchBackend("cpu", "bfloat16"))
    out["memscan_torch_bf16_s"] = round(seconds16, 1)
    out["torch_bf16_recall_at_1"] = float((I16[:, 0] == I[:, 0]).mean())
    out["torch_bf16_recall_k_at_k"] = recall_k(I16, I)
    print(f"exact: {out}", file=sys.stderr)
    if not skip_sklearn:
        from sklearn.neighbors import NearestNeighbors

        def sklearn_join():
            return NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X).kneighbors(X)

        (dist, ind), seconds_sk = timed(sklearn_join)
        # drop each point itself (or, for exact duplicates, one of its zero-distance copies)
        own = ind == ids[:, None]
        keep = np.where(own.any(1)[:, None], ~own, np.arange(k + 1) < k)
        sk_ids = ind[keep].reshape(count, k)
        out["sklearn_brute_s"] = round(seconds_sk, 1)
        out["sklearn_over_memscan"] = round(seconds_sk / seconds, 2)
        out["sklearn_same_nearest"] = float((sk_ids[:, 0] == I[:, 0]).mean())
    return out


@functools.cache
def cuda_peaks() -> dict[str, float]:
    """Measured float32 and bfloat16 GEMM rates of the GPU (FLOP/s); empty where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        return {}
    return {dtype: cuda_matmul_rate(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}


def gpu_backends() -> tuple[list[tuple[exact.Backend, float | None]], list[str]]:
    """The GPU backends there are, each with the measured peak (FLOP/s) of its input type, and those missing, why.

    faiss-gpu multiplies in float32; its peak is torch's float32 rate (None without CUDA torch).
    """
    import faiss

    peaks = cuda_peaks()
    backends: list[tuple[exact.Backend, float | None]] = []
    missing = []
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        backends.append((exact.FaissBackend(gpu=True), peaks.get("float32")))
    else:
        missing.append("faiss-gpu: faiss sees no GPU")
    if peaks:
        backends += [(exact.TorchBackend("cuda", dtype), peak) for dtype, peak in peaks.items()]
    else:
        missing.append("torch-cuda: torch sees no CUDA device")
    return backends, missing


def gpu_exact_section(X: np.ndarray, k: int, block_rows: int, cpu_queries: int) -> dict:
    """The exact self-join on every GPU backend, and on faiss-cpu for the first `cpu_queries` patterns.

    Every backend searches its queries against all N patterns, so queries/s compare directly;
    the floor is 2 q N n flops at the backend's measured peak. Each backend's neighbours are
    compared with the first backend's (exact scores: only exact ties may differ).
    """
    count, dim = X.shape
    ids = np.arange(count, dtype=np.int64)
    backends, missing = gpu_backends()
    backends = [*backends, (exact.FaissBackend(), fp32_matmul_rate())]
    out: dict = {"n_vectors": count, "dim": dim, "k": k, "block_rows": block_rows, "missing": missing, "backends": []}
    truth = None
    for backend, peak in backends:
        queries = min(cpu_queries, count) if backend.name == "faiss-cpu" else count
        (_, _, I), seconds = timed(exact.knn, exact.array_blocks(ids[:queries], X[:queries], block_rows)(),
                                   exact.array_blocks(ids, X, block_rows), k, exclude_self=True, backend=backend)
        row = {"backend": backend.name, "queries": queries, "seconds": round(seconds, 2),
               "queries_per_s": round(queries / seconds)}
        if peak:
            floor = 2 * queries * count * dim / peak
            row.update(peak_gflops=round(peak / 1e9, 1), floor_s=round(floor, 3), over_floor=round(seconds / floor, 1))
        if truth is None:
            truth = I
        else:
            row.update(recall_at_1=float((I[:, 0] == truth[:queries, 0]).mean()),
                       recall_k_at_k=recall_k(I, truth[:queries]))
        out["backends"].append(row)
        print(f"exact: {row}", file=sys.stderr)
    return out


def approximate_section(X: np.ndarray, queries: np.ndarray, k: int, nlist: int = 2048, gpu: bool = False,
                        skip_hnsw: bool = False) -> dict:
    """Recall against exact and queries/s: IVF (on faiss-gpu too, with `gpu`), HNSW and hnswlib.

    With `gpu`, exact search on the GPU backends joins the table, and the IVF index is
    trained and filled on faiss-gpu when faiss sees a GPU, then searched on both devices.
    """
    import faiss

    count, dim = X.shape
    backends = gpu_backends()[0] if gpu else []
    truth_backend = backends[0][0] if backends else None
    database = exact.array_blocks(np.arange(count), X, 65536)
    truth = exact.knn(exact.array_blocks(np.arange(len(queries)), queries, 4096)(), database, k,
                      backend=truth_backend)[2]
    rows = []

    def measure(name: str, params: str, search) -> None:
        (_, I), seconds = timed(search)
        rows.append({"index": name, "params": params, "recall_at_1": float((I[:, 0] == truth[:, 0]).mean()),
                     f"recall_{k}_at_{k}": recall_k(I, truth), "queries_per_s": round(len(queries) / seconds)})
        print(rows[-1], file=sys.stderr)

    def exact_search(backend: exact.Backend) -> tuple[np.ndarray, np.ndarray]:
        return exact.knn(exact.array_blocks(np.arange(len(queries)), queries, 4096)(), database, k,
                         backend=backend)[1:]

    for backend, _ in backends:
        measure(f"exact {backend.name}", "blocks of 65536", functools.partial(exact_search, backend))
    faiss_gpu = any(backend.name == "faiss-gpu" for backend, _ in backends)
    ivf, build_ivf = timed(lambda: _trained(faiss.index_factory(dim, f"IVF{nlist},Flat"), X, faiss_gpu))
    gpu_ivf = faiss.index_cpu_to_gpu(exact.gpu_resources(), 0, ivf) if faiss_gpu else None
    for nprobe in [p for p in (1, 4, 16, 64) if p <= nlist]:
        ivf.nprobe = nprobe
        measure(f"faiss IVF{nlist},Flat", f"nprobe={nprobe}", lambda: ivf.search(queries, k))
        if gpu_ivf is not None:
            faiss.GpuParameterSpace().set_index_parameter(gpu_ivf, "nprobe", nprobe)
            measure(f"faiss-gpu IVF{nlist},Flat", f"nprobe={nprobe}", lambda: gpu_ivf.search(queries, k))
    build_s = {"ivf": round(build_ivf, 1), "ivf_on": "gpu" if faiss_gpu else "cpu"}
    if skip_hnsw:
        return {"rows": rows, "build_s": build_s}
    import hnswlib

    hnsw, build_hnsw = timed(lambda: _added(faiss.IndexHNSWFlat(dim, 32), X))
    lib = hnswlib.Index(space="l2", dim=dim)
    _, build_lib = timed(lambda: (lib.init_index(count, M=32, ef_construction=40), lib.add_items(X)))
    for ef in (16, 32, 64, 128):
        hnsw.hnsw.efSearch = ef
        measure("faiss HNSW32", f"efSearch={ef}", lambda: hnsw.search(queries, k))
        lib.set_ef(max(ef, k))
        measure("hnswlib M=32", f"ef={ef}", lambda: lib.knn_query(queries, k)[::-1])
    return {"rows": rows, "build_s": {**build_s, "faiss_hnsw": round(build_hnsw, 1), "hnswlib": round(build_lib, 1)}}


def _trained(index, X, on_gpu: bool = False):
    """The IVF `index` trained on up to 256 points per list and filled with X, on faiss-gpu with `on_gpu`; a CPU index."""
    import faiss

    lists = faiss.extract_index_ivf(index).nlist
    sample = X[np.random.default_rng(0).choice(len(X), min(len(X), 256 * lists), replace=False)]
    target = faiss.index_cpu_to_gpu(exact.gpu_resources(), 0, index) if on_gpu else index
    target.train(sample)
    target.add(X)
    return faiss.index_gpu_to_cpu(target) if on_gpu else target


def _added(index, X):
    index.add(X)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block-rows", type=int, default=16384)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--skip-sklearn", action="store_true", help="(--device cpu) no scikit-learn brute force")
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--skip-hnsw", action="store_true", help="no HNSW or hnswlib (CPU-only, slow to build)")
    parser.add_argument("--nlist", type=int, default=2048, help="IVF lists of the approximate part")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: the exact self-join on faiss-gpu and torch-cuda against faiss-cpu, GPU IVF")
    parser.add_argument("--cpu-queries", type=int, default=20000,
                        help="with --device gpu: patterns whose neighbours faiss-cpu finds (all N take too long)")
    args = parser.parse_args()
    X = clustered(args.n_vectors + args.queries, args.dim, seed=0)
    patterns, queries = X[: args.n_vectors], X[args.n_vectors:]
    results = {"threads": torch.get_num_threads(), "device": args.device}
    if not args.skip_exact and args.device == "gpu":
        results["exact_self_join"] = gpu_exact_section(patterns, args.k, args.block_rows, args.cpu_queries)
    elif not args.skip_exact:
        results["exact_self_join"] = exact_section(patterns, args.k, args.block_rows, args.skip_sklearn)
    results["approximate"] = approximate_section(patterns, queries, args.k, args.nlist, args.device == "gpu",
                                                 args.skip_hnsw)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
