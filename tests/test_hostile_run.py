"""Issue 20, cases 7 and 8: an experiment's name never takes `memscan run` outside the working folder,
`--check` refuses what the stages refuse (through their own code), and an undefined summary number is
null, never 0."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import memscan
from conftest import clustered
from memscan import store
from memscan.experiments import spec
from memscan.extract import extract
from memscan.knn.index import build
from memscan.query import QuerySettings, run
from tests.test_trust_data import one_line_error, tiny_extract

NAME_ERROR = "cannot be a folder inside the working folder"

# The hostile input (the experiment's name, `--set` overrides, --check; {outside} is a folder beside the
# working one) and the fragment of the one error line. Name cases run without --out: the name is the folder.
CASES = [
    pytest.param("../x", (), False, f'experiment.name: "../x" {NAME_ERROR}', id="name-parent"),
    pytest.param("{outside}/run", (), False, f"experiment.name: \"{{outside}}/run\" {NAME_ERROR}", id="name-absolute"),
    pytest.param("a/b", (), False, f'experiment.name: "a/b" {NAME_ERROR}', id="name-separator"),
    pytest.param("..", (), False, f'experiment.name: ".." {NAME_ERROR}', id="name-dot-dot"),
    pytest.param(".hidden", (), False, f'experiment.name: ".hidden" {NAME_ERROR}', id="name-hidden"),
    pytest.param("hostile", ("extract.positions=every:0",), True,
                 "extract.positions: --positions must be last, all or every:K with 1 <= K <= 64; got 'every:0'",
                 id="check-positions"),
    pytest.param("hostile", ("source.id=text.txt",), True,
                 "train.tokenizer: --tokenizer is needed for sources other than qf", id="check-tokenizer"),
]


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under `root` with its sha256 (None for a folder): what a refused run must leave alone."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def hostile_experiment(work: Path, name: str) -> Path:
    """The shipped demo renamed `name`, in the working folder, beside a text file (a source without a tokenizer)."""
    text = (spec.SHIPPED_DIR / "demo.toml").read_text()
    assert 'name = "demo"' in text
    (work / "text.txt").write_text("one document\nanother document\n")
    path = work / "hostile.toml"
    path.write_text(text.replace('name = "demo"', f"name = {json.dumps(name)}", 1))
    return path


@pytest.mark.parametrize(("name", "sets", "check", "fragment"), CASES)
def test_a_hostile_experiment_is_one_line_and_writes_nothing(capsys, monkeypatch, tmp_path, name, sets, check,
                                                              fragment):
    outside, work = tmp_path / "outside", tmp_path / "work"
    outside.mkdir()
    work.mkdir()
    (outside / "keep.txt").write_text("the user's file")
    path = hostile_experiment(work, name.format(outside=outside))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    args = ["run", path.name, *(arg for item in sets for arg in ("--set", item)), *(["--check"] if check else [])]
    line = one_line_error(capsys, *args)
    assert line.startswith(f"memscan: error: {path.name}: ") and fragment.format(outside=outside) in line, line
    assert snapshot(tmp_path) == before


def retrieval_summary(data: Path, root: Path) -> dict[str, float | None]:
    """The A1 summary of an exact query run of `data`'s test split against its train split, as on disk."""
    build(data, root / "index")
    run(root / "index", data, root / "run", QuerySettings(k=3, subsets=(1.0,)))
    layer, = json.loads((root / "run" / "summary.json").read_text())["layers"]
    return layer["A1"]


def test_imported_vectors_have_no_next_token_agreement(tmp_path):
    """write_vectors stores no tokens (next_token_id -1): the agreement is undefined, null like the losses."""
    store.write_vectors(tmp_path / "data", clustered(120, 8, 6, seed=5), ["train"] * 100 + ["test"] * 20,
                        model="synthetic")
    a1 = retrieval_summary(tmp_path / "data", tmp_path)
    assert a1["next_token_agreement"] is None and a1["train_loss"] is None and a1["test_loss"] is None


def test_extracted_chunks_still_have_a_next_token_agreement(qf_model, tmp_path):
    """With next tokens the agreement is a number: the share of the queries with a next token whose nearest
    pattern has the same one."""
    extract(tiny_extract(qf_model, source="qf:documents=20,lines=16", layers="last"), tmp_path / "data")
    a1 = retrieval_summary(tmp_path / "data", tmp_path)
    shards = pq.read_table(sorted((tmp_path / "data").glob("vectors/part-*.parquet")), columns=["split", "next_token_id"])
    test = shards.to_pandas().query("split == 'test'")
    matched = memscan.load(tmp_path / "run").queries.next_token_match.sum()
    assert a1["next_token_agreement"] == pytest.approx(matched / (test.next_token_id >= 0).sum())
