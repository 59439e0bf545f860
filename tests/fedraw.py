"""Raw-socket SMTP for fed's hostile-input tests, and a sink that speaks SMTPUTF8.

smtplib fixes up what it sends (line endings, dot-stuffing, address quoting), which is
exactly what an attacker does not do; these helpers put bytes on the wire unchanged.
Every read has a socket timeout, every loop a bound.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from fedutil import FakeSystem


class Raw:
    """One SMTP connection driven byte by byte."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.stream = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """One (possibly multi-line) reply; the last line, b'' if the connection closed."""
        for _ in range(100):
            line = self.stream.readline()
            if line[3:4] != b"-":
                return line
        raise AssertionError("endless multi-line reply")

    def lines(self) -> list[bytes]:
        """Every line of one multi-line reply."""
        out: list[bytes] = []
        for _ in range(100):
            line = self.stream.readline()
            out.append(line)
            if line[3:4] != b"-":
                return out
        raise AssertionError("endless multi-line reply")

    def cmd(self, line: bytes) -> bytes:
        """Send one command line (CRLF added) and read its reply."""
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> None:
        """Put bytes on the wire as they are."""
        self.sock.sendall(data)

    def close(self) -> None:
        """Close without QUIT."""
        self.stream.close()
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Utf8System(FakeSystem):
    """A FakeSystem whose listener advertises SMTPUTF8 (aiosmtpd's default does not)."""

    smtputf8: bool = True
