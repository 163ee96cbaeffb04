"""Screenshot each folder's report.html with headless chromium (the whole page, 1280 px wide), for docs/img/.

    .venv/bin/python benchmarks/page_screenshots.py RUN SCORES ... --out docs/img/

Each folder's page must exist (`memscan report FOLDER`); the screenshot is named after the folder
(`<folder name>.png`). Needs chromium (`apt-get install chromium`) and websocket-client (the dev extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository's tests/ holds the driver (tests/browser.py)

from tests.browser import Browser, executable  # noqa: E402

PAGE = "report.html"


def main(argv: list[str] | None = None) -> int:
    """Screenshot every named folder's page into --out; one line per screenshot, and one line per problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="memscan folders whose report.html to screenshot")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs (docs/img/)")
    args = parser.parse_args(argv)
    binary = executable()
    if binary is None:
        print("no chromium executable found: apt-get install chromium", file=sys.stderr)
        return 1
    missing = [str(folder / PAGE) for folder in args.folders if not (folder / PAGE).is_file()]
    if missing:
        print(f"no page at {missing[0]}: run `memscan report` on that folder first", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with Browser(binary) as browser:
        for folder in args.folders:
            browser.open((folder / PAGE).resolve().as_uri())
            target = args.out / f"{folder.resolve().name}.png"
            browser.screenshot(target)
            print(f"{target}  {', '.join(browser.problems()) or 'ok'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
