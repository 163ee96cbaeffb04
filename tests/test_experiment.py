"""`memscan run EXPERIMENT.toml`: experiment files checked as a whole, run stage by stage, rerun only where
something changed; the shipped experiments validate and their reduced settings run end to end."""

from __future__ import annotations

import json
import math
import shlex
import tomllib
from pathlib import Path

import pytest

from memscan import demo, experiments, folders, query, store
from memscan.cli import main
from memscan.experiments import comparison, spec
from memscan.experiments.toml_text import dumps
from memscan.files import LOCK_FILE

SHIPPED = ("bai2024-owt-budgets", "bai2024-qf", "bai2024-radius", "cabannes2024-assoc", "demo", "merrill2021-norms")


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def reduced_command(name: str, out: Path) -> list[str]:
    """The `memscan run` arguments of the reduced line in a shipped experiment's header, into `out`."""
    lines = (spec.SHIPPED_DIR / f"{name}.toml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   memscan run"))
    command = ""
    for line in lines[start:]:
        command += line.lstrip("#").strip().removesuffix("\\") + " "
        if not line.endswith("\\"):
            break
    args = shlex.split(command)[2:]   # after `memscan run`
    assert args[0] == f"experiments/{name}.toml" and args[1] == "--out"
    return [name, "--out", str(out), *args[3:]]


def mtimes(folder: Path) -> dict[Path, int]:
    """Every file's modification time, the folder locks aside (each job writes its holder into them)."""
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file() and path.name != LOCK_FILE}


# ---------------------------------------------------------------- the files, without running anything


def test_the_repository_folder_is_the_shipped_one():
    root = Path(__file__).resolve().parents[1] / "experiments"
    assert sorted(p.stem for p in root.glob("*.toml")) == list(SHIPPED) == spec.shipped_names()
    assert root.resolve() == spec.SHIPPED_DIR.resolve()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_experiment_validates_and_its_resolved_file_round_trips(name, tmp_path):
    experiment = experiments.load(name)   # hub ids are named, never loaded: the tests run offline
    assert experiment.name == name and experiment.plan["experiment"]["reproduces"]
    plans = [experiment.plan, *experiment.variants.values()]
    assert any(plan.get("paper") for plan in plans), "each shipped experiment compares with the paper"
    path = tmp_path / "experiment.toml"
    path.write_text(experiments.resolved_text(experiment))
    again = experiments.load(str(path))
    assert (again.plan, again.variants) == (experiment.plan, experiment.variants)
    assert experiments.resolved_text(again).split("\n", 3)[3] == experiments.resolved_text(experiment).split("\n", 3)[3]


def test_full_size_experiments_name_the_hub_and_the_paper_numbers():
    radius = experiments.load("bai2024-radius").plan
    assert (radius["model"]["id"], radius["source"]["id"]) == ("gpt2-medium", "hf:Skylion007/openwebtext")
    assert (radius["extract"]["num_chunks"], radius["extract"]["chunk_tokens"]) == (80_000, 256)
    assert radius["paper"]["query"]["r_star"] == 7.74 and radius["query"]["subsets"] == (0.25, 0.5, 0.75, 1.0)
    budgets = experiments.load("bai2024-owt-budgets")
    assert [plan["train"]["tokens"] for plan in budgets.variants.values()] == [9_000_000, 90_000_000, 2_000_000_000]
    assert budgets.variants["0_1pct"]["paper"]["train"]["final_train_loss"] == 0.0
    qf = experiments.load("bai2024-qf")
    assert {name: plan["train"]["n_layer"] for name, plan in qf.variants.items()} == {"qf-6": 6, "qf-10": 10}
    assert qf.plan["paper"]["derived"]["train"]["final_train_loss"] == 1.003 and "train" not in qf.plan["paper"]


def test_extracting_a_trained_model_takes_its_split_and_chunk_length():
    plan = experiments.load("bai2024-qf").plan
    assert plan["extract"]["chunk_tokens"] == plan["train"]["context"] == 64
    assert (plan["extract"]["test_fraction"], plan["extract"]["seed"]) == (0.1, 0)
    assert plan["extract"]["max_documents"] is None and "model" in plan and plan["model"]["id"] is None


