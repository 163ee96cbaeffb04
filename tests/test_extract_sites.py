"""Sites inside blocks through the whole pipeline: extract stores them in one pass, readers select them,
the index and query work on them, and version-1 datasets still read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from memscan import files, store
from memscan.cli import main
from memscan.extract import ExtractSettings, extract
from memscan.knn.index import IndexSettings, KnnIndex, build
from memscan.query import QuerySettings, run
from tests.conftest import qf_lines

CHUNK = 16
SITES = "resid_post:all,attn_out:0,mlp_hidden:-1,module:transformer.h.0.mlp.c_fc"


@pytest.fixture(scope="module")
def site_data(qf_model, tmp_path_factory):
    """Every chunk of 12 QF documents: hidden layers 0 and 2, and four sites of two widths (32 and 128)."""
    folder = tmp_path_factory.mktemp("sites")
    source = folder / "docs.txt"
    source.write_text("\n".join(qf_lines(12)) + "\n")
    settings = ExtractSettings(model=str(qf_model), source=str(source), chunk_tokens=CHUNK, layers="0,-1",
                               sites=SITES, positions="every:4", dtype="fp32", vec_dtype="float32",
                               batch_size=3, shard_rows=101, test_fraction=0.3)
    return extract(settings, folder / "data"), folder / "data"


def reference_sites(model_dir, token_ids: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """(site, layer) -> (chunks, T, width) from independent forward hooks on the Hugging Face model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(name, take_input=False):
        def hook(module, args, output):
            value = args[0] if take_input else output
            seen[name] = (value[0] if isinstance(value, tuple) else value).detach()
        return hook

    blocks = model.transformer.h
    handles = [blocks[0].register_forward_hook(keep("resid_post:0")),
               blocks[1].register_forward_hook(keep("resid_post:1")),
               blocks[0].attn.register_forward_hook(keep("attn_out:0")),
               blocks[1].mlp.c_proj.register_forward_hook(keep("mlp_hidden:1", take_input=True)),
               blocks[0].mlp.c_fc.register_forward_hook(keep("module:-1"))]
    with torch.no_grad():
        out = model(torch.tensor(token_ids, dtype=torch.long), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    found = {("hidden", 0): out.hidden_states[0], ("hidden", 2): out.hidden_states[2]}
    for label, value in seen.items():
        name, layer = label.split(":")
        site = "module:transformer.h.0.mlp.c_fc" if name == "module" else name
        found[(site, int(layer))] = value
    return {key: value.numpy() for key, value in found.items()}


def test_every_site_is_stored_in_row_order_and_equals_an_independent_hook(site_data, qf_model):
    manifest, data = site_data
    assert manifest["format_version"] == store.FORMAT_VERSION == 4
    assert manifest["sites"] == [
        {"name": "hidden", "layers": [0, 2], "n": 32},
        {"name": "resid_post", "layers": [0, 1], "n": 32},
        {"name": "attn_out", "layers": [0], "n": 32},
        {"name": "mlp_hidden", "layers": [1], "n": 128},
        {"name": "module:transformer.h.0.mlp.c_fc", "layers": [-1], "n": 128},
    ]
    positions = [3, 7, 11, 15]
    assert manifest["rows_per_chunk"] == 7 * len(positions)
    chunks = store.read_chunk_table(data, manifest)
    reference = reference_sites(qf_model, chunks["token_ids"])
    order = [(s["name"], layer) for s in manifest["sites"] for layer in s["layers"]]
    for site in manifest["sites"]:
        dataset = store.ActivationDataset(data, site["name"])
        assert (dataset.n, dataset.layers) == (site["n"], site["layers"])
        for layer in site["layers"]:
            X, meta = next(dataset.iter_batches(layer=layer, columns=("row_id", "position", "layer"),
                                                batch_rows=10**6))
            assert len(X) == dataset.count(layer=layer) == len(chunks["doc_id"]) * len(positions)
            assert X.shape[1] == site["n"]
            expected = reference[(site["name"], layer)][:, positions].reshape(-1, site["n"])
            np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-5)
            # rows run (chunk, site and layer, position): row id = chunk x rows_per_chunk + set x P + position index
            where = order.index((site["name"], layer))
            chunk_of, position_index = np.divmod(np.arange(len(X)), len(positions))
            np.testing.assert_array_equal(meta["row_id"], chunk_of * manifest["rows_per_chunk"]
                                          + where * len(positions) + position_index)
            np.testing.assert_array_equal(dataset.take(meta["row_id"][::-7]), X[::-7])
    assert store.verify(data) == []


