"""True membership labels: --split-column and --members give exactly the user's split, or one-line errors."""

from __future__ import annotations

import json

import pytest

from memscan import store
from memscan.errors import InputError
from memscan.extract import ExtractSettings, extract
from tests.conftest import qf_lines

CHUNK = 32


def write_source(path, labels, keys=None):
    texts = qf_lines(len(labels))
    rows = [{"text": t, "label": label, **({"key": keys[i]} if keys else {})} for i, (t, label) in
            enumerate(zip(texts, labels))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def settings(model, source, **overrides):
    return ExtractSettings(**{"model": str(model), "source": str(source), "chunk_tokens": CHUNK, "dtype": "fp32",
                              "vec_dtype": "float32", "batch_size": 4, **overrides})


def splits_by_document(directory):
    table = store.read_chunk_table(directory)
    return {int(d): s for d, s in zip(table["doc_id"], table["split"])}


LABELS = ["member", "non-member", "train", "test", 1, 0, True, False, "Member", "nonmember"]
EXPECTED = ["train", "test"] * 5


def test_split_column_gives_exactly_the_labels(tmp_path, qf_model):
    source = write_source(tmp_path / "docs.jsonl", LABELS)
    manifest = extract(settings(qf_model, source, split_column="label"), tmp_path / "out")
    assert splits_by_document(tmp_path / "out") == dict(enumerate(EXPECTED))
    assert manifest["split_rule"] == {"kind": "column", "column": "label"}


def test_split_column_from_parquet(tmp_path, qf_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = qf_lines(6)
    pq.write_table(pa.table({"text": texts, "label": [1, 0, 0, 1, 1, 0]}), tmp_path / "docs.parquet")
    extract(settings(qf_model, tmp_path / "docs.parquet", split_column="label"), tmp_path / "out")
    assert splits_by_document(tmp_path / "out") == dict(enumerate(["train", "test", "test", "train", "train", "test"]))


def test_members_file_of_doc_ids_and_of_keys(tmp_path, qf_model):
    source = write_source(tmp_path / "docs.jsonl", ["x"] * 8, keys=[f"doc-{i}" for i in range(8)])
    (tmp_path / "ids.txt").write_text("1\n4\n\n6\n")
    manifest = extract(settings(qf_model, source, members=str(tmp_path / "ids.txt")), tmp_path / "by_id")
    assert splits_by_document(tmp_path / "by_id") == {i: "train" if i in (1, 4, 6) else "test" for i in range(8)}
    assert manifest["split_rule"]["kind"] == "members" and manifest["split_rule"]["members"] == 3
    (tmp_path / "keys.txt").write_text("doc-0\ndoc-7\n")
    extract(settings(qf_model, source, members=str(tmp_path / "keys.txt"), key_column="key"), tmp_path / "by_key")
    assert splits_by_document(tmp_path / "by_key") == {i: "train" if i in (0, 7) else "test" for i in range(8)}


def test_the_rule_is_part_of_the_fingerprint(tmp_path, qf_model):
    source = write_source(tmp_path / "docs.jsonl", LABELS)
    extract(settings(qf_model, source), tmp_path / "out")
    with pytest.raises(InputError, match="another extraction"):
        extract(settings(qf_model, source, split_column="label"), tmp_path / "out")


def test_unknown_label_values_are_one_line(tmp_path, qf_model):
    source = write_source(tmp_path / "docs.jsonl", ["member", "maybe", "test"])
    with pytest.raises(InputError, match=r"--split-column label has the value 'maybe'.*values seen: 'maybe', 'member'"
                                         r".*accepted: member/non-member") as caught:
        extract(settings(qf_model, source, split_column="label"), tmp_path / "out")
    assert "\n" not in str(caught.value)


def test_one_class_is_one_line_and_nothing_is_complete(tmp_path, qf_model):
    source = write_source(tmp_path / "docs.jsonl", ["member"] * 5)
    with pytest.raises(InputError, match=r"gives one class only \(\d+ train\)"):
        extract(settings(qf_model, source, split_column="label"), tmp_path / "out")
    assert not (tmp_path / "out" / store.MANIFEST).exists() or not store.read_manifest(tmp_path / "out")["complete"]
    with pytest.raises(InputError, match="one class only"):  # sampled: refused before any forward pass
        extract(settings(qf_model, source, split_column="label", num_chunks=3), tmp_path / "sampled")


def test_member_ids_that_match_no_document_are_one_line(tmp_path, qf_model):
    source = write_source(tmp_path / "docs.jsonl", ["x"] * 5)
    (tmp_path / "ids.txt").write_text("1\n17\n99\nabc\n")
    with pytest.raises(InputError, match=r"3 of 4 ids match no document.*first: '17', '99', 'abc'"):
        extract(settings(qf_model, source, members=str(tmp_path / "ids.txt")), tmp_path / "out")


@pytest.mark.parametrize("overrides,message", [
    ({"split_column": "label", "members": "ids.txt"}, "give one of them"),
    ({"key_column": "key"}, "give --members too"),
    ({"members": "missing.txt"}, "is not a file"),
])
def test_conflicting_rule_flags(tmp_path, overrides, message):
    (tmp_path / "ids.txt").write_text("1\n")
    resolved = {k: str(tmp_path / v) if k == "members" else v for k, v in overrides.items()}
    with pytest.raises(InputError, match=message):
        ExtractSettings(model="m", source="qf", **resolved).check()


def test_txt_and_qf_sources_have_no_label_column(tmp_path, qf_model):
    (tmp_path / "docs.txt").write_text("\n".join(qf_lines(4)))
    with pytest.raises(InputError, match="need a .jsonl, .parquet or hf: source"):
        extract(settings(qf_model, tmp_path / "docs.txt", split_column="label"), tmp_path / "a")
    with pytest.raises(InputError, match="has none"):
        extract(settings(qf_model, "qf:documents=20", split_column="label"), tmp_path / "b")
