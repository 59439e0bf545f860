"""fed's log output: human text or one JSON object per line (``--log-format``).

Mail admins follow a message through a hub by its queue id (Postfix's ``grep QID
maillog``); a log pipeline (Loki, Elasticsearch) wants that id as a field, not buried in
free text. So every record about a message carries ``queue_id``: code that knows it passes
``extra={"queue_id": ...}``; for the rest, ``QueueIdFilter`` recognises a queue id as the
first argument of the message (fed's long-standing ``"%s ..." % queue_id`` style), so older
log calls get the field too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import time

_QUEUE_ID = re.compile(r"^[0-9A-F]{20}$")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class QueueIdFilter(logging.Filter):
    """Give every record a ``queue_id`` attribute (None when it is about no message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Never drops a record; only annotates it."""
        if getattr(record, "queue_id", None) is None:
            first = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.queue_id = first if isinstance(first, str) and _QUEUE_ID.match(first) \
                else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, queue_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "queue_id": getattr(record, "queue_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) or value is None \
                    else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with ``[QUEUEID]`` after the logger name when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(qid)s: %(message)s")
        self._second = -1
        self._seconds_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's own form, its seconds formatted once a second: ``localtime`` and
        ``strftime`` for every record were 1.6 % of fed's CPU at ten clients."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._seconds_text = time.strftime(self.default_time_format,
                                               self.converter(second))
            self._second = second
        msec_format = self.default_msec_format
        return msec_format % (self._seconds_text, record.msecs) if msec_format else \
            self._seconds_text

    def format(self, record: logging.LogRecord) -> str:
        """The record as a text line."""
        queue_id = getattr(record, "queue_id", None)
        record.qid = f" [{queue_id}]" if queue_id else ""
        return super().format(record)


def lean_records() -> None:
    """Records without what fed's formats never print: the caller's file, line and function
    (a walk up the stack per record), thread, process and multiprocessing names (a getpid
    system call each). The logging HOWTO's "Optimization" switches; fed logs a line or two per
    message, and making the record was most of that line's cost."""
    logging._srcfile = None  # the HOWTO's documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send fed's logs to stderr in the chosen format ('text' or 'json')."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(QueueIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    lean_records()
    # aiosmtpd logs every SMTP command at INFO; fed logs its own decisions instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
