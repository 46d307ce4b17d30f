"""`python -m bernini_core ...` runs the command-line interface."""

from .cli import main

raise SystemExit(main())
