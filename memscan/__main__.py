"""`python -m memscan` runs the command line."""

from memscan.cli import main

main()
