"""The workers by name: each `reconcile worker` keeps its row in `data_workers`.

Why not procrastinate's `procrastinate_workers`: its rows are an id and a heartbeat, no
name, and a stalled worker's row is deleted when the next worker starts. The status page
and `reconcile status` name the worker of each job (`data_jobs.worker`, HOST:PID) and say
when it was last seen, so each worker writes its row when it starts (with its lease: the
`--heartbeat` and `--stalled` it runs with), refreshes `last_seen` every heartbeat next to
procrastinate's, and deletes the row when it stops. A worker killed with SIGKILL leaves its
row behind: `last_seen` older than its `stalled` is a worker whose jobs are being handed to
another; rows not seen for `FORGOTTEN` are deleted by the next worker that starts.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import delete, update

from reconciler.state.model import DataWorker, utcnow
from reconciler.state.store import Store

FORGOTTEN = timedelta(days=1)  # a dead worker's row is kept this long (then deleted)


def register(store: Store, name: str, *, concurrency: int, heartbeat: float,
             stalled: float) -> None:
    """This process's row (replacing a row of the same name: a PID reused on the host),
    and the rows of workers not seen for `FORGOTTEN` gone."""
    now = utcnow()
    with store.session() as session:
        session.execute(delete(DataWorker).where(
            (DataWorker.name == name) | (DataWorker.last_seen < now - FORGOTTEN)))
        session.add(DataWorker(name=name, host=socket.gethostname(), pid=os.getpid(),
                               concurrency=concurrency, heartbeat=heartbeat, stalled=stalled,
                               started_at=now, last_seen=now))


def touch(store: Store, name: str) -> None:
    """This worker is alive now."""
    with store.session() as session:
        session.execute(update(DataWorker).where(DataWorker.name == name)
                        .values(last_seen=utcnow()))


def unregister(store: Store, name: str) -> None:
    """This worker stopped (its running jobs ended with it)."""
    with store.session() as session:
        session.execute(delete(DataWorker).where(DataWorker.name == name))
