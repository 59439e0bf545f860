"""``python -m maildir_system serve ...``: same as the `maildir-system` console script."""

from maildir_system.cli import main

raise SystemExit(main())
