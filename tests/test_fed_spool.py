"""fed's spool after a crash: what start-up keeps, rebuilds and removes (in-process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fed.queue.queuefile import read_envelope, read_message
from fed.queue.spool import Spool
from fed.queue.store import Store


def accept_two(root: Path) -> None:
    """Accept messages A (two recipients) and B durably, as the SMTP handler would."""
    async def run() -> None:
        spool = Spool(root / "spool", Store(root / "fed.db"))
        spool.start()
        await asyncio.gather(
            spool.accept("A", "s@x.example", ["a@corp.example", "b@corp.example"],
                         [b"Received: x\r\n", b"Subject: a\r\n\r\nbody a\r\n"], "<a@t>"),
            spool.accept("B", "", ["c@corp.example"], b"Subject: b\r\n\r\nbody b\r\n", None))
        await spool.close()
        spool.store.close()

    asyncio.run(run())


def test_the_queue_file_holds_message_and_envelope(tmp_path: Path) -> None:
    accept_two(tmp_path)
    file = tmp_path / "spool" / "queue" / "A.eml"
    assert read_message(file) == b"Received: x\r\nSubject: a\r\n\r\nbody a\r\n"
    envelope = read_envelope(file)
    assert envelope is not None
    assert (envelope.mail_from, envelope.rcpts, envelope.message_id) == (
        "s@x.example", ("a@corp.example", "b@corp.example"), "<a@t>")


def test_start_up_rebuilds_lost_rows_and_removes_unacknowledged_files(tmp_path: Path) -> None:
    accept_two(tmp_path)
    queue = tmp_path / "spool" / "queue"
    store = Store(tmp_path / "fed.db")
    # A crash lost A's index rows (the file was synced: A was acknowledged) ...
    with store.transaction() as db:
        db.execute("DELETE FROM recipients WHERE queue_id = 'A'")
        db.execute("DELETE FROM messages WHERE queue_id = 'A'")
        # ... C's rows were committed for a message whose file is gone (finished) ...
        db.execute("INSERT INTO messages (queue_id, mail_from, received_at, size) "
                   "VALUES ('C', '', 0, 1)")
        db.execute("INSERT INTO recipients (queue_id, rcpt, status) "
                   "VALUES ('C', 'd@corp.example', 'pending')")
    # ... and D was being written when the crash came: cut short, never acknowledged.
    whole = (queue / "B.eml").read_bytes()
    for n, cut in enumerate((len(whole) - 1, len(whole) // 2, 3)):
        (queue / f"D{n}.eml").write_bytes(whole[:cut])
    (queue / "E.eml").write_bytes(whole.replace(b"body b", b"body X"))  # checksum wrong

    spool = Spool(tmp_path / "spool", store)
    assert spool.recover() == 2
    assert sorted(p.name for p in queue.iterdir()) == ["A.eml", "B.eml"]
    pending = sorted((p.queue_id, p.rcpt, p.mail_from) for p in spool.pending())
    assert pending == [("A", "a@corp.example", "s@x.example"),
                       ("A", "b@corp.example", "s@x.example"), ("B", "c@corp.example", "")]
    assert spool.read("A") == b"Received: x\r\nSubject: a\r\n\r\nbody a\r\n"
