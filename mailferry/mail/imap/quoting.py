"""IMAP quoted strings (RFC 3501 section 4.3): the one way mailferry quotes and unquotes.

Mailbox names are quoted after modified UTF-7 encoding (`mutf7`), so what is quoted here is
ASCII; a backslash and a double quote are the two characters escaped.
"""

from __future__ import annotations

from mailferry.mail.imap import mutf7


def quote(text: str) -> str:
    """An IMAP quoted string: ``a"b`` -> ``"a\\"b"``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_bytes(text: str) -> bytes:
    """`quote`, as the bytes a command is made of."""
    return quote(text).encode()


def quote_mailbox(name: str) -> bytes:
    """A Unicode mailbox name on the wire: modified UTF-7, quoted."""
    return quote_bytes(mutf7.encode(name))


def unquote(text: str) -> str:
    """The inverse of `quote`; text that is not quoted (an atom) is returned as is."""
    text = text.strip()
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text
