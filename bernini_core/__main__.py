"""`python -m bernini_core ...` runs the command-line interface (named so in its usage and help)."""

from .cli import MODULE_PROG, main

raise SystemExit(main(prog=MODULE_PROG))