def test_the_shards_hold_a_site_column_and_vectors_as_wide_as_their_site(site_data):
    manifest, data = site_data
    table = pq.read_table(data / manifest["shards"][0]["name"])
    assert table.schema.field("site").type == store.schema([32, 128], "float32").field("site").type
    widths = {(site, len(vec)) for site, vec in zip(table.column("site").to_pylist(), table.column("vec").to_pylist())}
    assert widths == {("hidden", 32), ("resid_post", 32), ("attn_out", 32), ("mlp_hidden", 128),
                      ("module:transformer.h.0.mlp.c_fc", 128)}


def test_a_site_is_indexed_and_queried_like_a_layer(site_data, tmp_path):
    _, data = site_data
    info = build(data, tmp_path / "index", IndexSettings(site="mlp_hidden", factory="Flat"))
    assert (info["dataset"]["site"], info["dataset"]["layer"], info["n"]) == ("mlp_hidden", 1, 128)
    index = KnnIndex.load(tmp_path / "index")
    assert index.dataset.site == "mlp_hidden"
    qid, D, I = index.search_dataset(data, 3, split="test")
    patterns = store.ActivationDataset(data, "mlp_hidden")
    P, pmeta = next(patterns.iter_batches(split="train", layer=1, batch_rows=10**6))
    Q, _ = next(patterns.iter_batches(split="test", layer=1, batch_rows=10**6))
    brute = ((Q.astype(np.float64)[:, None] - P.astype(np.float64)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(I[:, 0], pmeta["row_id"][brute.argmin(1)])
    summary = run(tmp_path / "index", data, tmp_path / "run", QuerySettings(k=3))
    assert [(s["site"], s["layer"], s["n"]) for s in summary["layers"]] == [("mlp_hidden", 1, 128)]


def test_a_run_over_every_site_follows_each_through_depth(site_data, tmp_path):
    import memscan
    from memscan import report

    _, data = site_data
    build(data, tmp_path / "index", IndexSettings(factory="Flat"))   # the residual stream, its last layer
    summary = run(tmp_path / "index", data, tmp_path / "run", QuerySettings(k=2, sites="all"))
    assert summary["site"] == "hidden"
    assert [(s["site"], s["layer"]) for s in summary["layers"]] == [
        ("hidden", 0), ("hidden", 2), ("resid_post", 0), ("resid_post", 1), ("attn_out", 0), ("mlp_hidden", 1),
        ("module:transformer.h.0.mlp.c_fc", -1)]
    tables = memscan.load(tmp_path / "run")
    attn = tables.at_site("attn_out").queries
    dataset = store.ActivationDataset(data, "attn_out")
    P, _ = next(dataset.iter_batches(split="train", layer=0, batch_rows=10**6))
    Q, qmeta = next(dataset.iter_batches(split="test", layer=0, batch_rows=10**6))
    brute = np.sqrt(((Q.astype(np.float64)[:, None] - P.astype(np.float64)[None]) ** 2).sum(-1)).min(1)
    got = attn.set_index("query_row_id").loc[qmeta["row_id"], "nearest_dist"].to_numpy()
    np.testing.assert_allclose(got, brute, rtol=1e-4)
    assert set(tables.queries.site) == {s["site"] for s in summary["layers"]}
    assert report.render(tmp_path / "run").exists()


def test_site_flags_give_one_line(site_data, qf_model, tmp_path, capsys):
    _, data = site_data
    build(data, tmp_path / "idx", IndexSettings(factory="Flat"))
    cases = [
        (["extract", "--model", str(qf_model), "--source", "qf:documents=4", "--chunk-tokens", "16", "--out", str(tmp_path / "a"),
          "--sites", "attn_outt:0"], "unknown site 'attn_outt'"),
        (["extract", "--model", str(qf_model), "--source", "qf:documents=4", "--chunk-tokens", "16", "--out", str(tmp_path / "b"),
          "--layers", "none"], "--layers none stores nothing"),
        (["index", str(data), "--out", str(tmp_path / "c"), "--site", "mlp_out"], "site 'mlp_out' is not in dataset"),
        (["query", str(tmp_path / "idx"), "--queries", str(data), "--out", str(tmp_path / "d"), "--sites", "mlp_out"],
         "--sites: 'mlp_out' is not in the index's dataset"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and expected in err and len(err.splitlines()) == 1, err


def test_a_version_1_dataset_still_reads_indexes_and_verifies(tmp_path):
    """Shards without a site column and a manifest without `sites`, as memscan wrote them before."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)).astype(np.float32)
    folder = tmp_path / "v1"
    folder.mkdir()
    manifest = store.new_manifest(fingerprint=None, settings={"source": "vectors"}, model={"id": "m", "num_parameters": 0},
                                  source={}, n=8, layers=[3], positions="n/a", chunk_tokens=0, dtype="n/a",
                                  vec_dtype="float32", seed=None, rows_per_chunk=1)
    manifest.update(format_version=1)
    del manifest["sites"]
    writer = store.ShardWriter(folder, store.schema(8, "float32", format_version=1), 25, 0,
                               lambda info: manifest["shards"].append(info.to_dict()))
    rows = np.arange(60)
    splits = np.where(rows % 3 == 0, "test", "train").astype(object)
    columns = {"row_id": rows, "doc_id": rows, "chunk_id": rows * 0, "position": rows * 0, "token_id": rows * 0 - 1,
               "next_token_id": rows * 0 - 1, "nll": np.full(60, np.nan), "split": splits, "layer": rows * 0 + 3}
    writer.write(store.rows_table(columns, X, writer.schema))
    writer.close()
    manifest.update(complete=True, counts={"chunks": {"test": 20, "train": 40}, "rows": {"test": 20, "train": 40}})
    files.write_json_atomic(folder / store.MANIFEST, manifest)
    assert "site" not in pq.read_schema(folder / "vectors" / "part-00000.parquet").names

    dataset = store.ActivationDataset(folder)
    assert (dataset.site, dataset.sites, dataset.layers, dataset.count("train", 3)) == ("hidden", ["hidden"], [3], 40)
    got, _ = next(dataset.iter_batches(split="test", batch_rows=100))
    np.testing.assert_array_equal(got, X[rows % 3 == 0])
    assert store.verify(folder) == []
    info = build(folder, tmp_path / "index", IndexSettings(factory="Flat"))
    assert (info["dataset"]["site"], info["ntotal"]) == ("hidden", 40)
    assert json.loads((folder / store.MANIFEST).read_text())["format_version"] == 1


def test_a_resumed_site_extraction_writes_the_same_bytes(site_data, qf_model, tmp_path):
    """Cut after the first shard of a mixed-width dataset: the rerun writes exactly the shards the whole run wrote."""
    manifest, whole = site_data
    assert len(manifest["shards"]) > 2
    cut = tmp_path / "cut"
    cut.mkdir()
    kept = manifest["shards"][:1]
    for entry in kept:
        (cut / entry["name"]).parent.mkdir(exist_ok=True)
        (cut / entry["name"]).write_bytes((whole / entry["name"]).read_bytes())
    resumed = {key: value for key, value in manifest.items() if key not in ("counts", "corpus")}
    resumed.update(complete=False, shards=kept, chunk_tables=[])
    store.write_manifest(cut, resumed)
    settings = ExtractSettings(**{key: value for key, value in manifest["settings"].items()
                                  if key in ExtractSettings.__dataclass_fields__})
    extract(settings, cut)
    names = sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*.parquet"))
    assert names == sorted(p.relative_to(cut).as_posix() for p in cut.rglob("*.parquet")) and len(names) > 3
    assert all((whole / n).read_bytes() == (cut / n).read_bytes() for n in names)
