"""`python -m reconciler.mover`: the data mover's command line (see `cli.py`).

Two things a process that exists only for one copy can skip (issue 22: together 0.2-0.3 of
the 1.8-2.1 CPU-s of a 10,000-message copy, measured with `/usr/bin/time`, alternating
runs on the same Dovecots): the cyclic garbage collector walking every object the imports
made, over and over while the copy allocates (`gc.freeze` moves them out of its sight:
modules, classes and functions live until the process ends anyway), and the interpreter's
teardown of everything still allocated at exit (`os._exit` once the report, the stats and
the state store are written and closed, and the output flushed)."""

import gc
import logging
import os
import sys

from reconciler.mover.cli import main

gc.freeze()
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if isinstance(exc.code, str):
        print(exc.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
