"""The per-chunk table, `memscan score` and `memscan verbatim`: numbers against direct computations."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from memscan import files, score, store
from memscan.cli import main
from memscan.extract import ExtractSettings, extract
from memscan.store import chunks
from tests.conftest import qf_lines
from tests.test_extract_capture import read_all, reference_chunks

CHUNK = 32


def write_source(tmp_path, documents=16):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(qf_lines(documents))))
    return path


def settings(model, source, **overrides):
    return ExtractSettings(**{"model": str(model), "source": str(source), "chunk_tokens": CHUNK, "dtype": "fp32",
                              "vec_dtype": "float32", "batch_size": 3, "shard_rows": 37, "layers": "1,-1",
                              "split_column": "label", **overrides})


@pytest.mark.parametrize("positions", ["last", "all", "every:5"])
def test_chunk_table_holds_the_corpus_tokens_and_the_shards_nll(tmp_path, qf_model, positions):
    source = write_source(tmp_path, 8)
    extract(settings(qf_model, source, positions=positions), tmp_path / "out")
    table = store.read_chunk_table(tmp_path / "out")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qf_model)
    truth = reference_chunks(qf_lines(8), tokenizer, CHUNK)
    keys = list(zip(table["doc_id"].tolist(), table["chunk_id"].tolist()))
    assert keys == sorted(truth)
    assert np.array_equal(table["token_ids"], np.array([truth[k][0] for k in keys]))
    assert np.array_equal(table["next_token_id"], np.array([truth[k][1] for k in keys]))
    _, meta = read_all(tmp_path / "out")
    chunk_index = meta["row_id"] // (len(meta["row_id"]) // len(keys))
    assert np.array_equal(table["nll"][chunk_index, meta["position"]], meta["nll"], equal_nan=True)
    # per-token statistics against the Hugging Face model's logits, in float64
    model = AutoModelForCausalLM.from_pretrained(qf_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(table["token_ids"].astype(np.int64))).logits.double()
    logp = torch.log_softmax(logits, -1).numpy()
    targets = np.concatenate([table["token_ids"][:, 1:], table["next_token_id"][:, None]], axis=1)
    nll = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    nll[targets < 0] = np.nan
    p = np.exp(logp)
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[..., None]) ** 2).sum(-1)
    np.testing.assert_allclose(table["nll"], nll, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table["mu"], np.where(targets < 0, np.nan, mu), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table["var"], np.where(targets < 0, np.nan, var), rtol=1e-4, atol=1e-5)
    assert store.verify(tmp_path / "out") == []


def test_no_loss_keeps_tokens_and_leaves_the_statistics_empty(tmp_path, qf_model):
    extract(settings(qf_model, write_source(tmp_path, 4), loss=False), tmp_path / "out")
    table = store.read_chunk_table(tmp_path / "out")
    assert np.isnan(table["nll"]).all() and (table["token_ids"] >= 0).all()


def test_a_resume_writes_the_same_chunk_table_and_shards(tmp_path, qf_model, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_TABLE_CHUNKS", 6)
    source = write_source(tmp_path)
    whole = tmp_path / "whole"
    extract(settings(qf_model, source), whole)
    manifest = json.loads((whole / store.MANIFEST).read_text())
    assert len(manifest["chunk_tables"]) > 3
    cut = tmp_path / "cut"
    cut.mkdir()
    kept_shards, kept_tables = manifest["shards"][:1], manifest["chunk_tables"][:3]  # the two stop at different chunks
    for entry in kept_shards + kept_tables:
        (cut / entry["name"]).parent.mkdir(exist_ok=True)
        (cut / entry["name"]).write_bytes((whole / entry["name"]).read_bytes())
    for key in ("counts", "corpus"):
        manifest.pop(key)
    manifest.update(complete=False, shards=kept_shards, chunk_tables=kept_tables)
    store.write_manifest(cut, manifest)
    extract(settings(qf_model, source), cut)
    names = sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*.parquet"))
    assert names == sorted(p.relative_to(cut).as_posix() for p in cut.rglob("*.parquet"))
    assert all((whole / n).read_bytes() == (cut / n).read_bytes() for n in names)


@pytest.fixture(scope="module")
def scored(qf_model, tmp_path_factory):
    """A dataset (positions last), a verbatim run and a score run, all through the CLI."""
    root = tmp_path_factory.mktemp("scored")
    source = write_source(root)
    data, verbatim_dir, out = root / "data", root / "verbatim", root / "score"
    for argv in (["extract", "--model", str(qf_model), "--source", str(source), "--out", str(data), "--chunk-tokens",
                  str(CHUNK), "--positions", "last", "--dtype", "fp32", "--split-column", "label"],
                 ["verbatim", str(data), "--out", str(verbatim_dir), "--num-chunks", "12", "--prompt-tokens", "8",
                  "--suffix-tokens", "8", "--resamples", "50"],
                 ["score", str(data), "--out", str(out), "--verbatim", str(verbatim_dir), "--resamples", "50",
                  "--min-k", "0.3"]):
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 0, argv[0]
    return data, verbatim_dir, out


def oriented(scores, metrics, name):
    """The column `name` of a scores frame as larger = member: negated where metrics.json records that members lie
    on its smaller side."""
    side = metrics["orientation"][name]
    assert side == metrics["scores"][name]["member_when"]
    return -scores[name] if side == "smaller" else scores[name]


def test_scores_equal_direct_computations(scored):
    data, _, out = scored
    table = store.read_chunk_table(data)
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert list(zip(scores.doc_id, scores.chunk_id)) == list(zip(table["doc_id"], table["chunk_id"]))
    nll = table["nll"].astype(np.float64)
    np.testing.assert_allclose(scores["loss"], np.nanmean(nll, axis=1), rtol=1e-12)   # the loss itself, in nats
    counts = (~np.isnan(nll)).sum(1)
    lowest = [np.sort(-row[~np.isnan(row)])[: max(1, int(c * 0.3))].mean() for row, c in zip(nll, counts)]
    np.testing.assert_allclose(scores["min_k"], lowest, rtol=1e-12)
    assert np.array_equal(scores["label"], (table["split"] == "train").astype(int))


def test_metrics_auc_equals_sklearn_and_the_summary_vouches_for_the_files(scored):
    _, _, out = scored
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("loss", "min_k", "min_k_plus_plus", "zlib"):
        assert metrics["scores"][name]["auc"]["value"] == pytest.approx(roc_auc_score(scores.label,
                                                                                      oriented(scores, metrics, name)))
    assert metrics["split_rule"] == {"kind": "column", "column": "label"}
    summary = json.loads((out / "summary.json").read_text())
    files.check_signature(summary, out / "summary.json")
    for entry in summary["tables"]:
        files.check_file(out, entry)
    assert (out / "report.html").stat().st_size > 1000


def test_verbatim_and_the_bridge(scored):
    data, verbatim_dir, out = scored
    run = pq.read_table(verbatim_dir / "verbatim.parquet").to_pandas()
    assert (run.split.value_counts() == 12).all()
    table = store.read_chunk_table(data)
    summary = json.loads((verbatim_dir / "summary.json").read_text())
    for split in ("train", "test"):
        assert summary["splits"][split]["match_fraction"]["value"] == pytest.approx(
            run.match_fraction[run.split == split].mean())
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert scores["verbatim_match_fraction"].notna().sum() == 24
    bridge = json.loads((out / "metrics.json").read_text())["bridge"]
    both = scores[["loss", "min_k"]].to_numpy()
    from scipy.stats import spearmanr

    assert bridge["spearman"]["loss"]["min_k"] == pytest.approx(spearmanr(both[:, 0], both[:, 1]).statistic)
    assert bridge["auc"]["loss"] == json.loads((out / "metrics.json").read_text())["scores"]["loss"]["auc"]
    assert len(table["doc_id"]) == len(scores)


def test_the_bridge_plot_draws_the_scores_table_and_is_written_beside_roc(scored):
    from memscan import report

    _, _, out = scored
    scores = pq.read_table(out / "scores.parquet")
    frame = scores.to_pandas()
    points = report.bridge_points(scores)
    # no query run here: x falls back to the verbatim match fraction; y is the loss in nats
    np.testing.assert_array_equal(points["x"], frame["verbatim_match_fraction"].to_numpy())
    np.testing.assert_allclose(points["y"], np.nanmean(store.read_chunk_table(scored[0])["nll"].astype(np.float64), 1),
                               rtol=1e-12)
    assert np.array_equal(points["extractable"], (frame["verbatim_extractable"] == 1).to_numpy())
    assert list(points["split"]) == list(frame["split"])
    with_geometry = scores.append_column("nearest", scores.column("min_k"))   # the x is the nearest column
    np.testing.assert_array_equal(report.bridge_points(with_geometry)["x"], frame["min_k"].to_numpy())
    assert report.bridge_points(scores.select(["split", "label", "loss"])) is None
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and len(page) > 20_000    # the ROC and the bridge, embedded


def test_each_column_holds_what_its_name_says_and_metrics_record_its_side(scored):
    data, _, out = scored
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["orientation"] == {"loss": "smaller", "min_k": "larger", "min_k_plus_plus": "larger",
                                      "zlib": "smaller"}
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert (scores["loss"] > 0).all() and (scores["zlib"] > 0).all() and (scores["min_k"] <= 0).all()
    texts = AutoTokenizer.from_pretrained(data_model(data)).batch_decode(store.read_chunk_table(data)["token_ids"])
    lengths = np.array([len(zlib.compress(text.encode("utf-8"))) for text in texts])
    np.testing.assert_allclose(scores["zlib"], scores["loss"] / lengths, rtol=1e-12)


def data_model(data):
    """The model folder a dataset was extracted with."""
    return json.loads((data / store.MANIFEST).read_text())["model"]["path"]


def as_version_1(out, to):
    """A copy of the score folder `out` in `to` as format version 1 wrote it: every score larger = member (loss,
    zlib, nearest, energy negated), no `orientation` or `member_when` in metrics.json, the summary re-signed."""
    shutil.copytree(out, to)
    table = pq.read_table(to / "scores.parquet")
    for name in score.NEGATED_IN_VERSION_1:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, pc.negate(table.column(name)))
    pq.write_table(table, to / "scores.parquet")
    metrics = json.loads((to / "metrics.json").read_text())
    metrics.pop("orientation")
    for row in metrics["scores"].values():
        row.pop("member_when")
    (to / "metrics.json").write_text(json.dumps(metrics))
    summary = json.loads((to / "summary.json").read_text())
    summary.pop(files.SELF_SHA256)
    summary.update(format_version=1, tables=[files.file_entry(to / entry["name"]) for entry in summary["tables"]])
    files.write_json_atomic(to / "summary.json", files.signed(summary))
    return to


def test_a_version_1_folder_reads_with_every_column_what_its_name_says(scored, tmp_path):
    import memscan
    from memscan import report

    _, _, out = scored
    old = as_version_1(out, tmp_path / "old")
    assert (pq.read_table(old / "scores.parquet").column("loss").to_numpy() < 0).all()   # minus the loss on disk
    new = memscan.load(out)
    loaded = memscan.load(old)
    assert loaded.table("scores").equals(new.table("scores"))
    assert loaded.table("metrics").drop(columns="member_when").equals(new.table("metrics").drop(columns="member_when"))
    assert dict(zip(loaded.table("metrics").score, loaded.table("metrics").member_when)) == json.loads(
        (out / "metrics.json").read_text())["orientation"]
    result = score.ScoreResult(old, json.loads((old / "summary.json").read_text()))
    assert result.orientation == json.loads((out / "metrics.json").read_text())["orientation"]
    np.testing.assert_array_equal(report.bridge_points(result.scores)["y"], new.scores["loss"].to_numpy())
    assert report.render_scores(old, allow_other_files=True) == ["report.html"]


def test_geometry_lookup_takes_the_leave_one_out_distance_for_members():
    from memscan.score import _lookup

    keys = np.array([7, 3, 11])
    values = np.array([0.7, 0.3, 1.1])
    assert np.allclose(_lookup(keys, values, np.array([3, 5, 11])), [0.3, np.nan, 1.1], equal_nan=True)


def run_cli(argv, capsys=None):
    """main(argv): its exit code and, with capsys, its stderr."""
    with pytest.raises(SystemExit) as code:
        main([str(a) for a in argv])
    return code.value.code, capsys.readouterr().err if capsys else ""


@pytest.fixture(scope="module")
def geometry(scored, tmp_path_factory):
    """An index of the train split, a test-split run and a leave-one-out train-split run, and a score of both."""
    data = scored[0]
    root = tmp_path_factory.mktemp("geometry")
    index, test_run, train_run, out = root / "index", root / "test-run", root / "train-run", root / "score"
    for argv in (["index", data, "--out", index, "--factory", "Flat"],
                 ["query", index, "--queries", data, "--out", test_run, "--k", "3"],
                 ["query", index, "--queries", data, "--split", "train", "--out", train_run, "--k", "3"],
                 ["score", data, "--out", out, "--query-run", test_run, "--query-run", train_run, "--resamples", "50"]):
        assert run_cli(argv)[0] == 0, argv[0]
    return data, index, test_run, train_run, out


def last_row_ids(data, table):
    """The dataset's row id (m,) of each chunk of the per-chunk table at its last position and layer."""
    _, meta = read_all(data)
    last = (meta["position"] == meta["position"].max()) & (meta["layer"] == meta["layer"].max())
    row_of = dict(zip(zip(meta["doc_id"][last].tolist(), meta["chunk_id"][last].tolist()), meta["row_id"][last]))
    return np.array([row_of[key] for key in zip(table["doc_id"].tolist(), table["chunk_id"].tolist())])


