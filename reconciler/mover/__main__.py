"""`python -m reconciler.mover`: the data mover's command line (see `cli.py`)."""

from reconciler.mover.cli import main

main()
