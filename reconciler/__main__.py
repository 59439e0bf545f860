"""`python -m reconciler` is `reconcile`."""

from reconciler.cli import main

main(prog_name="reconcile")  # the same usage lines and completion variable
