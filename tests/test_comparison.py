"""comparison.json: the run's scale beside the paper's, rows that cannot agree across scales, the kind and
source of every number (the paper's, or memscan's derivation), built from records directly."""

from __future__ import annotations

import pytest

from memscan import experiments
from memscan.experiments import comparison, spec
from memscan.experiments.tables import ExperimentError

RADIUS_PAPER = {"query": {"pattern_nearest_dist": {"median": 20.0}, "typical_over_r_star": 1.3},
                "source": {"query.pattern_nearest_dist.median": "Bai et al. 2024, Fig. 2"},
                "depends_on": {"query.pattern_nearest_dist.median": "width"},
                "scale": {"model": "gpt2-medium", "width": 1024, "layers": 24, "patterns": 80_000}}


def records(width: int, layers: int, patterns: int) -> dict[str, dict]:
    """A trained, extracted and queried run's records at this scale (the query run's last layer)."""
    return {"train": {"settings": {"n_embd": width, "n_layer": layers}, "data": {"train_tokens": 3200}},
            "extract": {"settings": {"layers": "last"}, "layers": [layers], "n": width, "corpus": {"tokens": 7171}},
            "query": {"n": width, "d": patterns, "typical_over_r_star": 0.08,
                      "pattern_nearest_dist": {"median": 0.22}}}


def test_a_run_at_another_scale_is_reduced_and_its_raw_distance_has_no_ratio():
    table = comparison.rows(RADIUS_PAPER, records(32, 2, 32).get)
    document = comparison.document({"experiment": {"name": "r", "reproduces": "x"}}, table)
    assert document["reduced"] is True and document["scale"]["run"] == {
        "width": 32, "layers": 2, "patterns": 32, "train_tokens": 3200, "corpus_tokens": 7171}
    assert document["scale_note"].startswith("reduced run: width n 32, the paper's 1,024; layers 2, the paper's 24")
    rows = {row["quantity"]: row for row in document["rows"]}
    raw = rows["query.pattern_nearest_dist.median"]
    assert raw["ratio"] is None and raw["measured"] == 0.22 and "width n 1,024" in raw["incomparable"]
    assert raw["source"] == "Bai et al. 2024, Fig. 2" and raw["kind"] == "paper"
    ratio = rows["query.typical_over_r_star"]   # dimensionless: compared at any width
    assert ratio["ratio"] == pytest.approx(0.08 / 1.3) and "incomparable" not in ratio
    assert ratio["source"] == comparison.NO_SOURCE   # a number without a source says so
    lines = comparison.text(table)
    assert lines[0].startswith("reduced run: ") and any("incomparable: holds at width n" in line for line in lines)


def test_a_run_at_the_papers_scale_is_not_reduced_and_its_distances_compare():
    table = comparison.rows(RADIUS_PAPER, records(1024, 24, 72_000).get)   # the train split: 90% of 80,000
    assert table.scale["reduced"] is False and comparison.scale_note(table.scale).startswith("at the paper's scale")
    raw = next(row for row in table if row["quantity"] == "query.pattern_nearest_dist.median")
    assert raw["ratio"] == pytest.approx(0.22 / 20.0) and "incomparable" not in raw


def test_a_paper_that_states_no_size_leaves_the_scale_unjudged():
    table = comparison.rows({"query": {"typical_over_r_star": 1.3}, "scale": {"model": "T5"}}, records(32, 2, 32).get)
    assert table.scale["reduced"] is None and "the paper's model: T5" in comparison.scale_note(table.scale)


def test_the_qf_entropy_rate_is_memscans_derivation_not_the_papers():
    plan = experiments.load("bai2024-qf").variants["qf-6"]
    run = {"train": {"settings": {"n_embd": 512, "n_layer": 6}, "data": {"train_tokens": 1_600_000},
                     "final_train_loss": 1.01, "final_heldout_loss": 1.02}}
    table = comparison.rows(plan["paper"], run.get)
    rows = {row["quantity"]: row for row in table}
    for quantity in ("train.final_train_loss", "train.final_heldout_loss"):
        assert rows[quantity]["kind"] == comparison.DERIVATION and rows[quantity]["derived"] == 1.003
        assert "paper" not in rows[quantity] and "memscan.qf.entropy_rate" in rows[quantity]["source"]
    floor = rows["query.floor.predicted_floor"]
    assert floor["kind"] == comparison.PAPER and floor["paper"] == 1.0 and "Proposition 4" in floor["source"]
    assert table.scale["reduced"] is False   # 6 layers, 512 wide, 1.6M of the paper's about 2M tokens


def test_an_interval_beside_the_measured_number_is_carried_with_the_paper_inside_or_not():
    paper = {"saturation": {"norm_growth": {"exponent": {"value": 0.5}}}}
    for low, high, inside in ((0.3, 0.6, True), (0.7, 0.9, False)):
        record = {"norm_growth": {"exponent": {"value": (low + high) / 2, "low": low, "high": high}}}
        row, = comparison.rows(paper, {"saturation": record}.get)
        assert row["interval"] == [low, high] and row["reference_in_interval"] is inside


@pytest.mark.parametrize("name", spec.shipped_names())
def test_every_shipped_number_quotes_its_source(name):
    experiment = experiments.load(name)
    for plan in (experiment.plan, *experiment.variants.values()):
        paper = plan.get("paper", {})
        sources = comparison.quantities(paper.get("source", {}))
        assert {".".join(keys) for keys in comparison.numbers(paper)} <= set(sources)
        assert all(not text.startswith("memscan's derivation") or kind == comparison.DERIVATION
                   for keys, (kind, _) in comparison.numbers(paper).items()
                   for text in [sources[".".join(keys)]])


@pytest.mark.parametrize("table, message", [
    ({"query": {"r_star": 7.74}, "source": {"query.typical_radius": "x"}}, "paper.source.query.typical_radius: names no"),
    ({"query": {"r_star": 7.74}, "source": {"query.r_star": 3}}, "paper.source.query.r_star: must be a string"),
    ({"query": {"r_star": 7.74}, "depends_on": {"query.r_star": "depth"}}, "must be one of width, layers"),
    ({"query": {"r_star": 7.74}, "scale": {"width": -1}}, "paper.scale.width: must be a positive number"),
    ({"query": {"r_star": 7.74}, "scale": {"depth": 3}}, "paper.scale.depth: unknown key"),
    ({"derived": {"assoc": {"x": 1.0}}}, "paper.derived.assoc.x: names no measured stage"),
])
def test_the_papers_own_tables_are_checked(table, message):
    document = spec.read(spec.locate("bai2024-radius"))
    document["paper"] = table
    with pytest.raises(ExperimentError, match=message.replace("*", r"\*")):
        spec.resolve("bai2024-radius.toml", document, "bai2024-radius")
