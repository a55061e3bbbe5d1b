"""`python -m jc2a` is the `jc2a` command."""

from jc2a.cli import main

raise SystemExit(main())
