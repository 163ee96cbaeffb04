"""Models larger than one device (`--device-map auto`, `--max-memory`) and the extraction preflight.

On a CPU-only machine accelerate can split a model between CPU memory and disk: blocks
over the CPU budget wait on the `meta` device and are read from the safetensors file for
each forward pass. Extraction through such a model must store what the plain load stores.
"""

from __future__ import annotations

import logging
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from memscan import models, preflight, qf, sites, store
from memscan.errors import InputError
from memscan.engines.ray_runner import RayEngine
from memscan.extract import ExtractSettings, extract, settings_record
from tests.conftest import qf_lines, save_gpt2
from tests.test_bad_input import extract_args, fails, run

CHUNK = 32
CPU_BUDGET = "cpu=150KB"  # the 4-block model below: embeddings, LM head and block 0 in memory, blocks 1-3 on disk
DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory) -> Path:
    """A 4-block, 32-wide GPT-2 (about 190 kB in float32) saved as safetensors."""
    return save_gpt2(tmp_path_factory.mktemp("four_blocks"), qf.tokenizer(), n_layer=4)


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(qf_lines(30)) + "\n")
    return path


def read_rows(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """All vectors (m, n) and nll (m,) of a dataset, in row order."""
    blocks = list(store.ActivationDataset(directory).iter_batches(columns=("nll",), batch_rows=64))
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1]["nll"] for b in blocks])


def settings(model: Path, source: Path, **extra) -> ExtractSettings:
    return ExtractSettings(model=str(model), source=str(source), num_chunks=8, chunk_tokens=CHUNK, layers="all",
                           positions="all", dtype="fp32", vec_dtype="float32", batch_size=3, test_fraction=0.3,
                           **extra)


def load(model: Path, **placement) -> models.LoadedModel:
    return models.load(str(model), dtype=torch.float32, device=torch.device("cpu"), **placement)


@pytest.mark.parametrize("budget,placement", [
    (CPU_BUDGET, "5 modules on cpu, 4 modules on disk"),
    ("cpu=30KB", "1 module on disk"),                    # all of it, as one module
    ("cpu=1GB", "the whole model on cpu"),               # it fits: moved there whole, without a map
])
def test_the_cpu_budget_decides_what_waits_on_disk(four_blocks, budget, placement):
    loaded = load(four_blocks, device_map="auto", max_memory=models.parse_max_memory(budget))
    assert models.placement_summary(loaded.model) == placement
    offloaded = [p.device.type == "meta" for p in loaded.model.parameters()]   # offloaded weights wait on meta
    assert any(offloaded) == ("disk" in placement)
    assert models.input_device(loaded.model) == torch.device("cpu")


