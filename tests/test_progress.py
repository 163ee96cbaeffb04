"""Progress: tqdm's bar in a terminal, log lines (done/total, rate, ETA) where stderr is not one."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from memscan import progress
from memscan.extract import ExtractSettings, extract
from tests.conftest import qf_lines

LINE = re.compile(r"^extract: (?P<done>[\d,]+)/(?P<total>[\d,]+) chunk \(\d+%\), (?P<rate>[\d.,?]+) chunk/s, "
                  r"\S+ elapsed")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: tqdm draws its bar into it."""

    def isatty(self) -> bool:
        return True


def lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "memscan.progress"]


def run_extract(tmp_path, model, **overrides):
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(qf_lines(12)) + "\n")
    settings = ExtractSettings(**{"model": str(model), "source": str(source), "chunk_tokens": 32, "dtype": "fp32",
                                  "vec_dtype": "float32", "positions": "last", "batch_size": 2, "num_chunks": 6,
                                  **overrides})
    extract(settings, tmp_path / "out")


def test_an_extraction_without_a_terminal_logs_progress_that_adds_up(tmp_path, qf_model, caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0)
    assert not sys.stderr.isatty()    # pytest captures stderr: no terminal
    with caplog.at_level(logging.INFO, logger="memscan.progress"):
        run_extract(tmp_path, qf_model)
    logged = lines(caplog)
    assert len(logged) >= 2, logged
    numbers = [LINE.match(line) for line in logged]
    assert all(numbers), logged
    done = [int(match["done"].replace(",", "")) for match in numbers]
    totals = {int(match["total"].replace(",", "")) for match in numbers}
    assert totals == {6} and done == sorted(done) and all(d <= 6 for d in done) and done[-1] == 6
    assert "ETA" in logged[0] and logged[-1].endswith("(finished)")


def test_an_extraction_in_a_terminal_draws_the_bar_and_logs_nothing(tmp_path, qf_model, caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="memscan.progress"):
        run_extract(tmp_path, qf_model)
    assert lines(caplog) == []
    assert "extract" in terminal.getvalue() and "6/6" in terminal.getvalue()   # tqdm drew its bar


def test_the_interval_spaces_the_lines_and_the_final_line_always_comes(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="memscan.progress"):
        assert list(progress.progress(5, "work", "item", range(5))) == list(range(5))
    assert len(lines(caplog)) == 1 and lines(caplog)[0].startswith("work: 5/5 item (100%)")  # the default 60 s
    caplog.clear()
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0)
    with caplog.at_level(logging.INFO, logger="memscan.progress"):
        with progress.progress(None, "stream", "row") as bar:
            bar.update(3)
            bar.update(4)
    assert [line.split(",")[0] for line in lines(caplog)] == ["stream: 3 row", "stream: 7 row", "stream: 7 row"]
    assert "ETA" not in "".join(lines(caplog))   # no total, no ETA
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="memscan.progress"):
        with pytest.raises(KeyError), progress.progress(10, "cut", "step") as bar:
            bar.update(2)
            raise KeyError("stop")
    assert lines(caplog)[-1].startswith("cut: 2/10 step (20%)") and lines(caplog)[-1].endswith("(stopped)")


def test_durations_read_at_a_glance():
    assert [progress.duration(s) for s in (0, 44.6, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]