def test_the_toml_writer_round_trips_through_tomllib():
    document = {
        "experiment": {"name": 'quote " backslash \\ tab \t newline \n del \x7f é 😀', "reproduces": ""},
        "numbers": {"int": -3, "big": 2_000_000_000, "float": 0.1, "tiny": 1e-5, "huge": 1e20, "whole": 4.0,
                    "yes": True, "no": False, "list": [0.25, 0.5], "words": ["a", "b c"], "empty": []},
        "paper": {"query": {"pattern_nearest_dist": {"median": 20.0}}, "score": {"scores": {"tpr@1%fpr": 0.5}}},
        "variant": {"qf-6": {"train": {"n_layer": 6}}, "0_1pct": {"train": {"tokens": 9}}},
        "report": {},
        "unset": {"kept": 1, "dropped": None},
    }
    text = dumps(document, "a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    expected = {**document, "unset": {"kept": 1}}
    assert tomllib.loads(text) == expected
    assert "# not set (the default applies): dropped" in text


@pytest.mark.parametrize("item, key, value", [
    ("query.k=20", ("query", "k"), 20),
    ("extract.layers=6", ("extract", "layers"), "6"),          # a key that takes a string keeps the text
    ("extract.layers=0,6,-1", ("extract", "layers"), "0,6,-1"),
    ("source.id=qf:lines=16", ("source", "id"), "qf:lines=16"),
    ("query.subsets=[0.5, 1.0]", ("query", "subsets"), [0.5, 1.0]),
    ("train={n_layer = 2}", ("train", "n_layer"), 2),           # merges into the table
    ("train={n_layer = 2}", ("train", "n_embd"), 64),
    ("variant.qf-6.train.n_layer=3", ("variant", "qf-6", "train", "n_layer"), 3),
])
def test_set_reads_toml_values_and_merges_tables(item, key, value):
    document = spec.apply_sets({"train": {"n_embd": 64, "n_layer": 6}, "model": {"id": "gpt2"}}, [item])
    for part in key:
        document = document[part]
    assert document == value


def test_set_with_nothing_after_the_sign_removes_the_key():
    document = spec.apply_sets({"model": {"id": "gpt2", "revision": "main"}}, ["model.id="])
    assert document == {"model": {"revision": "main"}}
    with pytest.raises(spec.InputError, match="expected KEY=VALUE"):
        spec.apply_sets({}, ["query.k"])
    with pytest.raises(spec.InputError, match="query.k is a value, not a table"):
        spec.apply_sets({"query": {"k": 5}}, ["query.k.x=1"])


BAD_FILES = [
    ("[query]\nkk = 3\n[index]\n[extract]\n[model]\nid='m'\n[source]\nid='qf'\n", "query.kk: unknown key; [query] takes split, k,"),
    ("[query]\nk = 'ten'\n", "query.k: must be an integer; got \"ten\""),
    ("[query]\nk = 0\n[index]\n[extract]\n[model]\nid='m'\n[source]\nid='qf'\n", "query.k: --k must be at least 1; got 0"),
    ("[index]\nlayer = 7\n[extract]\n[model]\nid='gpt2-medium'\n[source]\nid='qf'\n",
     "index.layer: 7 is not extracted (extract.layers = last)"),
    ("[index]\nlayer = 7\n[extract]\nlayers = 'all'\n[train]\ntokens = 100\nn_layer = 2\n[source]\nid='qf'\n",
     "index.layer: 7 is not extracted (extract.layers = all)"),
    ("[index]\nsplit = 'gen'\n[extract]\n[model]\nid='m'\n[source]\nid='qf:gen=0'\n",
     "index.split: 'gen' is not a split the extraction writes (test, train)"),
    ("[score]\n", "score: needs an [extract] table"),
    ("[extract]\nmax_documents = 5\n[train]\ntokens = 100\n[source]\nid='qf'\n",
     "extract.max_documents: the extraction reads the documents [train] trained on"),
    ("[extract]\nseed = 3\n[train]\ntokens = 100\n[source]\nid='qf'\n",
     "extract.seed: 3 differs from train.seed = 0"),
    ("[extract]\n[model]\nid='m'\n[source]\nid='qf'\n[train]\ntokens = 10\n", "model.id: the model is the one [train] trains"),
    ("[extract]\n[source]\nid='qf'\n", "model.id: required"),
    ("[train]\n[source]\nid='qf'\n", "train.tokens: required"),
    ("[train]\ntokens = 10\n[source]\nid='qf:bogus=1'\n", "source.id: unknown qf option 'bogus'"),
    ("[train]\ntokens = 10\n[source]\nid='qf'\nsplit='validation'\n", "source.split: --hf-split applies to hf: sources only"),
    ("[assoc]\nalpha = 0.5\n", "assoc.alpha: alpha must be above 1"),
    ("[assoc]\ndims = [10, 'x']\n", "assoc.dims: must be a list of integers"),
    ("[assoc]\n[paper]\nquery.typical_radius = 10.0\n", "paper.query.typical_radius: names no measured stage"),
    ("[assoc]\n[paper]\nassoc.slopes.p.slope = 'steep'\n", "paper.assoc.slopes.p.slope: must be a finite number"),
    ("[assoc]\n[model]\nid='gpt2'\n", "model: no stage of this experiment reads it"),
    ("[queries]\n", "queries: unknown table"),
    ("[assoc]\n[variant.'bad name']\nassoc.seeds = 2\n", "variant.bad name: a variant's name is its folder's"),
    ("[assoc]\n[variant.small]\nassoc.seeds = 0\n", "variant.small.assoc: need at least 2 classes and 1 seed"),
    ("[query\nk = 3\n", "not valid TOML: "),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(capsys, tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out, err = run(capsys, "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"memscan: error: {path}: ") and message in err, err
    assert not (tmp_path / "out").exists()   # checked before anything runs


def test_a_missing_file_a_bad_set_and_a_folder_of_another_kind_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == 1 and "nope.toml: no such experiment file (shipped: bai2024-owt-budgets" in err
    code, _, err = run(capsys, "run", "demo", "--set", "query.k", "--out", str(tmp_path / "a"))
    assert code == 1 and "--set 'query.k': expected KEY=VALUE" in err
    code, _, err = run(capsys, "run", "demo", "--set", "query.k=0", "--out", str(tmp_path / "a"))
    assert code == 1 and "demo.toml: query.k: --k must be at least 1; got 0" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "run", "demo", "--out", str(foreign))
    assert code == 1 and "holds files memscan did not write (notes.txt)" in err
    assert sorted(p.name for p in foreign.iterdir()) == [".memscan.lock", "notes.txt"]


def test_check_prints_the_resolved_experiment_and_runs_nothing(capsys, tmp_path):
    code, out, _ = run(capsys, "run", "bai2024-qf", "--check", "--set", "query.k=7", "--out", str(tmp_path / "x"))
    assert code == 0 and not (tmp_path / "x").exists()
    document = tomllib.loads(out)
    assert document["query"]["k"] == 7 and document["train"]["n_head"] == 4 and document["index"]["factory"] == "auto"
    assert document["variant"] == {"qf-6": {"paper": {"scale": {"layers": 6}}},   # the paper's depth: each variant's
                                   "qf-10": {"train": {"n_layer": 10}, "paper": {"scale": {"layers": 10}}}}
    assert "--set query.k=7" in out.splitlines()[0]


# ---------------------------------------------------------------- running


# The quick demo (`memscan demo --quick`) on a quarter of its tokens, half of them held out (tests/test_cli.py
# runs the quick demo itself).
SMALL_DEMO = (*demo.settings(quick=True), "train={tokens=3000, test_fraction=0.5}")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The small demo, run once."""
    folder = tmp_path_factory.mktemp("demo")
    experiments.run(experiments.load("demo", SMALL_DEMO), folder)
    return folder


def test_the_demo_header_line_is_the_quick_size(tmp_path):
    args = reduced_command("demo", tmp_path)
    sets = tuple(args[i + 1] for i, arg in enumerate(args) if arg == "--set")
    assert experiments.load("demo", sets).plan == experiments.load("demo", demo.settings(quick=True)).plan


def test_the_demo_is_the_shipped_experiment_and_reports_against_the_paper(demo_run):
    resolved = tomllib.loads((demo_run / "experiment.toml").read_text())
    assert resolved["train"]["n_layer"] == 2 and resolved["query"]["k"] == 5 and resolved["extract"]["layers"] == "all"
    stages = json.loads((demo_run / "stages.json").read_text())["stages"]
    assert list(stages) == ["train", "extract", "index", "query", "saturation", "report"]
    summary = query.read_summary(demo_run / "run")
    rows = json.loads((demo_run / "comparison.json").read_text())["rows"]
    trained = json.loads((demo_run / "train" / "run.json").read_text())
    assert rows == json.loads((demo_run / "run" / "comparison.json").read_text())["rows"]
    measured = {row["quantity"]: row for row in rows}
    loss, floor = measured["train.final_heldout_loss"], measured["query.floor.predicted_floor"]
    assert loss["measured"] == trained["final_heldout_loss"] and math.isclose(loss["ratio"], loss["measured"] / 1.003)
    assert loss["kind"] == "memscan's derivation" and loss["derived"] == 1.003 and "paper" not in loss
    verdict = summary["layers"][-1]["floor"]["verdict"]
    if verdict["applicable"]:
        assert floor["measured"] == summary["layers"][-1]["floor"]["predicted_floor"] and floor["paper"] == 1.0
    else:   # a floor whose premises fail is a verdict, not a figure to divide by the paper's
        assert floor["measured"] is None and floor["ratio"] is None and floor["paper"] == 1.0
        assert floor["not_applicable"] == "; ".join(verdict["reasons"])
    page = (demo_run / "run" / "report.html").read_text()
    assert "Against the paper" in page and "train.final_heldout_loss" in page and "Norm growth and saturation" in page


def test_reruns_redo_only_what_changed(capsys, demo_run):
    before = mtimes(demo_run)
    quick = [arg for item in SMALL_DEMO for arg in ("--set", item)]
    code, out, _ = run(capsys, "run", "demo", "--out", str(demo_run), *quick)
    assert code == 0 and "ran nothing" in out
    assert mtimes(demo_run) == before   # a finished run is left alone, its records included

    code, out, _ = run(capsys, "run", "demo", "--out", str(demo_run), *quick, "--set", "query.k=3")
    assert code == 0 and "ran query, report; up to date: train, extract, index, saturation" in out
    after = mtimes(demo_run)
    changed = {path.relative_to(demo_run).parts[0] for path in after if after[path] != before.get(path)}
    unchanged = {path.relative_to(demo_run).parts[0] for path in before if after.get(path) == before[path]}
    assert {"run", "stages.json", "experiment.toml", "report.html"} <= changed <= {
        "run", "stages.json", "experiment.toml", "comparison.json", "report.html", "report.json"}   # the index page
    assert {"train", "activations", "index"} <= unchanged
    saturation = [p for p in before if "saturation" in p.parts and p.suffix in (".json", ".parquet")]
    assert saturation and all(after[p] == before[p] for p in saturation)   # inside run/, but not rerun
    assert query.read_summary(demo_run / "run")["settings"]["k"] == 3
    resolved = (demo_run / "experiment.toml").read_text()
    assert "--set query.k=3" in resolved.splitlines()[0] and tomllib.loads(resolved)["query"]["k"] == 3

    again = mtimes(demo_run)
    code, out, _ = run(capsys, "run", str(demo_run / "experiment.toml"), "--out", str(demo_run))
    assert code == 0 and "ran nothing" in out and mtimes(demo_run) == again

    summary = query.read_summary(demo_run / "run")   # a query cut short: a pending record vouches for no table
    folders.begin(demo_run / "run", folders.QUERY_RUN, summary["fingerprint"], query.TABLE_FILES, summary)
    code, out, _ = run(capsys, "run", str(demo_run / "experiment.toml"), "--out", str(demo_run))
    assert code == 0 and "ran query; up to date: train, extract, index, saturation, report" in out
    assert query.read_summary(demo_run / "run")["settings"]["k"] == 3


def test_the_comparison_on_the_page_is_escaped():
    from memscan import report

    table = report._comparison_table({"reproduces": "<i>x</i>", "rows": [
        {"quantity": "query.'<script>'", "paper": 20.0, "measured": 18.5, "ratio": 0.925}, "not a row"]})
    assert "&lt;script&gt;" in table and "<script>" not in table and "&lt;i&gt;" in table
    assert "<td>20</td><td>18.5</td><td>0.925</td>" in table
    reduced = report._comparison_table({"reproduces": "x", "scale_note": "reduced run: width n 32, the paper's 1,024",
                                        "rows": [{"quantity": "query.r_star", "kind": "paper", "paper": 7.74,
                                                  "measured": 1.37, "ratio": None, "incomparable": "<width>"}]})
    assert "reduced run: width n 32" in reduced and "incomparable: &lt;width&gt;" in reduced


def test_another_experiment_in_the_folder_is_refused(capsys, tmp_path):
    (tmp_path / "experiment.toml").write_text("[experiment]\nname = 'other'\n")   # no record of memscan's lists it
    code, _, err = run(capsys, "run", "cabannes2024-assoc", "--out", str(tmp_path))
    assert code == 1 and "holds experiment.toml, which memscan did not write" in err
    assert (tmp_path / "experiment.toml").read_text() == "[experiment]\nname = 'other'\n"


# ---------------------------------------------------------------- the shipped experiments, reduced


def test_radius_reduced_and_its_resolved_file_reproduces_it(capsys, tmp_path):
    first = tmp_path / "first"
    code, out, err = run(capsys, "run", *reduced_command("bai2024-radius", first))
    assert code == 0, err
    manifest = store.read_manifest(first / "activations")
    summary = query.read_summary(first / "run")
    trained = json.loads((first / "train" / "run.json").read_text())
    assert sum(manifest["counts"]["chunks"].values()) == 64   # train, test and qf's gen
    assert manifest["settings"]["max_documents"] == trained["data"]["documents"]   # the training prefix
    last = summary["layers"][-1]
    assert last["layer"] == 2 and last["d"] == manifest["counts"]["chunks"]["train"]
    assert [s["fraction"] for s in last["subsets"]] == [0.25, 0.5, 0.75]
    document = json.loads((first / "comparison.json").read_text())
    rows = {row["quantity"]: row for row in document["rows"]}
    median = last["pattern_nearest_dist"]["median"]
    assert rows["query.pattern_nearest_dist.median"]["measured"] == median
    assert rows["query.pattern_nearest_dist.median"]["ratio"] is None   # a raw distance at width 32, the paper's at 1024
    assert rows["query.r_star"]["measured"] == pytest.approx(math.sqrt(32 / (2 * math.pi * math.e)))
    ratio = rows["query.typical_over_r_star"]   # dimensionless: compared across widths
    assert math.isclose(ratio["ratio"], last["typical_over_r_star"] / 1.29)
    assert document["reduced"] is True and document["scale"]["run"]["width"] == 32
    assert "query.typical_over_r_star" in out and "reduced run: width n 32, the paper's 1,024" in out

    again = tmp_path / "again"   # the resolved file reproduces the run in a new folder
    code, _, err = run(capsys, "run", str(first / "experiment.toml"), "--out", str(again))
    assert code == 0, err
    runs = [json.loads((folder / "train" / "run.json").read_text()) for folder in (first, again)]
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"] and runs[0]["final_train_loss"] == runs[1]["final_train_loss"]
    shards = [[s["sha256"] for s in store.read_manifest(folder / "activations")["shards"]] for folder in (first, again)]
    assert shards[0] == shards[1]
    layers = [[{k: v for k, v in layer.items() if k != "seconds"} for layer in query.read_summary(folder / "run")["layers"]]
              for folder in (first, again)]
    assert layers[0] == layers[1]


def test_qf_reduced_runs_both_depths(capsys, tmp_path):
    code, out, err = run(capsys, "run", *reduced_command("bai2024-qf", tmp_path))
    assert code == 0, err
    for variant, depth in (("qf-6", 6), ("qf-10", 10)):
        folder = tmp_path / variant
        assert json.loads((folder / "train" / "run.json").read_text())["settings"]["n_layer"] == depth
        assert store.read_manifest(folder / "activations")["layers"] == [depth]
        assert query.read_summary(folder / "run")["layers"][-1]["layer"] == depth
        assert (folder / "run" / "report.html").is_file() and (folder / "comparison.json").is_file()
    assert tomllib.loads((tmp_path / "experiment.toml").read_text())["variant"]["qf-10"] == {
        "train": {"n_layer": 10}, "paper": {"scale": {"layers": 10}}}
    assert json.loads((tmp_path / "qf-10" / "comparison.json").read_text())["reduced"] is True   # 32 wide, not 512
    assert out.count("ran train, extract, index, query, report") == 2


def test_owt_budgets_reduced_trains_three_budgets_and_scores_them(capsys, tmp_path):
    code, _, err = run(capsys, "run", *reduced_command("bai2024-owt-budgets", tmp_path))
    assert code == 0, err
    trained_tokens = []
    for variant in ("0_1pct", "1pct", "100pct"):
        folder = tmp_path / variant
        trained = json.loads((folder / "train" / "run.json").read_text())
        manifest = store.read_manifest(folder / "activations")
        metrics = json.loads((folder / "score" / "metrics.json").read_text())
        assert trained["steps"] == 20 and manifest["counts"]["chunks"]["train"] == trained["data"]["train_chunks"]
        assert 0 <= metrics["scores"]["loss"]["auc"]["value"] <= 1
        trained_tokens.append(trained["data"]["train_tokens"])
    assert trained_tokens == sorted(trained_tokens) and trained_tokens[0] < trained_tokens[-1]
    rows = json.loads((tmp_path / "0_1pct" / "comparison.json").read_text())["rows"]
    assert rows[0]["quantity"] == "train.final_train_loss" and rows[0]["ratio"] is None   # the paper's 0
    assert not (tmp_path / "1pct" / "comparison.json").exists()


def test_norms_reduced_fits_growth_over_the_checkpoints(capsys, tmp_path):
    code, _, err = run(capsys, "run", *reduced_command("merrill2021-norms", tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "saturation" / "summary.json").read_text())
    trained = json.loads((tmp_path / "train" / "run.json").read_text())
    assert summary["norm_growth"]["steps"] == trained["checkpoint_steps"]
    assert (tmp_path / "saturation" / "report.html").is_file()
    assert len(trained["checkpoint_steps"]) >= 14 and trained["steps"] >= 50   # enough for sqrt(t) and t to differ
    exponent = summary["norm_growth"]["exponent"]
    row, = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert row["measured"] == exponent["value"] and row["paper"] == 0.5 and row["kind"] == "paper"
    assert row["interval"] == [exponent["low"], exponent["high"]]
    assert row["reference_in_interval"] == (exponent["low"] <= 0.5 <= exponent["high"])


def test_assoc_reduced_fits_the_slopes(capsys, tmp_path):
    code, _, err = run(capsys, "run", *reduced_command("cabannes2024-assoc", tmp_path))
    assert code == 0, err
    fitted = json.loads((tmp_path / "assoc" / "fit.json").read_text())
    rows = {row["quantity"]: row for row in json.loads((tmp_path / "comparison.json").read_text())["rows"]}
    assert rows["assoc.slopes.p.slope"]["measured"] == fitted["slopes"]["p"]["slope"]
    assert rows["assoc.slopes.p.slope"]["ratio"] == pytest.approx(fitted["slopes"]["p"]["slope"] / -0.25)
    assert (tmp_path / "assoc" / "report.html").is_file()
    assert comparison.text(list(rows.values()))[0].split() == ["quantity", "kind", "reference", "measured",
                                                               "measured/reference"]