def by_row(frame, key, rows):
    """frame's rows (a DataFrame) in the order of the ids `rows`, looked up in its column `key`."""
    return frame.set_index(key).loc[rows]


def test_members_are_rated_on_energy_and_retrieved_by_a_leave_one_out_run(geometry):
    data, _, test_run, train_run, out = geometry
    table = store.read_chunk_table(data)
    rows = last_row_ids(data, table)
    member = table["split"] == "train"
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) >= {"nearest", "inside_ball", "energy", "retrieved"} and not metrics["skipped"]
    assert json.loads(test_run.joinpath("summary.json").read_text())["queries_are_patterns"] is False
    assert json.loads(train_run.joinpath("summary.json").read_text())["queries_are_patterns"] is True
    test_rows = by_row(pq.read_table(test_run / "queries.parquet").to_pandas(), "query_row_id", rows[~member])
    train_rows = by_row(pq.read_table(train_run / "queries.parquet").to_pandas(), "query_row_id", rows[member])
    for mask, run in ((member, train_rows), (~member, test_rows)):
        energy = (run.energy_lower.to_numpy(np.float64) + run.energy_upper.to_numpy(np.float64)) / 2
        np.testing.assert_array_equal(scores.energy[mask], energy)
        np.testing.assert_array_equal(scores.retrieved[mask], run.retrieved.to_numpy(np.float64))
    # members' nearest: the nearest *other* pattern, the same in the patterns table and the leave-one-out run
    patterns = by_row(pq.read_table(train_run / "patterns.parquet").to_pandas(), "row_id", rows[member])
    np.testing.assert_array_equal(patterns.nearest_other_dist.to_numpy(), train_rows.nearest_dist.to_numpy())
    np.testing.assert_array_equal(scores.nearest[member], patterns.nearest_other_dist.to_numpy(np.float64))
    np.testing.assert_array_equal(scores.nearest[~member], test_rows.nearest_dist.to_numpy(np.float64))
    for name in ("energy", "retrieved", "nearest"):
        assert metrics["scores"][name]["auc"]["value"] == pytest.approx(roc_auc_score(scores.label,
                                                                                      oriented(scores, metrics, name)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["query_run"]["folders"] == {"test": str(test_run.resolve()), "train": str(train_run.resolve())}


def test_a_test_split_run_alone_rates_no_member_on_energy_and_retrieved(geometry, tmp_path):
    data, _, test_run, _, _ = geometry
    assert run_cli(["score", data, "--out", tmp_path / "score", "--query-run", test_run, "--resamples", "20"])[0] == 0
    metrics = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert metrics["skipped"] == {"energy": "rates no member", "retrieved": "rates no member"}
    assert {"nearest", "inside_ball"} <= set(metrics["scores"])


def relayered(run, to, layer):
    """A copy of the run `run` in `to` whose summary (re-signed) names its one layer `layer`."""
    to.mkdir()
    for path in run.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    summary = json.loads((run / "summary.json").read_text())
    summary.pop(files.SELF_SHA256)
    summary["layers"] = [{**summary["layers"][-1], "layer": layer}]
    files.write_json_atomic(to / "summary.json", files.signed(summary))
    return to


def test_query_runs_that_do_not_fit_together_are_one_line_errors(geometry, tmp_path, capsys):
    data, index, test_run, train_run, _ = geometry
    other_index, not_loo, other_k = tmp_path / "index-of-test", tmp_path / "not-loo", tmp_path / "k2"
    for argv in (["index", data, "--split", "test", "--out", other_index, "--factory", "Flat"],
                 ["query", other_index, "--queries", data, "--split", "train", "--out", not_loo, "--k", "3"],
                 ["query", index, "--queries", data, "--out", other_k, "--k", "2"]):
        assert run_cli(argv)[0] == 0, argv[0]
    capsys.readouterr()
    layer = json.loads((train_run / "summary.json").read_text())["layers"][-1]["layer"]
    cases = {
        (test_run, not_loo): "queried the train split against an index of other patterns",
        (test_run, test_run): "both queried the test split",
        (other_k, train_run): "searched another index or with other settings",
        (test_run, relayered(train_run, tmp_path / "relayered", layer + 1)): "the runs must share a site and layer",
    }
    for (first, second), message in cases.items():
        code, err = run_cli(["score", data, "--out", tmp_path / "score", "--query-run", first, "--query-run", second],
                            capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
