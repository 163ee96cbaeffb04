"""`memscan show` and memscan.show.top: a folder's top examples by a column, with their texts, for a query run
(a query and its nearest training chunks), a scores folder (the most member-like chunks) and a verbatim folder
(prompt, true suffix, the model's suffix token by token)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from transformers import AutoTokenizer

from memscan import files, models, query, score, show, store, verbatim
from memscan.cli import main
from memscan.errors import DataError
from memscan.extract import ExtractSettings, extract
from memscan.knn import index
from tests.fixtures.make_fixtures import EXTRACT
from tests.test_trust_data import one_line_error


@pytest.fixture(scope="module")
def folders(qf_model, tmp_path_factory) -> Path:
    """A dataset over the tiny QF model, its index, a query run, a verbatim folder and a scores folder."""
    out = tmp_path_factory.mktemp("show")
    torch.manual_seed(0)
    extract(ExtractSettings(model=str(qf_model), **EXTRACT), out / "dataset")
    index.build(out / "dataset", out / "index", index.IndexSettings())
    query.run(out / "index", out / "dataset", out / "run", query.QuerySettings(k=3, device="cpu"))
    verbatim.run(verbatim.VerbatimSettings(data=str(out / "dataset"), num_chunks=4, prompt_tokens=8, suffix_tokens=8,
                                           batch_size=4, resamples=20, device="cpu"), out / "verbatim")
    score.score(score.ScoreSettings(data=str(out / "dataset"), query_run=(str(out / "run"),), resamples=20,
                                    device="cpu"), out / "scores")
    return out


def chunk_of_rows(dataset: Path, row_ids) -> pd.DataFrame:
    """(doc_id, chunk_id) of each row id, read from the shards themselves."""
    rows = pq.read_table(sorted(dataset.rglob("part-*.parquet")), columns=["row_id", "doc_id", "chunk_id"]).to_pandas()
    return rows.set_index("row_id").loc[list(row_ids)]


def test_a_query_run_shows_its_nearest_queries_with_their_neighbours_texts(folders):
    kind, frame = show.top(folders / "run", n=4)
    queries = pd.read_parquet(folders / "run" / "queries.parquet")
    last = queries[queries.layer == queries.layer.max()]            # the index holds the last layer
    assert kind == "query run" and len(frame) == 4
    np.testing.assert_array_equal(frame.nearest_dist, np.sort(last.nearest_dist.to_numpy())[:4])
    texts = store.chunks_with_text(folders / "dataset", frame.doc_id, frame.chunk_id).text
    assert list(frame.text) == list(texts) and all(len(t) > 20 for t in frame.text)
    for _, example in frame.iterrows():
        neighbours = example.neighbours
        assert [n["rank"] for n in neighbours] == [1, 2, 3]
        assert neighbours[0]["dist"] == pytest.approx(example.nearest_dist)
        assert [n["dist"] for n in neighbours] == sorted(n["dist"] for n in neighbours)
        where = chunk_of_rows(folders / "dataset", [n["row_id"] for n in neighbours])
        truth = store.chunks_with_text(folders / "dataset", where.doc_id, where.chunk_id).text
        assert [n["text"] for n in neighbours] == list(truth)
    _, farthest = show.top(folders / "run", by="nearest_dist", n=2, ascending=False)
    np.testing.assert_array_equal(farthest.nearest_dist, np.sort(last.nearest_dist.to_numpy())[::-1][:2])


def test_a_scores_folder_shows_the_most_member_like_chunks_by_each_score(folders):
    scores = pd.read_parquet(folders / "scores" / "scores.parquet")
    sides = json.loads((folders / "scores" / "metrics.json").read_text())["orientation"]
    for name in ("loss", "min_k", "zlib"):
        _, frame = show.top(folders / "scores", by=name, n=3)
        values = scores[name].to_numpy()
        best = np.sort(values)[:3] if sides[name] == "smaller" else np.sort(values)[::-1][:3]
        np.testing.assert_allclose(frame[name], best)
        truth = store.chunks_with_text(folders / "dataset", frame.doc_id, frame.chunk_id)
        assert list(frame.text) == list(truth.text) and list(frame.split) == list(truth.split)
    assert sides["loss"] == "smaller"
    _, frame = show.top(folders / "scores", by="loss", n=2, ascending=False)
    np.testing.assert_allclose(frame.loss, np.sort(scores.loss.to_numpy())[::-1][:2])


def test_a_verbatim_folder_shows_the_suffixes_token_by_token(folders):
    _, frame = show.top(folders / "verbatim", n=8)
    table = pd.read_parquet(folders / "verbatim" / "verbatim.parquet")
    assert len(frame) == 8 and list(frame.match_fraction) == sorted(table.match_fraction, reverse=True)
    for _, row in frame.iterrows():
        matches = [token["match"] for token in row.tokens]
        assert len(matches) == 8 and np.mean(matches) == pytest.approx(row.match_fraction)   # decoded as recorded
        assert row.leading_match == (matches + [False]).index(False)
        assert [t["true"].strip() for t in row.tokens] == row.true_suffix.split()
    assert frame.prompt.str.len().min() > 0


def test_the_command_prints_text_json_and_csv(folders, capsys):
    assert run(capsys, "show", str(folders / "scores"), "--top", "2", "--by", "loss") == 0
    text = capsys.readouterr().out
    assert text.startswith("#1 doc ") and "loss=" in text and "#2 doc " in text and "#3" not in text
    run(capsys, "show", str(folders / "run"), "--top", "3", "--format", "json")
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3 and all(len(r["neighbours"]) == 3 and r["text"] for r in records)
    run(capsys, "show", str(folders / "verbatim"), "--top", "2", "--format", "csv")
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(rows) == 2 and all(len(json.loads(cell)) == 8 for cell in rows.tokens)
    run(capsys, "show", str(folders / "verbatim"), "--top", "1")
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("    model"))
    first = show.top(folders / "verbatim", n=1)[1].tokens[0]
    assert model_line.split("   (")[0].count("[") == sum(token["match"] for token in first)   # the matching tokens in brackets


def run(capsys, *args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def test_bad_requests_are_one_line(folders, capsys):
    line = one_line_error(capsys, "show", str(folders / "scores"), "--by", "nope")
    assert "no column 'nope' to rank by; the columns are: doc_id, chunk_id, split, label, loss" in line
    assert "`memscan show` shows a query run" in one_line_error(capsys, "show", str(folders / "dataset"))
    assert "at least 1" in one_line_error(capsys, "show", str(folders / "run"), "--top", "0")


@pytest.fixture(scope="module")
def weightless(qf_model, tmp_path_factory) -> Path:
    """A verbatim folder (version 2) whose dataset's model lost its weights after the run; its tokenizer stays."""
    out = tmp_path_factory.mktemp("weightless")
    model = Path(shutil.copytree(qf_model, out / "model"))
    extract(ExtractSettings(model=str(model), **EXTRACT), out / "dataset")
    verbatim.run(verbatim.VerbatimSettings(data=str(out / "dataset"), num_chunks=4, prompt_tokens=8, suffix_tokens=8,
                                           batch_size=4, resamples=20, device="cpu"), out / "verbatim")
    weights = [path for path in model.iterdir() if path.suffix in models.WEIGHT_SUFFIXES]
    assert weights
    for path in weights:
        path.unlink()
    return out


