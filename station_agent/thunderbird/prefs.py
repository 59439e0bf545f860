"""Reading and rewriting Thunderbird's `prefs.js` without losing a byte we did not mean to change.

Why a parser of our own. `prefs.js` is JavaScript-looking text, one `user_pref("key", value);`
per line, where a value is a string (with JavaScript escapes), an integer or a boolean.
Thunderbird rewrites the file itself on exit, but the agent edits it while the client is
closed, and whatever it writes is what the user gets on next start: a dropped line is a lost
setting, a mangled escape a broken account. So the file is kept as its list of lines; a
line that is a pref we did not touch is written back *verbatim*, comments and unknown lines
(`pref(...)`, blank lines, the "DO NOT EDIT" header) too, in their order. A changed pref gets
a freshly serialised line in place; a new one is appended at the end (Thunderbird sorts the
file on its next write anyway).

Writes are atomic (temporary file, fsync, rename; `fsutil.atomic_write`): a power cut leaves
the old or the new prefs.js, never half of one -- a truncated prefs.js silently loses every
account.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from station_agent.fsutil import atomic_write

PrefValue = str | int | bool

_LINE = re.compile(r'^\s*user_pref\(\s*"((?:[^"\\]|\\.)*)"\s*,\s*(.*?)\s*\)\s*;\s*$')
_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"$')
_INT = re.compile(r"^[+-]?\d+$")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "'": "'", "\\": "\\", "b": "\b",
            "f": "\f", "v": "\v", "0": "\0"}


class PrefsError(Exception):
    """prefs.js cannot be read or is not what Thunderbird writes."""


def unescape(text: str) -> str:
    """A JavaScript string literal's body to its value (\\n, \\", \\xHH, \\uXXXX, pairs)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 == len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 2:i + 4]):
            out.append(chr(int(text[i + 2:i + 4], 16)))
            i += 4
        elif nxt == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[i + 2:i + 6]):
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    # \uD83D\uDE00 pairs were appended as two surrogates: join them into one character.
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16")


def escape(value: str) -> str:
    """A string value as Thunderbird writes it between double quotes."""
    return (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            .replace("\r", "\\r"))


def parse_value(text: str) -> PrefValue:
    """The value part of a user_pref line; PrefsError if it is none of string, int, bool."""
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    match = _STRING.match(text)
    if match:
        return unescape(match.group(1))
    raise PrefsError(f"unsupported value {text!r}")


def render_value(value: PrefValue) -> str:
    """A value in prefs.js syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return f'"{escape(value)}"'


@dataclass
class Pref:
    """One user_pref line: its key, value and the exact text it was read from."""

    key: str
    value: PrefValue
    raw: str | None  # None once changed: the line is rendered afresh

    def line(self) -> str:
        if self.raw is not None:
            return self.raw
        return f'user_pref("{escape(self.key)}", {render_value(self.value)});'


class Prefs:
    """prefs.js as an ordered list of lines, with lookup and edits by key."""

    def __init__(self, text: str) -> None:
        self.newline = "\r\n" if "\r\n" in text else "\n"
        self.final_newline = text.endswith(("\n", "\r\n")) or not text
        self.lines: list[str | Pref] = []
        self._index: dict[str, Pref] = {}
        for number, line in enumerate(text.splitlines(), 1):
            match = _LINE.match(line)
            if match is None:
                self.lines.append(line)  # comments, blank lines, anything else: verbatim
                continue
            try:
                value = parse_value(match.group(2))
            except PrefsError as exc:
                raise PrefsError(f"line {number}: {exc}") from None
            pref = Pref(unescape(match.group(1)), value, line)
            # A key twice: the last one wins, as when Thunderbird reads the file.
            self._index[pref.key] = pref
            self.lines.append(pref)

    @classmethod
    def load(cls, path: Path) -> Prefs:
        """Read a prefs.js file; PrefsError names the file and the problem."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PrefsError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            return cls(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PrefsError(f"{path}: not UTF-8: {exc}") from None
        except PrefsError as exc:
            raise PrefsError(f"{path}: {exc}") from None

    def get(self, key: str, default: PrefValue | None = None) -> PrefValue | None:
        pref = self._index.get(key)
        return default if pref is None else pref.value

    def get_str(self, key: str, default: str = "") -> str:
        value = self.get(key)
        return value if isinstance(value, str) else default

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix`, in file order."""
        return [k for k in self._index if k.startswith(prefix)]

    def set(self, key: str, value: PrefValue) -> None:
        """Change a pref in place (only if the value differs) or append it."""
        pref = self._index.get(key)
        if pref is None:
            pref = Pref(key, value, None)
            self._index[key] = pref
            self.lines.append(pref)
        elif pref.value != value or type(pref.value) is not type(value):
            # Every line of a duplicated key must agree, or the earlier one could win later.
            for line in self.lines:
                if isinstance(line, Pref) and line.key == key:
                    line.value, line.raw = value, None

    def delete(self, key: str) -> bool:
        """Remove every line of a pref; False if it was absent."""
        if key not in self._index:
            return False
        del self._index[key]
        self.lines = [ln for ln in self.lines if not (isinstance(ln, Pref) and ln.key == key)]
        return True

    def render(self) -> bytes:
        """The file's new bytes (same line endings as read)."""
        text = self.newline.join(ln if isinstance(ln, str) else ln.line() for ln in self.lines)
        if self.final_newline and self.lines:
            text += self.newline
        return text.encode("utf-8")

    def save(self, path: Path) -> None:
        """Write atomically (the old file or the new one survives a crash, never half)."""
        atomic_write(path, self.render())
