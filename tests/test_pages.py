"""Every kind of folder's page, built from small real folders, rendered in a real headless chromium: no broken
image, no console error or failed request, nothing wider than a 1280 px window; and what the pages say."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from memscan import folders, report, show
from memscan.cli import main
from memscan.extract import ExtractSettings, extract
from memscan.knn.index import build
from memscan.query import QuerySettings, run
from memscan.report import run as run_report
from memscan.report import verdicts
from memscan.report.page import write_page
from tests.browser import Browser, executable
from tests.test_score import CHUNK, write_source

FIXTURES = Path(__file__).parent / "fixtures" / "formats-2026-12"
OLD_KINDS = ("training", "saturation", "assoc", "experiment")   # copied from the folder fixtures: no training here
EXAMPLES = pd.DataFrame({"doc_id": [3, 7], "text": ["<script>alert(1)</script> the newt", "x" * 5000],
                         "score": [0.5, 0.25]})


def cli(*argv: str) -> None:
    with pytest.raises(SystemExit) as code:
        main(list(argv))
    assert code.value.code == 0, argv


@pytest.fixture(scope="module")
def built(qf_model, tmp_path_factory) -> dict[str, Path]:
    """A dataset with two layers, its index, a query run, a verbatim run and a score run (this module's own), and
    copies of the fixture folders that need a training run; each folder's page rendered once."""
    root = tmp_path_factory.mktemp("pages")
    extract(ExtractSettings(model=str(qf_model), source=str(write_source(root)), chunk_tokens=CHUNK, layers="1,2",
                            positions="last", dtype="fp32", vec_dtype="float32", split_column="label"), root / "data")
    build(root / "data", root / "index")
    run(root / "index", root / "data", root / "run", QuerySettings(k=3, subsets=(0.5, 1.0)))
    cli("verbatim", str(root / "data"), "--out", str(root / "verbatim"), "--per-split", "6", "--prompt-tokens", "8",
        "--suffix-tokens", "8", "--resamples", "20")
    cli("score", str(root / "data"), "--out", str(root / "scores"), "--verbatim", str(root / "verbatim"),
        "--query-run", str(root / "run"), "--resamples", "20")
    paths = {name: root / name for name in ("data", "index", "run", "verbatim", "scores")}
    for name in OLD_KINDS:
        paths[name] = root / name
        shutil.copytree(FIXTURES / name, paths[name])
    for name, path in paths.items():
        report.render_folder(path, examples=EXAMPLES if name in ("run", "scores", "verbatim") else None)
    return paths


PAGE_CHECK = """(() => {
  const root = document.documentElement;
  const images = [...document.images];
  return {width: root.scrollWidth, client: root.clientWidth, images: images.length,
          broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
          external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
                    .filter(u => /^(https?:)?\\/\\//.test(u))};
})()"""
MIN_IMAGES = {"run": 4, "scores": 2, "verbatim": 1, "training": 1, "saturation": 3, "assoc": 2, "data": 0,
              "index": 0, "experiment": 0}


@pytest.mark.skipif(executable() is None, reason="no chromium executable found (apt-get install chromium)")
def test_every_page_renders_in_chromium_whole_and_within_the_window(built):
    pages = {**built, "experiment/run": built["experiment"] / "run", "run/saturation": built["run"] / "saturation"}
    with Browser(executable()) as browser:
        for name, folder in pages.items():
            page = folder / report.PAGE
            if not page.exists():
                continue
            browser.open(page.as_uri())
            found = browser.evaluate(PAGE_CHECK)
            assert browser.problems() == [], name
            assert found["broken"] == [] and found["external"] == [], (name, found)
            assert found["images"] >= MIN_IMAGES.get(name, 0), (name, found)
            assert found["width"] <= found["client"], (name, found)


@pytest.mark.skipif(executable() is None, reason="no chromium executable found (apt-get install chromium)")
def test_a_deep_run_with_two_sites_fits_the_window_one_table_per_site(built, tmp_path):
    summary = json.loads((built["run"] / "summary.json").read_text())
    layer = summary["layers"][-1]
    deep = {**summary, "layers": [{**layer, "site": site, "layer": i, "search": "approximate: IVF4096,PQ64x8 nprobe 64"}
                                  for site in ("hidden", "attn_out") for i in range(25)]}
    sections = [*run_report.verdict_sections(deep), *run_report.number_sections(deep)]
    write_page(tmp_path, "run.html", "deep", sections, summary=deep)
    text = (tmp_path / report.PAGE).read_text()
    assert text.count("<caption>Verdicts, site ") == 2 and text.count("<caption>Site attn_out, layers") == 5
    with Browser(executable()) as browser:
        browser.open((tmp_path / report.PAGE).as_uri())
        found = browser.evaluate(PAGE_CHECK)
    assert found["width"] <= found["client"], found


def test_every_kind_gets_one_self_contained_page_listed_in_its_report_json(built):
    for name, folder in built.items():
        text = (folder / report.PAGE).read_text()
        listed = [entry["name"] for entry in folders.read_record(folder, folders.REPORT)["files"]]
        assert report.PAGE in listed, name
        assert not re.search(r"""(src|href)=["'](?!data:|#)[^"']*\.(png|js|css|woff2?)["']""", text), name
        assert not list(folder.glob("*.png")) or name in OLD_KINDS, name   # nothing drawn beside the page
    assert (built["experiment"] / "run" / report.PAGE).is_file()   # the index page renders its stages' pages
    index = (built["experiment"] / report.PAGE).read_text()
    assert 'href="run/report.html"' in index and 'href="train/report.html"' in index


def test_old_pngs_listed_by_an_old_report_json_go_and_the_users_files_stay(built, tmp_path):
    folder = tmp_path / "assoc"
    shutil.copytree(FIXTURES / "assoc", folder)
    (folder / "mine.txt").write_text("a user's file")
    report.render_assoc(folder, allow_other_files=True)            # the fixture's PNGs are its record's (legacy)
    assert sorted(p.name for p in folder.glob("*.png")) == ["error_vs_T.png", "error_vs_d.png", "sgd_q.png"]
    old = folders.read_record(folder, folders.REPORT)
    old_png = folder / "old.png"
    old_png.write_bytes(b"\x89PNG old")
    body = {"fingerprint": old["fingerprint"], "files": [*old["files"], {"name": "old.png", "bytes": 8,
                                                                          "sha256": "0" * 64}]}
    folders.write_record(folder, folders.REPORT, body)               # as an older memscan listed its PNG
    report.render_folder(folder, allow_other_files=True)
    assert not old_png.exists() and (folder / "mine.txt").read_text() == "a user's file"


def test_the_run_page_judges_each_assumption_at_each_layer_with_its_number_and_threshold(built):
    summary = json.loads((built["run"] / "summary.json").read_text())
    text = (built["run"] / report.PAGE).read_text()
    for entry in summary["layers"]:
        share = entry["A2"]["coverage_at_typical"]
        status = "holds" if share >= verdicts.THRESHOLDS[1].least else "fails"
        assert f"{status}: {share:.1%}" in text
        floor = entry["floor"]
        if not floor["verdict"]["applicable"]:   # premises fail: the reasons, never the figure
            assert "premises fail" in text and f"{floor['predicted_floor']:.4g}" not in text.split("Numbers")[0]
    assert text.count("Verdicts, site hidden") == 1 and "layer 1" in text and "layer 2" in text
    assert text.count("nearest-distance CDFs</figcaption>") == len(summary["layers"])   # a distance figure per layer
    for threshold in verdicts.THRESHOLDS:
        assert f"&ge; {threshold.least:.0%}".replace("&ge;", "\N{GREATER-THAN OR EQUAL TO}") in text


def test_verdicts_hold_fail_and_refuse_to_judge_a_number_without_its_premises():
    layer = {"d": 10, "d_prime": 5, "typical_radius": 1.0, "A1": {"retrieval_rate": 0.95},
             "A2": {"coverage_at_typical": 0.5}, "A3": {"disjoint_at_r_star": 0.9},
             "floor": {"predicted_floor": 3.5, "verdict": {"applicable": False, "reasons": ["A2 fails: 50%"]}}}
    a1, a2, a3, floor = verdicts.verdicts(layer)
    assert (a1.status, a2.status, a3.status) == ("holds", "fails", "holds") and a2.text == "fails: 50.0% < 90%"
    assert floor.status == "not judged" and "A2 fails: 50%" in floor.text and "3.5" not in floor.text
    duplicated = {**layer, "typical_radius": 0.0}
    assert verdicts.judge(duplicated, verdicts.THRESHOLDS[1]).text.startswith("not judged: the typical radius is 0")
    assert verdicts.judge({**layer, "d_prime": 0}, verdicts.THRESHOLDS[0]).status == "not judged"


def test_the_membership_and_verbatim_pages_show_their_intervals_and_the_examples_escaped(built):
    metrics = json.loads((built["scores"] / "metrics.json").read_text())
    text = (built["scores"] / report.PAGE).read_text()
    for name, row in metrics["scores"].items():
        auc = row["auc"]
        assert f"{auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]" in text, name
        tpr = row["tpr@1%fpr"]
        assert (f"n/a ({tpr['reason']})" if tpr["value"] is None else f"{tpr['value']:.3f} [") in text, name
    summary = json.loads((built["verbatim"] / "summary.json").read_text())
    verbatim = (built["verbatim"] / report.PAGE).read_text()
    for split, entry in summary["splits"].items():
        assert f"{entry['match_fraction']['value']:.3f} [" in verbatim, split
    for page in (text, verbatim, (built["run"] / report.PAGE).read_text()):
        assert "&lt;script&gt;alert(1)&lt;/script&gt; the newt" in page and "<script>" not in page
        assert "x" * 2000 + "\N{HORIZONTAL ELLIPSIS}" in page and "x" * 2001 not in page
    assert "Examples" not in (built["data"] / report.PAGE).read_text()


def test_the_report_command_takes_any_folder_and_a_non_folder_is_one_line(built, capsys):
    cli("report", str(built["index"]))
    assert capsys.readouterr().out.strip() == f"report    {built['index'] / report.PAGE}"
    with pytest.raises(SystemExit) as code:
        main(["report", str(built["index"] / "nothing")])
    assert code.value.code == 1 and "is not a folder" in capsys.readouterr().err


def test_pages_show_memscan_shows_examples_by_default(built, tmp_path):
    """Without examples given, a run, scores and verbatim page shows `memscan show`'s top chunks as text."""
    for name in ("run", "scores", "verbatim"):
        folder = tmp_path / name
        shutil.copytree(built[name], folder)
        report.render_folder(folder)
        text = (folder / report.PAGE).read_text()
        kind, frame = show.top(folder)
        first = frame.text[0] if "text" in frame else frame.prompt[0]
        assert "5 examples" in text and html.escape(" ".join(first.split())[:40]) in " ".join(text.split()), name
