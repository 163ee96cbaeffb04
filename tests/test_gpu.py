"""The GPU paths against the CPU and a float64 brute force: faiss-gpu, torch on CUDA, IVF on the GPU, extraction.

Tests marked `gpu` skip where their library sees no GPU; `pytest -m gpu` selects them, and
benchmarks/gpu_check.sh fails if all of them skip on a machine with one. The last two
tests run everywhere: a GPU asked for where none is seen is one line, not a traceback.
The kNN helpers are imported inside the tests: importing tests.test_knn_exact needs faiss,
and a GPU box with CUDA torch but no faiss must still collect the extraction test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memscan import models, store
from memscan.cli import main
from memscan.errors import InputError
from memscan.extract import ExtractSettings, extract
from memscan.knn import exact
from memscan.knn.index import IndexSettings, KnnIndex, build
from tests.conftest import qf_lines
from tests.test_extract_capture import read_all
from tests.test_knn_index import clustered


def faiss_gpus() -> int:
    """GPUs faiss sees: 0 with faiss-cpu, and where faiss is not installed at all."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
needs_faiss_gpu = pytest.mark.skipif(faiss_gpus() == 0, reason="faiss sees no GPU (faiss-cpu, or no GPU)")

# Factories, not backends: a faiss-gpu backend cannot even be made where there is no GPU.
GPU_BACKENDS = [
    pytest.param(lambda: exact.FaissBackend(gpu=True), id="faiss-gpu", marks=needs_faiss_gpu),
    pytest.param(lambda: exact.TorchBackend("cuda", "float32"), id="torch-cuda-float32", marks=needs_cuda),
    pytest.param(lambda: exact.TorchBackend("cuda", "bfloat16"), id="torch-cuda-bfloat16", marks=needs_cuda),
]


@pytest.mark.gpu
@needs_faiss_gpu
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_gpu_search_equals_faiss_cpu_and_brute_force(metric):
    from tests.test_knn_exact import brute_force

    rng = np.random.default_rng(0)
    xb = rng.normal(size=(5000, 64)).astype(np.float32)
    xq = rng.normal(size=(300, 64)).astype(np.float32)
    k = 10
    scores = brute_force(xq, xb, metric)
    best = np.sort(scores, axis=1)[:, :k] if metric == "l2" else -np.sort(-scores, axis=1)[:, :k]
    D_gpu, I_gpu = exact.FaissBackend(gpu=True).search(xq, xb, k, metric)
    D_cpu, I_cpu = exact.FaissBackend().search(xq, xb, k, metric)
    for D, I in ((D_gpu, I_gpu), (D_cpu, I_cpu)):
        np.testing.assert_allclose(D, best, rtol=1e-4)                                 # the true k best scores
        np.testing.assert_allclose(np.take_along_axis(scores, I, axis=1), D, rtol=1e-4)  # each id has its score
    np.testing.assert_allclose(D_gpu, D_cpu, rtol=1e-4)
    assert (I_gpu[:, 0] == I_cpu[:, 0]).mean() > 0.99  # ids differ only among near-ties


@pytest.mark.gpu
@pytest.mark.parametrize("make_backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric,offset", [("l2", 0.0), ("ip", 0.0), ("l2", 4000.0)])
def test_gpu_backends_with_exact_reranking_equal_brute_force(make_backend, metric, offset):
    from tests.test_knn_exact import assert_matches, brute_force, tricky_vectors

    X = tricky_vectors() + np.float32(offset)  # duplicates, exact ties; at 4000 the norms dwarf the distances
    ids = np.arange(len(X), dtype=np.int64) * 3 + 100
    k = 7
    qids, D, I = exact.knn(exact.array_blocks(ids, X, 97)(), exact.array_blocks(ids, X, 131), k, metric=metric,
                           exclude_self=True, backend=make_backend())
    assert np.array_equal(qids, ids)
    positions = (I - 100) // 3
    assert not (positions == np.arange(len(X))[:, None]).any()
    assert_matches(D, positions, brute_force(X, X, metric, exclude=np.eye(len(X), dtype=bool)), k, metric)


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpus() == 0 and not torch.cuda.is_available(), reason="neither faiss nor torch sees a GPU")
def test_auto_and_gpu_pick_a_gpu_backend():
    expected = "faiss-gpu" if faiss_gpus() else "torch-cuda-float32"
    assert exact.choose_backend("auto").name == expected
    assert exact.choose_backend("gpu").name == expected
    assert exact.choose_backend("cpu").name == "faiss-cpu"


