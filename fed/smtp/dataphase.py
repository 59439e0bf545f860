"""aiosmtpd's SMTP session with a DATA phase that keeps one copy of the message, not two.

Why: aiosmtpd 1.4 collects DATA as a list with one ``bytearray`` per line and joins it at
the end. A line of 78 bytes then costs about 143 (object header, list slot), so a 10 MB
message occupies ~18 MB while it arrives and ~28 MB at the join; fifty such messages
arriving at once took fed past 1 GB. This subclass reads the same lines with the same
rules (size limit -> 552 after the data, over-long line -> 500, dot-unstuffing, end at
``<CR><LF>.<CR><LF>`` only) but appends them to one growing ``bytearray``, converts it to
``bytes`` once and drops it before the handler runs. MAIL and RCPT arguments of the plain
``<user@domain>`` form skip aiosmtpd's costly general parser (same result, checked by
tests/test_fed_queues.py), and a session is cheaper to create (``__dir__``). Everything
else is aiosmtpd's.
"""

from __future__ import annotations

import asyncio
import re

from aiosmtpd.smtp import MISSING, SMTP

_END = b".\r\n"
# The everyday MAIL/RCPT argument: <dot-atom@plain.domain> and maybe parameters after it.
_SIMPLE_ADDR = re.compile(
    r"<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\.)*[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


class LeanSMTP(SMTP):
    """aiosmtpd.smtp.SMTP with a memory-lean DATA command (and a quicker address parser)."""

    _commands: list[str] | None = None

    def __dir__(self) -> list[str]:
        """Only the SMTP commands and AUTH mechanisms.

        aiosmtpd builds its command and mechanism tables in every session's ``__init__``
        from ``dir(self)`` and ``inspect.getmembers(self)``, looking only for ``smtp_*`` and
        ``auth_*``; listing just those (once per class) makes a session 40 us cheaper to
        create, a few per cent of fed's CPU when every message comes on a new connection.
        """
        cls = type(self)
        if cls._commands is None:
            cls._commands = [name for name in object.__dir__(self)
                             if name.startswith(("smtp_", "auth_"))]
        return list(cls._commands)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser (email's header parser, and a class defined on every call) is
        a tenth of fed's CPU per message; the plain `<user@domain>` form is parsed here,
        with the same result, and anything else still goes to aiosmtpd."""
        match = _SIMPLE_ADDR.match(arg.lstrip())
        if match is None:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg.lstrip()[match.end():].lstrip()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA as in aiosmtpd 1.4, collected into a single buffer."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        buffer = bytearray()
        limit: int | None = self.data_size_limit
        size = 0
        problem = ""  # "" while the data is acceptable, else the reply to give at the end
        fragments: list[bytes] = []
        while self.transport is not None:
            try:
                line: bytes = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                # A line longer than the stream limit: drain it, answer 500 at the end.
                problem = problem or "500 Line too long (see RFC5321 4.5.3.1.6)"
                buffer = bytearray()
                line = await self._reader.read(exc.consumed)
            if not fragments and line == _END:
                break
            size += len(line)
            if not problem and limit and size > limit:
                problem = "552 Error: Too much mail data"
                buffer = bytearray()  # stop holding what will be refused anyway
            fragments.append(line)
            if line.endswith(b"\r\n"):
                if not problem:
                    whole = line if len(fragments) == 1 else b"".join(fragments)
                    if len(whole) > self.line_length_limit:
                        problem = "500 Line too long (see RFC5321 4.5.3.1.6)"
                        buffer = bytearray()
                    elif whole.startswith(b"."):
                        buffer += memoryview(whole)[1:]  # RFC 5321 4.5.2 transparency
                    else:
                        buffer += whole
                fragments.clear()
        if self.transport is None:
            return
        if problem:
            await self.push(problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = bytes(buffer)
        del buffer  # one copy of the message from here on
        self.envelope.content = content
        self.envelope.original_content = content
        status = MISSING
        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
