"""Issue 20, case 3: a dataset manifest edited by someone else is caught, and never decides what code runs.

Each case is a row of a table: the hostile edit of manifest.json (raw, so the signature catches it,
or re-signed with files.signed, so only the cross-checks and the model check can), the one line
every reader must print, and the exit code of `memscan verify`. Every case also checks that
nothing on disk changed: the sha256 of every file in the dataset folder and beside it (the
models), before and after, and that a refused job leaves no output folder behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from memscan import files, models, qf, store
from memscan.cli import main
from memscan.extract import extract
from tests.conftest import save_gpt2
from tests.test_trust_data import copy_of, edit_manifest, one_line_error, tiny_extract

SOURCE = "qf:documents=8,lines=16"   # both splits at test_fraction 0.5: score and verbatim need members and not
EVIL_CODE = '''import pathlib
pathlib.Path({marker!r}).write_text("the model's own code ran")
from transformers import GPT2Config, GPT2LMHeadModel


class EvilConfig(GPT2Config):
    pass


class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig
'''


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the dataset, the models, anything else there)."""
    return {str(p.relative_to(root)): files.sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}


def with_code(folder: Path, marker: Path) -> Path:
    """Give a model folder its own code (config auto_map), which writes `marker` if it is ever run."""
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def world(qf_model, tmp_path_factory) -> dict[str, Any]:
    """A dataset of this module's own model (3 layers x 2 positions: rows_per_chunk 6), an index of it, and two
    other model folders that carry code of their own: one with other weights, one with the same weights."""
    root = tmp_path_factory.mktemp("hostile")
    model = root / "model"
    shutil.copytree(qf_model, model)
    data = root / "data"
    extract(tiny_extract(model, source=SOURCE, test_fraction=0.5, positions="every:16"), data)
    with pytest.raises(SystemExit) as done:
        main(["index", str(data), "--out", str(root / "index")])
    assert done.value.code in (0, None)
    marker = root / "code-ran"
    other = with_code(save_gpt2(root / "other-weights", qf.tokenizer(), n_layer=2, seed=1), marker)
    same = with_code(Path(shutil.copytree(model, root / "same-weights")), marker)
    recorded = store.read_manifest(data)["model"]["weights_sha256"]
    assert recorded == digest(model) == digest(same) != digest(other)
    return {"root": root, "model": model, "data": data, "index": root / "index", "other": other, "same": same,
            "marker": marker, "weights_sha256": recorded}


def digest(folder: Path) -> str:
    return models.weights_digest(folder)


# ---------------------------------------------------------------- A. counts and rows per chunk


def swap_counts(m: dict) -> None:
    for key in ("chunks", "rows"):
        m["counts"][key]["train"], m["counts"][key]["test"] = m["counts"][key]["test"], m["counts"][key]["train"]


def as_version_2(change):
    """The edit on a manifest as the previous memscan wrote it: format version 2, no self_sha256."""
    def edit(m: dict) -> None:
        m.pop(files.SELF_SHA256)
        m["format_version"] = 2
        change(m)
    return edit


SIGNATURE = "manifest.json fails its self_sha256 checksum: it was edited or corrupted"
RPC = "'rows_per_chunk' must be the 3 site layers ('sites') x 2 kept positions ('positions') = 6; got {}"