@pytest.mark.gpu
@needs_faiss_gpu
def test_ivf_built_and_loaded_on_the_gpu_finds_the_neighbours(tmp_path):
    from tests.test_knn_exact import brute_force

    X = clustered(20_500, 32, 300, seed=0)
    data = tmp_path / "data"
    store.write_vectors(data, X, ["train"] * 20_000 + ["test"] * 500, model="synthetic", shard_rows=8_000)
    settings = IndexSettings(factory="IVF256,Flat", device="gpu", nprobe=16, eval_recall=300, shards=2)
    info = build(data, tmp_path / "ivf", settings)
    assert info["device"] == "faiss-gpu" and info["ntotal"] == 20_000
    assert info["recall"]["recall_1_at_1"] >= 0.9

    index = KnnIndex.load(tmp_path / "ivf", device="gpu")
    assert all(shard.gpu_index is not None for shard in index.shards.members)
    queries = X[20_000:]
    D, I = index.search(queries, 5)
    scores = brute_force(queries, X[:20_000], "l2")  # train rows are row ids 0..19,999
    assert (I[:, 0] == scores.argmin(axis=1)).mean() >= 0.9
    np.testing.assert_allclose(np.take_along_axis(scores, I, axis=1), D, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_extraction_equals_cpu_extraction(tmp_path, qf_model):
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(qf_lines(6)) + "\n")
    common = {"model": str(qf_model), "source": str(source), "chunk_tokens": 32, "layers": "all", "positions": "all",
              "dtype": "fp32", "vec_dtype": "float32", "batch_size": 4, "test_fraction": 0.3}
    extract(ExtractSettings(**common, device="cpu"), tmp_path / "cpu")
    manifest = extract(ExtractSettings(**common, device="cuda"), tmp_path / "cuda")
    assert manifest["settings"]["device"].startswith("cuda")
    on_cpu, cpu_meta = read_all(tmp_path / "cpu")
    on_gpu, gpu_meta = read_all(tmp_path / "cuda")
    assert on_gpu.shape == on_cpu.shape and len(on_cpu) > 0
    for column in ("row_id", "doc_id", "chunk_id", "position", "token_id", "next_token_id", "split", "layer"):
        assert np.array_equal(gpu_meta[column], cpu_meta[column]), column
    relative = np.linalg.norm(on_gpu - on_cpu, axis=1) / np.linalg.norm(on_cpu, axis=1)
    assert relative.max() < 1e-3
    np.testing.assert_allclose(gpu_meta["nll"], cpu_meta["nll"], rtol=1e-3, equal_nan=True)


def one_error_line(capsys, *args: str) -> str:
    """Run the CLI; it must exit 1 with exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    return lines[0]


def test_cuda_asked_for_where_torch_sees_none_is_one_line(monkeypatch, capsys, qf_model, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so it runs on GPU machines too
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(qf_lines(4)) + "\n")
    line = one_error_line(capsys, "extract", "--model", str(qf_model), "--source", str(source),
                          "--out", str(tmp_path / "out"), "--chunk-tokens", "32", "--device", "cuda")
    assert line == ("memscan: error: --device cuda was asked for, but torch sees no CUDA device "
                    "(use --device cpu or auto)")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="--device cuda:1 was asked for"):
        models.resolve_device("cuda:1")


def test_gpu_index_asked_for_where_nothing_sees_one_is_one_line(monkeypatch, capsys, tmp_path: Path):
    import faiss

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    store.write_vectors(tmp_path / "data", clustered(200, 8, 4, seed=1), ["train"] * 200, model="synthetic")
    line = one_error_line(capsys, "index", str(tmp_path / "data"), "--out", str(tmp_path / "idx"), "--device", "gpu")
    assert line == ("memscan: error: --device gpu was asked for, but neither faiss nor torch sees a GPU "
                    "(use --device cpu or auto)")
    assert not (tmp_path / "idx").exists()
