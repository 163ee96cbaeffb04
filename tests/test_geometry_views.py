"""`memscan score --geometry views`: the nearest other member at every view, against brute force in float64."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from memscan import geometry, membership, store
from memscan.cli import main
from memscan.extract import extract
from memscan.knn import exact
from tests.test_trust_data import tiny_extract


@pytest.fixture(scope="module")
def data(qf_model, tmp_path_factory):
    """A tiny dataset: the residual stream at every layer and mlp_out at every block, every 8th position."""
    out = tmp_path_factory.mktemp("views") / "data"
    extract(tiny_extract(qf_model, positions="every:8", sites="mlp_out:all", layers="all", vec_dtype="float32",
                         test_fraction=0.4, shard_rows=400), out)
    return out


def rated_rows(data, site, layer):
    """(chunk (r,), split (r,), X float64 (r, n)) of a view's train and test rows, in row order."""
    dataset = store.ActivationDataset(data, site)
    per_chunk = dataset.manifest["rows_per_chunk"]
    parts = [(meta["row_id"] // per_chunk, np.full(len(X), split), X.astype(np.float64))
             for split in geometry.RATED_SPLITS
             for X, meta in dataset.iter_batches(split=split, layer=layer)]
    return tuple(np.concatenate(part) for part in zip(*parts))


def brute_force(chunk, split, X):
    """Each row's distance to the nearest train row of another chunk, in float64."""
    members = split == "train"
    distance = np.sqrt(((X[:, None, :] - X[None, members, :]) ** 2).sum(-1))      # (r, members)
    distance[chunk[:, None] == chunk[None, members]] = np.inf
    return distance.min(axis=1)


def test_every_view_matches_brute_force_and_leaves_its_own_chunk_out(data):
    manifest = store.read_manifest(data)
    views = geometry.views(manifest)
    assert len({site for site, _ in views}) == 2 and len(views) > 3
    for site, layer in views:
        chunks, distance, nearest = geometry.nearest_member(data, site, layer, exact.FaissBackend(), rows=50)
        chunk, split, X = rated_rows(data, site, layer)
        assert np.array_equal(chunks, chunk) and (split == "train").sum() > 2 * 50   # several blocks of each side
        np.testing.assert_allclose(distance, brute_force(chunk, split, X), rtol=1e-5, atol=1e-5)
        member_chunks = np.unique(chunk[split == "train"])
        assert np.isin(nearest, member_chunks).all()
        assert not (nearest == chunks).any()                  # leave-one-chunk-out: never a row of its own chunk


def test_the_own_chunk_would_have_been_nearer(data):
    """The exclusion matters: without it some member's nearest row is one of its own chunk's other positions."""
    chunk, split, X = rated_rows(data, "hidden", 1)
    members = split == "train"
    distance = np.sqrt(((X[members, None, :] - X[None, members, :]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    nearest = np.argmin(distance, axis=1)
    assert (chunk[members][nearest] == chunk[members]).any()


def test_mean_and_max_over_a_chunks_rows():
    chunks = np.array([7, 3, 7, 3, 3, 9])
    values = np.array([-1.0, -2.0, -3.0, -4.0, -0.5, -6.0])
    out = geometry.aggregate(chunks, values, np.array([3, 5, 7, 9]))
    np.testing.assert_allclose(out["mean"], [-6.5 / 3, np.nan, -2.0, -6.0])
    np.testing.assert_allclose(out["max"], [-0.5, np.nan, -1.0, -6.0])


def test_holm_against_a_hand_computation():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone at 0.06
    np.testing.assert_allclose(geometry.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(geometry.holm([0.5, 0.6]), [1.0, 1.0])


def test_the_one_sided_p_agrees_with_the_auc():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 30)
    values = rng.normal(size=60) + 1.5 * labels
    assert geometry.greater_p(values, labels) < 0.01 < geometry.greater_p(-values, labels)
    members, non_members = values[labels == 1], values[labels == 0]
    u = (members[:, None] > non_members[None, :]).sum()
    assert u / (30 * 30) == pytest.approx(membership.roc_auc(values, labels))


def test_score_writes_every_view_and_names_the_best(data, tmp_path, capsys):
    out = tmp_path / "score"
    with pytest.raises(SystemExit) as code:
        main(["score", str(data), "--out", str(out), "--geometry", "views", "--resamples", "20", "--device", "cpu"])
    assert code.value.code == 0
    printed = capsys.readouterr().out
    table = pq.read_table(out / "scores.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    names = [geometry.column(site, layer, agg) for site, layer in geometry.views(store.read_manifest(data))
             for agg in geometry.AGGREGATIONS]
    assert list(metrics["geometry"]["views"]) == names and set(names) <= set(table.column_names)
    site, layer = geometry.views(store.read_manifest(data))[-1]
    chunks, distance, _ = geometry.nearest_member(data, site, layer)
    rated = np.flatnonzero(np.isin(store.read_chunk_table(data)["split"], geometry.RATED_SPLITS))
    np.testing.assert_allclose(table.column(geometry.column(site, layer, "max")).to_numpy(),
                               geometry.aggregate(chunks, -distance, rated)["max"])
    labels = table.column("label").to_numpy()
    rows = metrics["geometry"]["views"]
    for name in names:
        auc = membership.roc_auc(table.column(name).to_numpy(), labels)
        assert rows[name]["auc"]["value"] == pytest.approx(auc)
    adjusted = geometry.holm([rows[name]["p"] for name in names])
    assert [rows[name]["p_holm"] for name in names] == pytest.approx(adjusted.tolist())
    best = metrics["geometry"]["best_view"]
    assert best["p_holm"] == min(adjusted) and best["method"] == geometry.CORRECTION
    assert f"best view {best['name']}" in printed and "nearest" not in metrics["scores"]