def as_version_1(folder: Path, to: Path) -> Path:
    """A copy of a verbatim folder as format version 1 wrote it: no `model_suffix_ids`, its record re-signed."""
    shutil.copytree(folder, to)
    table = pq.read_table(to / "verbatim.parquet")
    pq.write_table(table.drop_columns(["model_suffix_ids"]), to / "verbatim.parquet")
    summary = json.loads((to / "summary.json").read_text())
    summary.pop(files.SELF_SHA256)
    summary.update(format_version=1, tables=[files.file_entry(to / entry["name"]) for entry in summary["tables"]])
    files.write_json_atomic(to / "summary.json", files.signed(summary))
    return to


def test_a_version_2_folder_shows_the_stored_tokens_with_the_tokenizer_alone(weightless, tmp_path, capsys):
    _, frame = show.top(weightless / "verbatim", n=8)
    stored = pd.read_parquet(weightless / "verbatim" / "verbatim.parquet").set_index(["doc_id", "chunk_id"])
    decode = AutoTokenizer.from_pretrained(weightless / "model").decode
    assert len(frame) == 8 and "model_suffix_ids" not in frame
    for _, row in frame.iterrows():
        ids = [int(i) for i in stored.loc[(row.doc_id, row.chunk_id), "model_suffix_ids"]]
        assert row.model_suffix == decode(ids)
        assert [token["model"] for token in row.tokens] == [decode([i]) for i in ids]
        matches = [token["match"] for token in row.tokens]
        assert np.mean(matches) == pytest.approx(row.match_fraction)
        assert row.leading_match == (matches + [False]).index(False)
    assert run(capsys, "show", str(weightless / "verbatim"), "--top", "2") == 0
    assert capsys.readouterr().out.startswith("#1 doc ")
    with pytest.raises(DataError, match="weights sha256"):           # decoding again would need the weights gone
        show.top(as_version_1(weightless / "verbatim", tmp_path / "old"), n=1)


def test_a_version_1_folder_still_shows_the_suffixes_decoded_again(folders, tmp_path):
    old = as_version_1(folders / "verbatim", tmp_path / "old")
    assert json.loads((old / "summary.json").read_text())["format_version"] == 1
    assert "model_suffix_ids" not in pq.read_schema(old / "verbatim.parquet").names
    _, then = show.top(old, n=8)
    _, now = show.top(folders / "verbatim", n=8)
    assert list(then.columns) == list(now.columns)
    pd.testing.assert_frame_equal(then, now)