# id: (edit, re-sign after the edit, the line's fragment, `memscan verify` exit code)
DATA_CASES = {
    "swapped train/test counts": (swap_counts, False, SIGNATURE, 1),
    "swapped train/test counts, re-signed": (swap_counts, True, "'counts.rows' counts", 1),
    "swapped train/test counts, version 2": (as_version_2(swap_counts), False, "'counts.rows' counts", 1),
    "rows_per_chunk doubled": (lambda m: m.update(rows_per_chunk=12), False, SIGNATURE, 1),
    "rows_per_chunk doubled, re-signed": (lambda m: m.update(rows_per_chunk=12), True, RPC.format(12), 1),
    "rows_per_chunk halved, re-signed": (lambda m: m.update(rows_per_chunk=3), True, RPC.format(3), 1),
    "rows_per_chunk halved, version 2": (as_version_2(lambda m: m.update(rows_per_chunk=3)), False, RPC.format(3), 1),
    "rows_per_chunk and positions halved, re-signed": (lambda m: m.update(rows_per_chunk=3, positions="last"), True,
                                                      "'counts.rows' of split test must be its", 1),
    "rows_per_chunk, positions and rows halved, re-signed": (
        lambda m: (m.update(rows_per_chunk=3, positions="last"),
                   m["counts"].update(rows={s: c * 3 for s, c in m["counts"]["chunks"].items()})),
        True, "'counts.rows' add up to", 1),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_a_hostile_count_edit_is_one_line_for_every_reader_and_changes_nothing(world, tmp_path, capsys, case):
    change, sign, fragment, verify_exit = DATA_CASES[case]
    data = copy_of(world["data"], tmp_path)
    edit_manifest(data, change, sign=sign)
    before = snapshot(tmp_path), snapshot(world["root"])

    with pytest.raises(SystemExit) as verified:
        main(["verify", str(data)])
    err = capsys.readouterr().err
    assert verified.value.code == verify_exit and fragment in err and "Traceback" not in err, err
    for args in (["index", str(data), "--out", str(tmp_path / "index")],
                 ["query", str(world["index"]), "--queries", str(data), "--out", str(tmp_path / "run")],
                 ["query", str(world["index"]), "--queries", str(data), "--split", "train",
                  "--out", str(tmp_path / "run")]):
        line = one_line_error(capsys, *args)
        assert fragment in line, line
    assert not (tmp_path / "index").exists() and not (tmp_path / "run").exists()
    assert (snapshot(tmp_path), snapshot(world["root"])) == before


def test_a_version_2_manifest_still_reads(world, tmp_path, capsys):
    data = copy_of(world["data"], tmp_path)
    edit_manifest(data, as_version_2(lambda m: None))
    manifest = json.loads((data / store.MANIFEST).read_text())
    assert manifest["format_version"] == 2 and files.SELF_SHA256 not in manifest
    assert store.read_manifest(data)["counts"] == store.read_manifest(world["data"])["counts"]
    dataset = store.ActivationDataset(data)
    rows = sum(len(meta["row_id"]) for _, meta in dataset.iter_batches(split="test", layer=2))
    assert rows == dataset.count("test", 2) > 0 and store.verify(data) == []
    with pytest.raises(SystemExit) as verified:
        main(["verify", str(data)])
    assert verified.value.code in (0, None) and "checksums match" in capsys.readouterr().out


def test_extraction_signs_every_manifest_it_writes_and_resume_keeps_the_fingerprint(world, monkeypatch, tmp_path):
    written = []
    original = store.write_manifest

    def spy(directory, manifest):
        document = original(directory, manifest)
        written.append(json.loads((Path(directory) / store.MANIFEST).read_text()))
        return document

    monkeypatch.setattr(store, "write_manifest", spy)
    manifest = extract(tiny_extract(world["model"], source=SOURCE, test_fraction=0.5, positions="every:16"),
                       tmp_path / "data")
    assert len(written) > 2 and all(files.fingerprint({k: v for k, v in m.items() if k != files.SELF_SHA256})
                                    == m[files.SELF_SHA256] for m in written)
    assert written[-1]["format_version"] == store.FORMAT_VERSION == 4 and written[-1] == manifest
    assert manifest["fingerprint"] == store.read_manifest(world["data"])["fingerprint"]
    assert (tmp_path / "data" / store.MANIFEST).read_bytes() == (world["data"] / store.MANIFEST).read_bytes()


# ---------------------------------------------------------------- B. the model a manifest names


def point_at(folder_key: str):
    """The edit: the manifest's model is another folder, and its settings ask to run that model's code."""
    def edit(m: dict, world: dict[str, Path]) -> None:
        m["model"].update(id=str(world[folder_key]), path=str(world[folder_key]))
        m["settings"]["trust_remote_code"] = True
    return edit


def refused(folder_key: str):
    """The weights check's line for the model in `world[folder_key]` against the dataset's."""
    return lambda world: (f"has weights sha256 {digest(world[folder_key])[:12]}, not the "
                          f"{world['weights_sha256'][:12]} dataset")


SWAPPED_WEIGHTS = "weights replaced"   # the dataset's model folder now holds other weights (no manifest edit)

# id: (edit or SWAPPED_WEIGHTS, re-sign, extra flags, the line's fragment (None: runs), the model loaded,
#      whether it matches the dataset, `memscan verify` exit code)
MODEL_CASES = {
    "path to other weights + trust_remote_code": (point_at("other"), False, (), lambda w: SIGNATURE, None, None, 1),
    "path to other weights + trust_remote_code, re-signed": (point_at("other"), True, (), refused("other"),
                                                             None, None, 0),
    "path to other weights + trust_remote_code, re-signed, --allow-other-model": (
        point_at("other"), True, ("--allow-other-model",), None, "other", False, 0),
    "path to the same weights with code + trust_remote_code, re-signed": (point_at("same"), True, (), None, "same",
                                                                           True, 0),
    "weights differ from weights_sha256": (SWAPPED_WEIGHTS, False, (), refused("model"), None, None, 0),
    "weights differ from weights_sha256, --allow-other-model": (SWAPPED_WEIGHTS, False, ("--allow-other-model",),
                                                                 None, "model", False, 0),
}
COMMANDS = {"score": ["--resamples", "10", "--device", "cpu"],
            "verbatim": ["--num-chunks", "3", "--prompt-tokens", "8", "--suffix-tokens", "8", "--batch-size", "4",
                         "--resamples", "10", "--device", "cpu"]}


@pytest.fixture
def trust_asked(monkeypatch) -> list[bool]:
    """Every trust_remote_code that memscan passes when it loads a model or a tokenizer."""
    asked: list[bool] = []
    load, load_tokenizer = models.load, models.load_tokenizer

    def spy_load(*args, **kwargs):
        asked.append(kwargs.get("trust_remote_code", False))
        return load(*args, **kwargs)

    def spy_tokenizer(model_id, revision=None, trust_remote_code=False):
        asked.append(trust_remote_code)
        return load_tokenizer(model_id, revision, trust_remote_code)

    monkeypatch.setattr(models, "load", spy_load)
    monkeypatch.setattr(models, "load_tokenizer", spy_tokenizer)
    return asked


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", MODEL_CASES)
def test_the_manifest_never_decides_which_code_or_weights_run(world, tmp_path, capsys, trust_asked, case, command):
    change, sign, flags, fragment, loaded, matches, verify_exit = MODEL_CASES[case]
    data = copy_of(world["data"], tmp_path)
    weights = world["model"] / "model.safetensors"
    original = weights.read_bytes()
    try:
        if change == SWAPPED_WEIGHTS:
            shutil.copyfile(world["other"] / "model.safetensors", weights)
        else:
            edit_manifest(data, lambda m: change(m, world), sign=sign)
        before = snapshot(tmp_path), snapshot(world["root"])
        with pytest.raises(SystemExit) as verified:
            main(["verify", str(data)])
        assert verified.value.code in ((0, None) if verify_exit == 0 else (verify_exit,)), capsys.readouterr().err
        capsys.readouterr()
        out = tmp_path / "out"
        args = [command, str(data), "--out", str(out), *COMMANDS[command], *flags]
        if fragment is not None:
            line = one_line_error(capsys, *args)
            assert fragment(world) in line, line
            if "weights sha256" in fragment(world):
                assert "pass --allow-other-model" in line
            assert not out.exists()
        else:
            with pytest.raises(SystemExit) as done:
                main(args)
            assert done.value.code in (0, None), capsys.readouterr().err
            summary = json.loads((out / "summary.json").read_text())
            files.check_signature(summary, out / "summary.json")
            assert summary["model"] == {"path": str(world[loaded]), "weights_sha256": digest(world[loaded]),
                                        "matches_dataset": matches}
            assert summary["settings"]["allow_other_model"] is ("--allow-other-model" in flags)
            assert summary["settings"]["trust_remote_code"] is False
            shutil.rmtree(out)
        assert (snapshot(tmp_path), snapshot(world["root"])) == before
    finally:
        weights.write_bytes(original)
    assert not any(trust_asked) and not world["marker"].exists()
    assert (fragment is None) == bool(trust_asked)   # a refused model is never loaded, not even its tokenizer


def test_trust_remote_code_comes_from_the_command_line(world, tmp_path, capsys, trust_asked, monkeypatch):
    """The flag reaches the loader (the model here has no code of its own: nothing runs)."""
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert "--trust-remote-code Allow a hub model's own code to run." in shown and "--allow-other-model" in shown
    data = copy_of(world["data"], tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["verbatim", str(data), "--out", str(tmp_path / "out"), *COMMANDS["verbatim"], "--trust-remote-code"])
    assert done.value.code in (0, None) and trust_asked and all(trust_asked)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["trust_remote_code"] is True and summary["model"]["matches_dataset"] is True


def test_a_hub_model_is_recorded_unchecked(world, tmp_path, monkeypatch, caplog):
    """No local folder and no weights_sha256: nothing to check; the summary says null and a log line says so."""
    from memscan import score

    manifest = store.read_manifest(world["data"])
    manifest["model"] = {**manifest["model"], "id": "org/hub-model", "path": None, "weights_sha256": None}
    monkeypatch.setattr(models, "load_tokenizer", lambda *args: ("tokenizer", args))
    settings = score.ScoreSettings(data=str(world["data"]))
    with caplog.at_level("INFO", logger="memscan.score"):
        tokenizer, record = score.dataset_model(manifest, settings)
    assert tokenizer == ("tokenizer", ("org/hub-model", manifest["settings"].get("revision"), False))
    assert record == {"path": "org/hub-model", "weights_sha256": None, "matches_dataset": None}
    assert "cannot be checked" in caplog.text
