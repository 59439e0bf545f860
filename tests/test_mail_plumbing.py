"""The pure parts of the shared mail plumbing (`mailferry.mail`): the address parser's table,
the modified UTF-7 codec, IMAP quoting, the Maildir flag map, Message-ID extraction and the
back-off's bounds. One copy each, so one table each."""

from __future__ import annotations

import random

import pytest

from mailferry.mail import addresses
from mailferry.mail.addresses import (
    AddressError,
    mailbox_id_for,
    parse,
    physical_address,
    same_domain,
    split_physical,
)
from mailferry.mail.backoff import backoff
from mailferry.mail.imap import flags, mutf7, quoting
from mailferry.mail.messageid import message_id_of
from reconciler import plan
from reconciler.drivers import base

# -- addresses ----------------------------------------------------------------------------
PHYSICAL = [
    ("jean=corp.example@s1.invalid", ("s1", "jean=corp.example")),
    ("JEAN=Corp.Example@S1.INVALID", ("s1", "jean=corp.example")),
    ("box@pf.dc1.invalid", ("pf.dc1", "box")),  # a system name may hold dots
    ("x@.invalid", None),  # no system named: RFC 5321's empty first label
    ("@s1.invalid", None),  # no mailbox id
    ("x@invalid", None),  # the TLD alone
    ("x@s1.invalid.example", None),
    ("x@s1.invalidx", None),
    ("jean@corp.example", None),
    ("", None),
]


@pytest.mark.parametrize(("address", "expected"), PHYSICAL)
def test_physical_addresses_one_parser_for_fed_and_the_reconciler(
        address: str, expected: tuple[str, str] | None) -> None:
    assert split_physical(address) == expected
    # The reconciler's callers (drivers, the pure plan) use the very same function.
    assert base.split_physical is split_physical
    assert vars(plan)["split_physical"] is split_physical


def test_physical_address_round_trip() -> None:
    box = mailbox_id_for("Jean.Dupont@Corp.Example")
    assert box == "jean.dupont=corp.example"
    assert split_physical(physical_address("s2", box)) == ("s2", box)


ACCEPTED = [
    ("jean@corp.example", "jean", "corp.example", "corp.example"),
    ("<Jean@Corp.Example>", "Jean", "corp.example", "corp.example"),
    ("j@b\u00fccher.example", "j", "b\u00fccher.example", "xn--bcher-kva.example"),
    ("j@xn--bcher-kva.example", "j", "xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("j\u00f6@corp.example", "j\u00f6", "corp.example", "corp.example"),  # SMTPUTF8 local
    ("x@internal_domain.example", "x", "internal_domain.example", "internal_domain.example"),
]


@pytest.mark.parametrize(("text", "local", "domain", "ascii"), ACCEPTED)
def test_parse_accepts_and_gives_both_idn_forms(text: str, local: str, domain: str,
                                                 ascii: str) -> None:
    parsed = parse(text)
    assert (parsed.local, parsed.domain, parsed.domain_ascii) == (local, domain, ascii)
    assert parsed.domain_unicode == domain.replace("xn--bcher-kva", "b\u00fccher")


REFUSED = ["jean", "jean@", "a b@corp.example", "a@b@c<", "nul\x00@corp.example",
           "x@" + "a" * 320, "j@b\u00fc\u00dfcher\u200d.example"]


@pytest.mark.parametrize("text", REFUSED)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse(text)


def test_same_domain_compares_idn_forms_and_case() -> None:
    assert same_domain("B\u00fccher.Example", "xn--bcher-kva.example")
    assert not same_domain("bucher.example", "xn--bcher-kva.example")


def test_address_key_follows_the_case_setting() -> None:
    assert addresses.address_key("Jean@Corp.Example") == "jean@corp.example"
    addresses.set_case_sensitive_local(True)
    try:
        assert addresses.address_key("Jean@Corp.Example") == "Jean@corp.example"
    finally:
        addresses.set_case_sensitive_local(False)


def test_address_key_is_one_for_both_idn_forms_and_nfc() -> None:
    key = "j\u00fcrgen@xn--bcher-kva.example"
    for form in ("J\u00dcRGEN@B\u00fccher.Example", "j\u00fcrgen@xn--bcher-kva.example",
                 "<ju\u0308rgen@b\u00fccher.example>"):  # U-labels, A-labels, NFD
        assert addresses.address_key(form) == key
    assert addresses.check("Info@B\u00fccher.example") == "info@xn--bcher-kva.example"
    # no valid IDN: the key keeps the spelling (it matches nothing), check refuses it
    bad = "j@b\u00fc\u00dfcher\u200d.example"
    assert addresses.address_key(bad) == bad
    with pytest.raises(AddressError, match="not a valid IDN"):
        addresses.check(bad)


@pytest.mark.parametrize(("text", "wire"), [
    ("s@m\u00fcller.example", "s@xn--mller-kva.example"),
    ("s@corp.example", "s@corp.example"),
    ("", ""),
    ("j\u00fcrgen@corp.example", None),  # a UTF-8 local part has no ASCII form
    ("j@b\u00fc\u00dfcher\u200d.example", None),
])
def test_ascii_form_for_a_hop_without_smtputf8(text: str, wire: str | None) -> None:
    assert addresses.ascii_form(text) == wire


def test_readable_shows_u_labels() -> None:
    key, person = "j\u00fcrgen@xn--bcher-kva.example", "j\u00fcrgen@b\u00fccher.example"
    assert addresses.readable(key) == person
    assert addresses.readable("jean@corp.example") == "jean@corp.example"
    assert addresses.readable("x@xn--zz.example") == "x@xn--zz.example"  # does not decode


# -- modified UTF-7 -------------------------------------------------------------------------
NAMES = ["INBOX", "Sent", "\u00c9l\u00e9ments envoy\u00e9s", "a&b", "&", "&&-", "Tom & Jerry",
         "\u65e5\u672c\u8a9e", "\U0001f4e7 mail", "mixed \U0001f600\u00e9&x", "~peter/mail",
         "a.b", "-", "&-"]


@pytest.mark.parametrize("name", NAMES)
def test_mutf7_round_trips(name: str) -> None:
    wire = mutf7.encode(name)
    assert wire.isascii() and all(0x20 <= ord(c) <= 0x7E for c in wire)
    assert mutf7.decode(wire) == name
    dotted = mutf7.encode(name, also=".")
    assert "." not in dotted and mutf7.decode(dotted) == name


def test_mutf7_known_wire_forms() -> None:
    assert mutf7.encode("\u00c9l\u00e9ments") == "&AMk-l&AOk-ments"
    assert mutf7.encode("a&b") == "a&-b"
    assert mutf7.encode("\U0001f4e7") == "&2D3c5w-"  # a surrogate pair, as RFC 3501 says
    assert mutf7.encode("a.b", also=".") == "a&AC4-b"
    assert mutf7.decode("&Jjo-!") == "\u263a!"


def test_mutf7_decode_leaves_what_is_not_mutf7() -> None:
    assert mutf7.decode("no-dash &here") == "no-dash &here"
    assert mutf7.decode("&2D0-") == "&2D0-"  # a lone surrogate does not decode


# -- quoting ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "quoted"), [
    ("INBOX", '"INBOX"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'), ("", '""'),
    ('\\"', '"\\\\\\""'),
])
def test_quote_and_unquote(text: str, quoted: str) -> None:
    assert quoting.quote(text) == quoted
    assert quoting.quote_bytes(text) == quoted.encode()
    assert quoting.unquote(quoted) == text


