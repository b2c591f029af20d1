"""`python -m tierq`: the same command as `tierq` (see tierq.cli)."""

from tierq.cli import main

raise SystemExit(main())
