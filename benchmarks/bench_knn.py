"""Exact self-join against its floor and scikit-learn; approximate recall against speed.

Data: clustered synthetic vectors (1,000 clusters, noise half the centre spread), N x n.
Exact: memscan's blockwise self-join (faiss CPU backend, and torch's bf16 product with
exact re-ranking) against the floor 2 N^2 n flops at the machine's best measured fp32
matmul rate, and against scikit-learn's brute-force NearestNeighbors on the same data
and answers. Approximate: recall@1 and queries/s for IVF nprobe and HNSW efSearch
settings, and hnswlib at matched parameters.

    python benchmarks/bench_knn.py [--n-vectors 100000] [--dim 768] [--skip-sklearn]
"""

from __future__ import annotations

import argparse
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
    out["torch_bf16_recall_k_at_k"] = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(I16, I)]))
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


def approximate_section(X: np.ndarray, queries: np.ndarray, k: int) -> dict:
    import faiss
    import hnswlib

    count, dim = X.shape
    truth = exact.knn(exact.array_blocks(np.arange(len(queries)), queries, 4096)(),
                      exact.array_blocks(np.arange(count), X, 65536), k)[2]
    rows = []

    def measure(name: str, params: str, search) -> None:
        (_, I), seconds = timed(search)
        rows.append({"index": name, "params": params, "recall_at_1": float((I[:, 0] == truth[:, 0]).mean()),
                     f"recall_{k}_at_{k}": float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(I, truth)])),
                     "queries_per_s": round(len(queries) / seconds)})
        print(rows[-1], file=sys.stderr)

    nlist = 2048
    ivf, build_ivf = timed(lambda: _trained(faiss.index_factory(dim, f"IVF{nlist},Flat"), X))
    for nprobe in (1, 4, 16, 64):
        ivf.nprobe = nprobe
        measure(f"faiss IVF{nlist},Flat", f"nprobe={nprobe}", lambda: ivf.search(queries, k))
    hnsw, build_hnsw = timed(lambda: _added(faiss.IndexHNSWFlat(dim, 32), X))
    lib = hnswlib.Index(space="l2", dim=dim)
    _, build_lib = timed(lambda: (lib.init_index(count, M=32, ef_construction=40), lib.add_items(X)))
    for ef in (16, 32, 64, 128):
        hnsw.hnsw.efSearch = ef
        measure("faiss HNSW32", f"efSearch={ef}", lambda: hnsw.search(queries, k))
        lib.set_ef(max(ef, k))
        measure("hnswlib M=32", f"ef={ef}", lambda: lib.knn_query(queries, k)[::-1])
    return {"rows": rows, "build_s": {"ivf": round(build_ivf, 1), "faiss_hnsw": round(build_hnsw, 1),
                                      "hnswlib": round(build_lib, 1)}}


def _trained(index, X):
    index.train(X[np.random.default_rng(0).choice(len(X), min(len(X), 256 * 2048), replace=False)])
    index.add(X)
    return index


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
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-exact", action="store_true")
    args = parser.parse_args()
    X = clustered(args.n_vectors + args.queries, args.dim, seed=0)
    patterns, queries = X[: args.n_vectors], X[args.n_vectors:]
    results = {"threads": torch.get_num_threads()}
    if not args.skip_exact:
        results["exact_self_join"] = exact_section(patterns, args.k, args.block_rows, args.skip_sklearn)
    results["approximate"] = approximate_section(patterns, queries, args.k)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