def test_quote_mailbox_encodes_then_quotes() -> None:
    assert quoting.quote_mailbox("Envoy\u00e9s") == b'"Envoy&AOk-s"'
    assert quoting.unquote("INBOX") == "INBOX"  # an atom stays as it is


# -- flags ---------------------------------------------------------------------------------
def test_flag_map_both_ways() -> None:
    assert flags.to_imap("DFPRST") == ("\\Draft", "\\Flagged", "$Forwarded", "\\Answered",
                                       "\\Seen", "\\Deleted")
    assert flags.to_imap("ST", deleted=False) == ("\\Seen",)
    assert flags.to_maildir(["\\SEEN", "\\answered", "$label1", "$Forwarded", "\\Recent"]) \
        == "PRS"
    assert flags.to_maildir(flags.to_imap("TSRFDP")) == "DFPRST"


# -- Message-ID ------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "expected"), [
    (b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody", "<a@b>"),
    (b"Subject: x\nMessage-Id:  <lf@b> \n\nMessage-ID: <body@x>\n", "<lf@b>"),  # a Maildir file
    (b"Message-ID: <only-header@b>\r\n\r\n", "<only-header@b>"),  # a HEADER.FIELDS answer
    (b"\r\n", None),  # HEADER.FIELDS of a message without one
    (b"Subject: x\r\nMessage-ID:\r\n <folded@b>\r\n\r\n", "<folded@b>"),
    (b"Message-ID: \r\n\r\n", None),  # empty is none
    (b"Message-ID: <caf\xe9@b>\r\n\r\n", "<caf\xe9@b>"),  # 8-bit read as Latin-1
    (b"From: a\r\n\r\nMessage-ID: <in-the-body@x>\r\n", None),
])
def test_message_id_of(data: bytes, expected: str | None) -> None:
    assert message_id_of(data) == expected


# -- back-off --------------------------------------------------------------------------------
def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    assert [backoff(n, 5.0, 300.0, jitter=False) for n in range(1, 9)] == \
        [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert backoff(0, 1.0, jitter=False) == 1.0  # attempt 0 counts as the first
    assert backoff(10_000, 1.0, jitter=False) == 2.0 ** 60  # no cap: finite all the same


def test_backoff_jitter_stays_between_half_and_all_of_the_step() -> None:
    rng = random.Random(7)
    for attempt in range(1, 40):
        step = min(600.0, 1.0 * 2 ** (attempt - 1))
        for _ in range(20):
            delay = backoff(attempt, 1.0, 600.0, rand=rng.random)
            assert step / 2 <= delay <= step
    assert backoff(3, 1.0, 600.0, rand=lambda: 0.0) == 2.0
    assert backoff(3, 1.0, 600.0, rand=lambda: 1.0) == 4.0
