"""The query stage: every summary number recomputed with numpy from the shards; the report; bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.special import gammainc, logsumexp

import memscan
from memscan import store
from memscan.cli import main
from memscan.extract import ExtractSettings, extract
from memscan.knn.index import build
from memscan.query import QuerySettings, run
from memscan.report import render


@pytest.fixture(scope="module")
def pipeline(qf_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    extract(ExtractSettings(model=str(qf_model), source="qf:documents=30,lines=16", chunk_tokens=32,
                            layers="1,2", positions="every:8", test_fraction=0.3, dtype="fp32",
                            vec_dtype="float32", seed=2), root / "data")
    build(root / "data", root / "index")
    run(root / "index", root / "data", root / "run", QuerySettings(k=4, beta=0.5, subsets=(0.5, 1.0)))
    return {"root": root, "data": root / "data", "index": root / "index", "run": root / "run"}


def shard_frame(data: Path) -> pd.DataFrame:
    return pq.read_table(sorted(data.glob("vectors/part-*.parquet"))).to_pandas()


@pytest.mark.parametrize("layer", [1, 2])
def test_summary_equals_a_numpy_recomputation_from_the_shards(pipeline, layer):
    frame = shard_frame(pipeline["data"])
    frame = frame[frame.layer == layer]
    train, test = frame[frame.split == "train"], frame[frame.split == "test"]
    P = np.stack(train.vec.to_numpy()).astype(np.float64)
    Q = np.stack(test.vec.to_numpy()).astype(np.float64)
    d, n = P.shape
    pp = ((P[:, None] - P[None]) ** 2).sum(-1)
    np.fill_diagonal(pp, np.inf)
    qp = ((Q[:, None] - P[None]) ** 2).sum(-1)
    s, q_near = np.sqrt(pp.min(1)), np.sqrt(qp.min(1))

    summary = json.loads((pipeline["run"] / "summary.json").read_text())
    got = next(x for x in summary["layers"] if x["layer"] == layer)
    assert (got["d"], got["d_prime"], got["n"], got["search"]) == (d, len(Q), n, "exact")
    close = lambda a, b: a == pytest.approx(b, rel=1e-6, abs=1e-9)  # noqa: E731
    for name, values in (("query_nearest_dist", q_near), ("pattern_nearest_dist", s)):
        assert close(got[name]["mean"], values.mean()) and close(got[name]["median"], np.median(values))
        assert close(got[name]["q05"], np.quantile(values, 0.05)) and close(got[name]["q95"], np.quantile(values, 0.95))
    r_star, typical = math.sqrt(n / (2 * math.pi * math.e)), np.median(s) / 2
    assert close(got["r_star"], r_star) and close(got["typical_radius"], typical)
    assert close(got["A2"]["coverage_at_r_star"], (q_near <= r_star).mean())
    assert close(got["A2"]["coverage_at_typical"], (q_near <= typical).mean())
    assert close(got["A3"]["disjoint_at_r_star"], (s > 2 * r_star).mean())
    assert close(got["typical_over_r_star"], typical / r_star) and got["radius"] == {"mode": "r*", "value": got["r_star"]}
    assert close(got["A2"]["coverage_at_radius"], (q_near <= r_star).mean())
    assert close(got["A3"]["disjoint_at_radius"], (s > 2 * r_star).mean())
    assert close(got["A3"]["max_norm"], math.sqrt((P * P).sum(1).max()))

    gram = P @ P.T
    delta = np.diag(gram) - np.where(np.eye(d, dtype=bool), -np.inf, gram).max(1)
    M2 = np.diag(gram).max()
    beta = 0.5
    threshold = 2 / (beta * d) + math.log(2 * (d - 1) * d * beta * M2) / beta
    assert close(got["A3"]["ramsauer_threshold"], threshold)
    assert close(got["A3"]["ramsauer_well_separated"], (delta >= threshold).mean())
    log_z = logsumexp(0.5 * n * math.log(math.pi) + np.log(gammainc(n / 2, (s / 2) ** 2)))
    assert close(got["floor"]["log_z"], log_z) and close(got["floor"]["predicted_floor"], log_z + math.exp(-log_z))

    assert close(got["A1"]["train_loss"], train.nll.mean()) and close(got["A1"]["test_loss"], test.nll.mean())
    assert close(got["A1"]["loss_gap"], test.nll.astype(float).mean() - train.nll.astype(float).mean())
    nearest_next = train.next_token_id.to_numpy()[qp.argmin(1)]
    assert close(got["A1"]["next_token_agreement"], (nearest_next == test.next_token_id.to_numpy()).mean())
    manifest = store.read_manifest(pipeline["data"])
    D = manifest["chunk_tokens"] * d
    assert got["size"] == {"N": manifest["model"]["num_parameters"], "D": D, "chunk_tokens": 32,
                           "N_over_D2": pytest.approx(manifest["model"]["num_parameters"] / D**2, rel=1e-12)}

    tables = memscan.load(pipeline["run"])
    q = tables.queries[tables.queries.layer == layer]
    exact_E = -logsumexp(-beta * qp, axis=1) / beta
    assert (q.energy_lower.to_numpy() <= exact_E + 1e-9).all() and (exact_E <= q.energy_upper.to_numpy() + 1e-9).all()
    mchn = -logsumexp(beta * Q @ P.T, axis=1) / beta + 0.5 * (Q * Q).sum(1) + math.log(d) / beta + 0.5 * M2
    np.testing.assert_allclose(q.mchn_energy, mchn, rtol=1e-9)
    assert close(got["energy"]["mean_mchn"], mchn.mean())
    top_ip = -np.sort(-(Q @ P.T), axis=1)[:, :4]                      # E_mchn's interval from the top 4 products
    rest = 0.5 * (Q * Q).sum(1) + math.log(d) / beta + 0.5 * M2
    lse_low = logsumexp(beta * top_ip, axis=1)
    lse_high = np.logaddexp(lse_low, math.log(d - 4) + beta * top_ip[:, -1])
    np.testing.assert_allclose(q.mchn_energy_lower, rest - lse_high / beta, rtol=1e-9)
    np.testing.assert_allclose(q.mchn_energy_upper, rest - lse_low / beta, rtol=1e-9)
    assert (q.mchn_energy_lower <= mchn + 1e-9).all() and (mchn <= q.mchn_energy_upper + 1e-9).all()
    assert close(got["energy"]["mean_mchn_lower"], (rest - lse_high / beta).mean())
    assert close(got["energy"]["mean_mchn_upper"], (rest - lse_low / beta).mean())
    assert got["energy"]["mchn_top_k_recall"] is None and got["A3"]["inner_products"]["search"] == "exact"
    assert close(got["A3"]["ramsauer_delta"]["median"], np.median(delta))
    top = np.sort(qp, axis=1)[:, :4]
    upper = -logsumexp(-beta * top, axis=1) / beta
    lower = -np.logaddexp(logsumexp(-beta * top, axis=1), math.log(d - 4) - beta * top[:, -1]) / beta
    assert close(got["energy"]["mean_upper"], upper.mean()) and close(got["energy"]["mean_lower"], lower.mean())

    epsilon = 0.01 * np.median(s)                      # retrieval, by an independent loop
    assert close(got["A1"]["epsilon"], epsilon)
    retrieved = []
    for x, order in zip(Q, np.argsort(qp, axis=1)[:, :4]):
        near, xi = P[order], x.copy()
        for _ in range(100):
            w = np.exp(-beta * ((near - xi) ** 2).sum(1) + beta * ((near - xi) ** 2).sum(1).min())
            new = w @ near / w.sum()
            step, xi = np.linalg.norm(new - xi), new
            if step < 1e-6 * np.median(s):
                break
        retrieved.append(step < 1e-6 * np.median(s) and np.linalg.norm(xi - near[0]) <= epsilon)
    assert np.array_equal(q.retrieved.to_numpy(), retrieved)
    assert close(got["A1"]["retrieval_rate"], np.mean(retrieved))
    pat = tables.patterns[tables.patterns.layer == layer]
    np.testing.assert_allclose(pat.nearest_other_dist, s, rtol=1e-6)
    np.testing.assert_allclose(pat.ramsauer_delta, delta, rtol=1e-6, atol=1e-6)
    nb = tables.neighbours[tables.neighbours.layer == layer]
    np.testing.assert_allclose(nb.sqdist, np.sort(qp, axis=1)[:, :4].ravel(), rtol=1e-6)
    np.testing.assert_allclose(nb.dist, np.sqrt(nb.sqdist))

    h = tables.histograms[tables.histograms.layer == layer]
    assert h[h.table == "query_nearest"]["count"].sum() == len(Q)
    full = h[h.table == "pattern_nearest_100"]
    edges = np.append(full.bin_left.to_numpy(), full.bin_right.to_numpy()[-1])
    assert full["count"].sum() == d  # the max s_i sits on the top edge, so bin the stored values
    assert np.array_equal(full["count"].to_numpy(), np.histogram(pat.nearest_other_dist, bins=edges)[0])
    assert h[h.table == "pattern_nearest_50"]["count"].sum() == d // 2
    subset, = got["subsets"]
    assert subset["fraction"] == 0.5 and subset["patterns"] == d // 2
    assert subset["from_lists"] + subset["searched"] == d // 2 and got["blocks"]["query_blocks"] == 1
    c = tables.coverage[tables.coverage.layer == layer]
    np.testing.assert_allclose(c.coverage, [(q_near <= r).mean() for r in c.radius])


def test_report_renders_with_every_image(pipeline):
    page = render(pipeline["run"])
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 4 and not list(pipeline["run"].glob("*.png"))
    assert "A2 coverage at r*" in text and "layer 1" in text and "layer 2" in text


def test_approximate_query_reports_its_recall(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(300, 8))
    X = (centers[rng.integers(0, 300, 52_000)] + 0.1 * rng.normal(size=(52_000, 8))).astype(np.float32)
    store.write_vectors(tmp_path / "data", X, ["train"] * 51_500 + ["test"] * 500, model="synthetic")
    build(tmp_path / "data", tmp_path / "index")
    summary = run(tmp_path / "index", tmp_path / "data", tmp_path / "run", QuerySettings(k=3, subsets=(1.0,)))
    layer = summary["layers"][0]
    assert layer["search"].startswith("approximate: IVF") and layer["recall"]["recall_1_at_1"] >= 0.95


def fails(capsys, *args: str, match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and match in err.strip().splitlines()[-1], err


def test_query_command_and_bad_input(capsys, pipeline, tmp_path):
    index, data = str(pipeline["index"]), str(pipeline["data"])
    with pytest.raises(SystemExit) as exit_info:
        main(["query", index, "--queries", data, "--out", str(tmp_path / "run"), "--k", "3", "--radius", "typical"])
    assert exit_info.value.code == 0 and "typical radius" in capsys.readouterr().out
    fails(capsys, "query", index, "--queries", data, "--out", str(tmp_path / "x"), "--beta", "0", match="--beta must be positive")
    fails(capsys, "query", index, "--queries", data, "--out", str(tmp_path / "x"), "--radius", "-2", match="--radius must be positive")
    fails(capsys, "query", index, "--queries", data, "--out", str(tmp_path / "x"), "--split", "validation", match="has no rows")
    other = tmp_path / "other"
    store.write_vectors(other, np.zeros((5, 7), np.float32), ["test"] * 5, model="other", layer=2)
    fails(capsys, "query", index, "--queries", str(other), "--out", str(tmp_path / "x"), match="dimension 7")
    fails(capsys, "report", str(tmp_path), match="is not a memscan folder of any kind")
    fails(capsys, "query", str(tmp_path), "--queries", data, "--out", str(tmp_path / "x"), match="not a memscan index")
