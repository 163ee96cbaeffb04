"""Library logging: memscan's INFO lines appear once where nothing is configured (a notebook, a script), once
where the application configured the root logger (before or after importing memscan), once under the CLI, and
not at all under the CLI's -q. Each case runs in a fresh interpreter: logging's state is per process."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A memscan logger's INFO line: the `memscan.progress` logger's final line, where stderr is no terminal.
LOG_ONE = "from memscan import progress; list(progress.progress(3, 'work', 'item', range(3)))"
CASES = {
    "nothing configured": ("", LOG_ONE, 1),
    "root configured before import": ("import logging; logging.basicConfig(level=logging.INFO)", LOG_ONE, 1),
    "root configured after import": ("import memscan; import logging; logging.basicConfig(level=logging.INFO)",
                                     LOG_ONE, 1),
    "the CLI": ("from memscan.cli import _configure_logging; _configure_logging()", LOG_ONE, 1),
    "the CLI with -q": ("import logging; from memscan.cli import _configure_logging; _configure_logging(); "
                        "logging.getLogger().setLevel(logging.WARNING)", LOG_ONE, 0),
    "memscan quieted": ("import logging, memscan; logging.getLogger('memscan').setLevel(logging.WARNING)",
                        LOG_ONE, 0),
}


def stderr_lines(setup: str, body: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", f"{setup}\n{body}"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TQDM_DISABLE": ""})
    assert done.returncode == 0, done.stderr
    return [line for line in done.stderr.splitlines() if "work: 3/3 item" in line]


@pytest.mark.parametrize("case", list(CASES))
def test_each_info_line_appears_once_however_logging_is_configured(case):
    setup, body, expected = CASES[case]
    lines = stderr_lines(setup, body)
    assert len(lines) == expected, lines
    if expected:
        assert lines[0].endswith("(finished)")


def test_the_library_handler_formats_as_the_cli_does():
    assert stderr_lines("", LOG_ONE)[0].startswith("memscan: work: 3/3 item (100%)")
