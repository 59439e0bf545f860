"""`python -m fed serve ...`: the same as the `fed` console script."""

from .cli import main

raise SystemExit(main())
