"""Pure helpers of fed's edge: address keys, relay networks, log records, metrics hooks."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fed.queue.queuefile import Envelope, envelope_json, new_queue_id
from fed.smtp.policy import RelayPolicy, client_ip, is_loopback, parse_networks
from fed.smtp.server import has_bare_newline, normalize_eols
from fed.telemetry import metrics
from fed.telemetry.logs import JsonFormatter, QueueIdFilter, TextFormatter, lean_records
from mailferry.mail import addresses
from mailferry.mail.addresses import address_key, has_forbidden, is_valid, preserve
from mailferry.mail.messageid import message_id_of
from mailferry.mail.messageid import message_id_parsed as _message_id_parsed


@pytest.fixture
def case_sensitive() -> Iterator[None]:
    addresses.set_case_sensitive_local(True)
    yield
    addresses.set_case_sensitive_local(False)


def test_address_key_and_preserve() -> None:
    assert address_key(" <Jean.Dupont@Corp.EXAMPLE> ") == "jean.dupont@corp.example"
    assert address_key("J\u00d6S\u00c9@Corp.Example") == "j\u00f6s\u00e9@corp.example"
    assert preserve("<Jean.Dupont@Corp.EXAMPLE>") == "Jean.Dupont@corp.example"
    assert addresses.normalize is address_key  # the directory's historical entry point
    assert address_key("a@b@Corp.Example") == "a@b@corp.example"  # last @ splits


def test_case_sensitive_local_parts(case_sensitive: None) -> None:
    assert address_key("Jean@CORP.example") == "Jean@corp.example"
    assert address_key("jean@corp.example") != address_key("Jean@corp.example")


def test_validity_and_forbidden_characters() -> None:
    assert is_valid("a@corp.example") and is_valid("Jean@corp.example")
    assert is_valid("m\u00e9@ex\u00e4mple.example")
    for bad in ("a\x00@corp.example", "a@corp.example\x00", "a b@corp.example", "<a>@x.y",
                "nodomain", "a@", "a@[1.2.3.4]"):
        assert not is_valid(bad), bad
    assert has_forbidden("a\x00b") and has_forbidden("a\udcffb") and has_forbidden("a\rb")
    assert not has_forbidden("j\u00f6@x.y")


def test_relay_networks_and_client_ips() -> None:
    policy = RelayPolicy(tuple(parse_networks(["10.1.0.0/16", "fd00::/8"])))
    assert policy.in_networks(("10.1.2.3", 25)) and not policy.in_networks(("10.2.0.1", 25))
    assert policy.in_networks(("::ffff:10.1.2.3", 25, 0, 0))  # IPv4-mapped
    assert policy.in_networks(("fd00::5", 25, 0, 0)) and not policy.in_networks(("::1", 1))
    assert not policy.in_networks(None) and client_ip("garbage") is None
    assert parse_networks(["none"]) == []
    assert is_loopback(("127.0.0.2", 1)) and is_loopback(("::1", 1, 0, 0))
    assert not is_loopback(("192.0.2.7", 1))
    # A local sender alone opens nothing; authentication alone does.
    assert not policy.may_relay(("192.0.2.7", 1), False, True)
    assert not policy.may_relay(("10.1.2.3", 1), False, False)
    assert policy.may_relay(("10.1.2.3", 1), False, True)
    assert policy.may_relay(("192.0.2.7", 1), True, False)


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("fed.delivery", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    QueueIdFilter().filter(rec)
    return rec


def test_log_records_carry_the_queue_id() -> None:
    qid = new_queue_id()
    line = json.loads(JsonFormatter().format(record("%s <%s> -> %s: ok", qid, "a@x", "p")))
    assert line["queue_id"] == qid and line["msg"].startswith(qid)
    assert line["level"] == "info" and line["logger"] == "fed.delivery"
    explicit = json.loads(JsonFormatter().format(record("spooled", queue_id="Q1", size=3)))
    assert explicit["queue_id"] == "Q1" and explicit["size"] == 3
    assert json.loads(JsonFormatter().format(record("%s things", "notaqid")))["queue_id"] \
        is None
    assert f"fed.delivery [{qid}]: {qid} x" in TextFormatter().format(record("%s x", qid))


def test_lean_records_skip_what_no_format_prints_and_the_lines_stay_the_same() -> None:
    """fed's records carry no caller (a stack walk), thread or process (a getpid each):
    neither format prints them, so the lines are the same as with them."""
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses,
             logging.logMultiprocessing)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            seen.append(rec)

    logger = logging.getLogger("fed.test-lean")
    logger.addHandler(Keep())
    logger.propagate = False
    qid = new_queue_id()
    try:
        logger.warning("%s queued", qid)
        lean_records()
        logger.warning("%s queued", qid)
    finally:
        (logging._srcfile, logging.logThreads, logging.logProcesses,
         logging.logMultiprocessing) = saved
        logger.handlers.clear()
    full, lean = seen
    assert full.funcName == "test_lean_records_skip_what_no_format_prints_and_the_lines_stay_" \
        "the_same" and full.process is not None and full.threadName is not None
    assert lean.funcName == "(unknown function)" and lean.lineno == 0
    assert lean.process is None and lean.threadName is None
    for rec in (full, lean):
        QueueIdFilter().filter(rec)
        rec.created, rec.msecs = full.created, full.msecs  # msecs is made from created once
    assert TextFormatter().format(full) == TextFormatter().format(lean)
    assert JsonFormatter().format(full) == JsonFormatter().format(lean)


def test_the_text_lines_time_is_loggings_own_though_formatted_once_a_second() -> None:
    """TextFormatter caches the seconds of its timestamp: the same text as logging's
    Formatter for records in one second, the next one, and a second seen again later."""
    ours, theirs = TextFormatter(), logging.Formatter()
    base = float(int(time.time()))
    for offset in (0.001, 0.5, 0.999, 1.0, 1.25, 61.7, 0.3, 3600.0):
        rec = record("x")
        rec.created = base + offset
        rec.msecs = (rec.created - int(rec.created)) * 1000
        assert ours.formatTime(rec) == theirs.formatTime(rec), offset
    assert ours.formatTime(rec, "%H") == theirs.formatTime(rec, "%H")


@given(st.text(), st.lists(st.text(), min_size=1, max_size=4), st.none() | st.text(),
       st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**40))
def test_the_queue_files_envelope_is_json_dumps_byte_for_byte(
        mail_from: str, rcpts: list[str], message_id: str | None, received_at: float) -> None:
    """Queue files already on disk (and their checksums) were written by json.dumps: the
    hand-built form must be the same bytes, for any text (quotes, controls, non-ASCII,
    surrogates) and any number."""
    envelope = Envelope(new_queue_id(), mail_from, tuple(rcpts), message_id, received_at, 0)
    assert envelope_json(envelope) == json.dumps({
        "queue_id": envelope.queue_id, "mail_from": mail_from, "rcpts": rcpts,
        "message_id": message_id, "received_at": received_at}, separators=(",", ":")).encode()


def test_queue_id_time_feeds_the_latency_histogram() -> None:
    qid = new_queue_id()
    at = metrics.queued_at(qid)
    assert at is not None and abs(at - time.time()) < 60
    assert metrics.queued_at("not-hex-at-all") is None
    before = next(iter(metrics.LATENCY.collect())).samples
    count = next(s.value for s in before if s.name.endswith("_count"))
    metrics.count_delivery("delivered", "s1", qid)
    metrics.count_delivery("deferred", "s1", qid)
    after = next(iter(metrics.LATENCY.collect())).samples
    assert next(s.value for s in after if s.name.endswith("_count")) == count + 1


@pytest.mark.parametrize("data", [
    b"Subject: x\r\nMessage-ID:   <a@b>  \r\nX: y\r\n\r\nbody",
    b"Message-id: <c@d>\r\n\r\n",
    b"From: a\r\n\r\nMessage-ID: <in-the-body@x>\r\n",
    b"Subject: x\r\nMessage-ID:\r\n <folded@b>\r\n\r\n",
    b"Message-ID: <first@b>\r\nMessage-ID: <second@d>\r\n\r\n",
    b"not a header\r\nMessage-ID: <a@b>\r\n\r\n",
    b"Subject: \xc3\xa9t\xc3\xa9\r\nMessage-ID: <utf8@b>\r\n\r\n",
    b"Message-ID: <no-body@b>",
    b"X-Message-ID: <q@x>\r\nMessage-ID: <r@x>\r\n\r\n",
    b"Message-ID : <space-before-colon@b>\r\n\r\n",
    b"\r\n\r\nMessage-ID: <x@x>\r\n",
    b"From someone Thu Dec  3\r\nMessage-ID: <mbox@x>\r\n\r\n",
    b"Message-ID: " + b"<" + b"x" * 2000 + b"@long>\r\n\r\n",
])
def test_message_id_fast_path_answers_as_the_parser(data: bytes) -> None:
    end = data.find(b"\r\n\r\n")
    assert message_id_of(data) == _message_id_parsed(data if end < 0 else data[:end])


@given(st.binary(max_size=40).map(lambda raw: bytes(b"ab\r\n"[c % 4] for c in raw)))
def test_the_bare_newline_check_agrees_with_its_definition(data: bytes) -> None:
    # A CR not followed by LF, or an LF not preceded by CR (the regular expression the
    # three counts replaced); inputs of CR, LF and two letters only, where it is hard.
    expected = re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None
    assert has_bare_newline(data) is expected
    assert not has_bare_newline(normalize_eols(data))


def test_a_client_address_is_parsed_once_and_the_same_for_every_form() -> None:
    assert client_ip(("::ffff:127.0.0.1", 25, 0, 0)) == client_ip(("127.0.0.1", 25))
    assert client_ip(("fe80::1%eth0", 25, 0, 2)) == client_ip(("fe80::1", 25))
    assert client_ip(("not an address", 25)) is None and client_ip(None) is None
    assert client_ip(("10.0.0.7", 1)) is client_ip(("10.0.0.7", 2))  # cached per address
