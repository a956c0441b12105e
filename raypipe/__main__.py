"""`python -m raypipe ...` is the `raypipe` command (e.g. as a `ray job submit` entrypoint)."""
import sys

from raypipe.cli import main

sys.exit(main())