@pytest.mark.parametrize("budget", [CPU_BUDGET, "cpu=30KB"])
def test_hooks_and_the_loss_read_offloaded_blocks_as_the_plain_load_does(four_blocks, budget):
    ids = torch.randint(0, 50, (2, CHUNK), generator=torch.Generator().manual_seed(0))
    following = torch.roll(ids, -1, dims=1)
    positions = torch.tensor([0, 7, CHUNK - 1])
    spec = "resid_pre:all,resid_mid:all,attn_out:-1,mlp_hidden:all,module:transformer.h.2.mlp.c_fc"
    values, losses = [], []
    for loaded in (load(four_blocks), load(four_blocks, device_map="auto", max_memory=models.parse_max_memory(budget))):
        hooked = sites.parse(spec, loaded.num_layers, loaded.model)
        with torch.inference_mode(), sites.capture(loaded.model, hooked, positions) as captured:
            out = loaded.model.base_model(input_ids=ids.to(models.input_device(loaded.model)), use_cache=False)
        values.append(captured.values())
        losses.append(models.next_token_statistics(loaded.model, out.last_hidden_state, following))
    assert len(values[1]) == 4 + 4 + 1 + 4 + 1
    for plain, split in zip(*values):
        assert split.device.type == "cpu" and split.shape == plain.shape
        torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_a_model_split_over_cpu_and_disk_extracts_what_the_plain_load_extracts(tmp_path, four_blocks, docs):
    plain = extract(settings(four_blocks, docs), tmp_path / "plain")
    split = extract(settings(four_blocks, docs, device_map="auto", max_memory=CPU_BUDGET), tmp_path / "split")
    plain_vec, plain_nll = read_rows(tmp_path / "plain")
    split_vec, split_nll = read_rows(tmp_path / "split")
    assert plain_vec.shape == split_vec.shape == (sum(plain["counts"]["rows"].values()), 32)
    assert split["counts"] == plain["counts"]
    np.testing.assert_allclose(split_vec, plain_vec, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(split_nll, plain_nll, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isfinite(plain_nll).sum() > len(plain_nll) // 2
    plain_table = store.read_chunk_table(tmp_path / "plain")
    split_table = store.read_chunk_table(tmp_path / "split")
    for column in store.PER_TOKEN_COLUMNS:
        np.testing.assert_allclose(split_table[column], plain_table[column], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_device_map_settings_stay_out_of_the_record_until_used(four_blocks, docs):
    record = settings_record(settings(four_blocks, docs))
    assert "device_map" not in record and "max_memory" not in record      # datasets made before them still resume
    used = settings_record(settings(four_blocks, docs, device_map="auto", max_memory=CPU_BUDGET))
    assert (used["device_map"], used["max_memory"]) == ("auto", CPU_BUDGET)


def test_max_memory_is_read_as_bytes_per_device():
    assert models.parse_max_memory("cpu=2GB, disk=1.5GiB") == {"cpu": 2_000_000_000, "disk": int(1.5 * 2**30)}
    assert models.parse_max_memory("cpu=123456") == {"cpu": 123456}
    assert models.parse_max_memory(None) is None


@pytest.mark.parametrize("value,match", [
    ("cpu=lots", "'cpu=lots' is not a size like 500MB"),
    ("cpu=2G", "'cpu=2G' is not a size like 500MB"),
    ("gpu=2GB", "--max-memory must be DEVICE=SIZE items"),
    ("99=2GB", "--max-memory must be DEVICE=SIZE items"),       # a GPU torch does not see
    ("cpu=1GB,cpu=2GB", "each device once"),
    ("cpu", "--max-memory must be DEVICE=SIZE items"),
])
def test_bad_max_memory_is_one_line(capsys, qf_model, docs, tmp_path, value, match):
    out = tmp_path / "out"
    fails(capsys, *extract_args(qf_model, docs, out), "--device-map", "auto", "--max-memory", value, match=match)
    assert not out.exists()


def test_max_memory_without_device_map_and_device_map_with_ray_are_one_line(capsys, qf_model, docs, tmp_path):
    fails(capsys, *extract_args(qf_model, docs, tmp_path / "out"), "--max-memory", "cpu=1GB",
          match="--max-memory needs --device-map auto")
    with pytest.raises(InputError, match="--device-map auto runs with --engine local"):
        extract(settings(qf_model, docs, device_map="auto"), tmp_path / "ray", engine=RayEngine())
    with pytest.raises(InputError, match="--device-map must be auto"):
        settings(qf_model, docs, device_map="balanced").check()


# ---------------------------------------------------------------- preflight


def test_estimate_counts_rows_and_bytes():
    plan = preflight.estimate(100, [32, 32, 128], 4, "float16", 64, 1000, loss=True)
    rows = 100 * 3 * 4
    chunk_bytes = 4 * ((32 + 32 + 128) * 2 + 3 * 40)
    assert (plan.rows, plan.shards, plan.known) == (rows, 2, True)
    assert plan.total_bytes == 100 * chunk_bytes + 100 * 64 * 16
    assert plan.shard_bytes == 1000 * chunk_bytes // 12
    open_ended = preflight.estimate(None, [768], 1, "float32", 256, 65536, loss=False)
    assert (open_ended.chunks, open_ended.known) == (preflight.PER_CHUNKS, False)
    assert open_ended.total_bytes == 1000 * (768 * 4 + 40) + 1000 * 256 * 4
    assert "every 1,000 chunks" in open_ended.describe()


def test_estimate_is_within_a_quarter_of_the_bytes_written(tmp_path, qf_model, docs, caplog):
    caplog.set_level(logging.INFO, logger="memscan")
    chosen = ExtractSettings(model=str(qf_model), source=str(docs), num_chunks=20, chunk_tokens=CHUNK, layers="all",
                             positions="all", dtype="fp32", vec_dtype="float32", batch_size=4, shard_rows=600)
    manifest = extract(chosen, tmp_path / "out")
    plan = preflight.estimate(20, [32] * 3, CHUNK, "float32", CHUNK, 600, loss=True)
    written = preflight.written_bytes(manifest)
    assert sum(manifest["counts"]["rows"].values()) == plan.rows == 20 * 3 * CHUNK
    assert len(manifest["shards"]) == plan.shards
    assert abs(plan.total_bytes - written) <= 0.25 * written, (plan.total_bytes, written)
    assert f"will write 20 chunks: {plan.rows:,} rows in {plan.shards} shards" in caplog.text
    assert "first batch took" in caplog.text and "for the 5 batches of this run" in caplog.text


def test_too_little_space_is_refused_in_one_line_before_anything_is_written(capsys, monkeypatch, qf_model, docs,
                                                                           tmp_path):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 40_000, 40_000))
    out = tmp_path / "out"
    needed = preflight.estimate(20, [32], CHUNK, "float32", CHUNK, 65536, loss=True).total_bytes
    last = fails(capsys, *extract_args(qf_model, docs, out), "--num-chunks", "20", "--positions", "all",
                 "--dtype", "fp32", match="needs about")
    assert f"needs about {preflight.size_text(needed)} for 640 rows of 20 chunks" in last
    assert "has 40.0 kB free" in last
    assert not out.exists()


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (a dataset's vectors/ and chunks/ too), by its path inside, with its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_overwrite_refused_for_space_keeps_the_extraction_it_would_replace(capsys, monkeypatch, qf_model, docs,
                                                                            tmp_path):
    out = tmp_path / "out"
    extract(settings(qf_model, docs), out)
    old = files_of(out)
    needed = preflight.estimate(20, [32], CHUNK, "float32", CHUNK, 65536, loss=True).total_bytes
    args = (*extract_args(qf_model, docs, out), "--num-chunks", "20", "--positions", "all", "--dtype", "fp32",
            "--overwrite")
    freed = sum(len(content) for content in old.values())
    # 1,000 bytes short, counting the bytes of the extraction it replaces as free
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9, needed - freed - 1_000))
    last = fails(capsys, *args, match="needs about")
    assert "it would replace; " in last and last.endswith("(nothing was removed)")
    assert files_of(out) == old and store.verify(out) == []
    # the bytes of the extraction it replaces count as free: with them, just enough goes ahead
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9, needed - freed + 1_000))
    assert run(capsys, *args)[0] == 0
    assert store.read_manifest(out)["complete"] and (out / "manifest.json").read_bytes() != old["manifest.json"]


def test_a_resume_needs_only_what_is_not_yet_written(monkeypatch, tmp_path):
    plan = preflight.estimate(1000, [256], 10, "float32", 128, 4096, loss=True)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, plan.total_bytes // 3))
    with pytest.raises(InputError, match="needs about"):
        preflight.check_space(tmp_path, plan, None)
    half = {"shards": [{"bytes": plan.total_bytes // 2}], "chunk_tables": [{"bytes": plan.total_bytes // 4}]}
    preflight.check_space(tmp_path, plan, half)                    # a quarter is left, a third is free
    preflight.check_space(tmp_path, preflight.estimate(None, [256], 10, "float32", 128, 4096, loss=True), None)


def test_expected_time_line():
    assert preflight.time_line(120, 1.5, 8) == "first batch took 1.50 s: about 0:03:00 for the 120 batches of this run"
    assert preflight.time_line(None, 0.8, 8) == "first batch took 0.80 s: about 0:01:40 per 1,000 chunks"
    assert preflight.duration(3 * 3600 + 62.4) == "3:01:02"

