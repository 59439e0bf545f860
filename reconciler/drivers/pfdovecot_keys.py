"""Candidate keys of the admin's alias maps that Postfix cannot list (``sqlite:``, ``pgsql:``).

``postmap -s`` lists an indexed file; a SQL or LDAP map can only be *asked* (``postmap -q``),
and the keys of an alias table are not known in advance. So adoption gets candidate keys
from the backing store the map's own ``.cf`` file names, read-only, and then asks Postfix
itself for all of them (``postmap -q -``): Postfix's answer, not this module's reading of the
SQL, decides what each key is an alias of.

A key column can be read when the ``.cf`` has the plain shape Postfix documents for
``sqlite_table(5)`` / ``pgsql_table(5)``:

- ``query = SELECT <anything> FROM <table> WHERE <col> = '%s' [AND <cond without %>]...``
  (the key column is ``<col>``);
- ``... WHERE <lcol> = '%u' AND <dcol> = '%d' ...`` (keys ``lcol@dcol``);
- ``... WHERE <lcol> = '%u' ...`` alone (keys ``lcol@DOMAIN`` for each of the spec's domains);
- the older ``table`` / ``select_field`` / ``where_field`` form (key column ``where_field``).

Anything else (a join, ``OR``, ``%d`` alone, ``%1``..``%9``, ``%[SUD]``, a function around the
key, LDAP) is refused with a warning saying what to do: list the aliases' addresses in the
file ``postfixDovecot.aliasCandidates`` names. Those addresses, and the Dovecot users'
addresses, are asked of every alias map whatever its type.

Reads go through the system's `Host`: a SQLite database is read with the host's own file
read (``cat`` over SSH) into a private temporary copy, never opened in place; a PostgreSQL
database is asked in a read-only transaction with the ``.cf``'s ``hosts``, ``dbname``, ``user``
and ``password`` (the password goes to the driver only: never into a message).
"""

from __future__ import annotations

import re
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.drivers.hosts import Host, HostError

FIX = ("fix: list the aliases' addresses, one a line, in a file and name it in "
       "postfixDovecot.aliasCandidates (Postfix is asked for each)")
_IDENT = r'(?:"[^"]+"|`[^`]+`|[A-Za-z_][A-Za-z0-9_$]*)'
_NAME = rf"{_IDENT}(?:\.{_IDENT})?"
_QUERY = re.compile(rf"^\s*SELECT\s+.+?\s+FROM\s+(?P<table>{_NAME})\s+WHERE\s+(?P<where>.+?)"
                    r"\s*;?\s*$", re.IGNORECASE | re.DOTALL)
_KEY_COND = re.compile(rf"^\(?\s*(?:(?P<col>{_NAME})\s*=\s*(?P<q>['\"])%(?P<e>[sud])(?P=q)|"
                       rf"(?P<q2>['\"])%(?P<e2>[sud])(?P=q2)\s*=\s*(?P<col2>{_NAME}))\s*\)?$",
                       re.IGNORECASE)
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)


class CfError(ValueError):
    """A map's .cf file mailferry cannot read: the message names FILE:LINE or the parameter."""


@dataclass(frozen=True)
class KeyColumns:
    """Where an alias table keeps its keys: `table`, and `columns` read as `form`."""

    table: str
    columns: tuple[str, ...]  # ("address",) for %s and %u; ("local", "domain") for %u + %d
    form: str  # "s": full keys; "ud": local@domain; "u": local parts only


@dataclass
class AliasKeys:
    """Candidate keys per alias map, and what the admin should know about the others."""

    keys: dict[str, set[str]] = field(default_factory=dict)  # table -> candidate keys
    warnings: list[str] = field(default_factory=list)  # each with its fix
    notes: list[str] = field(default_factory=list)


def parse_cf(text: str, where: str) -> dict[str, str]:
    """A Postfix database .cf (``name = value`` lines, ``#`` comments, a line that starts
    with white space continues the one before) -> name -> value. CfError at FILE:LINE."""
    values: dict[str, str] = {}
    last: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if last is None:
                raise CfError(f"{where}:{number}: a continuation line before any parameter")
            values[last] += " " + line.strip()
            continue
        name, eq, value = line.partition("=")
        if not eq or not name.strip():
            raise CfError(f"{where}:{number}: not a 'name = value' line")
        last = name.strip()
        values[last] = value.strip()
    return values


def _unquote(name: str) -> str:
    return ".".join(part.strip('"`') for part in re.findall(_IDENT, name))


def key_columns(cf: dict[str, str], where: str) -> KeyColumns:
    """The key column(s) of a plain lookup query (module docstring), or CfError saying why
    mailferry cannot read this one."""
    if "query" not in cf:
        if "table" in cf and "where_field" in cf:  # the form before Postfix 2.2's query
            return KeyColumns(_unquote(cf["table"]), (_unquote(cf["where_field"]),), "s")
        raise CfError(f"{where}: no query (and no table/where_field)")
    query = cf["query"]
    shape = _QUERY.match(query)
    if shape is None:
        raise CfError(f"{where}: the query is not SELECT ... FROM <one table> WHERE ...")
    conds = _AND.split(shape["where"])
    keys: dict[str, str] = {}
    for cond in conds:
        found = _KEY_COND.match(cond.strip())
        if found is not None:
            expansion = (found["e"] or found["e2"]).lower()
            if expansion in keys:
                raise CfError(f"{where}: %{expansion} is compared twice")
            keys[expansion] = _unquote(found["col"] or found["col2"])
        elif "%" in cond or re.search(r"\bOR\b|\bSELECT\b", cond, re.IGNORECASE):
            raise CfError(f"{where}: the condition {cond.strip()!r} is not <column> = '%s' / "
                          "'%u' / '%d' nor free of % expansions")
    table = _unquote(shape["table"])
    if "s" in keys:
        return KeyColumns(table, (keys["s"],), "s")
    if "u" in keys and "d" in keys:
        return KeyColumns(table, (keys["u"], keys["d"]), "ud")
    if "u" in keys:
        return KeyColumns(table, (keys["u"],), "u")
    raise CfError(f"{where}: the query compares no column with '%s' or '%u' (a lookup by "
                  "domain alone answers for every address of it)")


def _select(columns: KeyColumns) -> str:
    quoted = ", ".join(".".join(f'"{p}"' for p in c.split(".")) for c in columns.columns)
    table = ".".join(f'"{p}"' for p in columns.table.split("."))
    return f"SELECT {quoted} FROM {table}"


def _keys_of(rows: Iterable[tuple[object, ...]], columns: KeyColumns,
             domains: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    for row in rows:
        if any(v is None for v in row):
            continue
        values = [str(v).strip().lower() for v in row]
        if columns.form == "s":
            found.add(values[0])
        elif columns.form == "ud":
            found.add(f"{values[0]}@{values[1]}")
        else:
            found.update(f"{values[0]}@{d}" for d in domains)
    return {k for k in found if k and "\n" not in k}


def sqlite_keys(host: Host, cf: dict[str, str], columns: KeyColumns, where: str,
                domains: tuple[str, ...]) -> set[str]:
    """The key column of a SQLite table, read from a private copy of the database (and its
    write-ahead log) fetched through the host: the admin's file is never opened."""
    dbpath = cf.get("dbpath", "")
    if not dbpath.startswith("/"):
        raise CfError(f"{where}: dbpath {dbpath!r} is not an absolute path" if dbpath
                      else f"{where}: no dbpath")
    try:
        files = host.read_files([dbpath, f"{dbpath}-wal"])
    except HostError as exc:
        raise CfError(f"{where}: cannot read {dbpath}: {exc}") from exc
    data = files.get(dbpath)
    if data is None:
        raise CfError(f"{where}: dbpath {dbpath} does not exist ({host.label})")
    with tempfile.TemporaryDirectory(prefix="mailferry-keys-") as tmp:
        copy = Path(tmp) / "copy.sqlite"
        copy.write_bytes(data)
        wal = files.get(f"{dbpath}-wal")
        if wal:
            Path(f"{copy}-wal").write_bytes(wal)
        try:
            conn = sqlite3.connect(copy)
            try:
                rows = conn.execute(_select(columns)).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise CfError(f"{where}: {_select(columns)} on {dbpath}: {exc}") from exc
    return _keys_of(rows, columns, domains)


def _pg_targets(hosts: str) -> list[tuple[str, int | None]]:
    """Postfix's pgsql ``hosts`` (``host``, ``host:port``, ``inet:host:port``, ``unix:/dir``)
    -> (host or socket folder, port) in the order Postfix tries them."""
    found: list[tuple[str, int | None]] = []
    for item in hosts.replace(",", " ").split():
        if item.startswith("unix:"):
            found.append((item[5:], None))
            continue
        item = item.removeprefix("inet:")
        name, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        found.append((name or item, int(port) if port.isdigit() else None))
    return found or [("localhost", None)]


def pgsql_keys(host: Host, cf: dict[str, str], columns: KeyColumns, where: str,
               domains: tuple[str, ...]) -> set[str]:
    """The key column of a PostgreSQL table, asked in a read-only transaction."""
    import psycopg  # only adopted pgsql: maps need it

    targets = _pg_targets(cf.get("hosts", ""))
    if host.label != "local" and all(h in ("localhost", "127.0.0.1", "::1") or h.startswith("/")
                                     for h, _ in targets):
        raise CfError(f"{where}: its hosts ({cf.get('hosts', 'localhost')}) are local to "
                      f"{host.label}: mailferry does not reach them from here")
    password = cf.get("password", "")
    said: list[str] = []
    for name, port in targets:
        try:
            with psycopg.connect(host=name, port=port, dbname=cf.get("dbname", ""),
                                 user=cf.get("user", ""), password=password or None,
                                 connect_timeout=10) as conn:
                conn.read_only = True
                rows = conn.execute(_select(columns)).fetchall()
                return _keys_of(rows, columns, domains)
        except psycopg.Error as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            said.append(f"{name}: {text.replace(password, '***') if password else text}")
    raise CfError(f"{where}: {'; '.join(said)[:300]}")


READERS = {"sqlite": sqlite_keys, "pgsql": pgsql_keys}


def find_alias_keys(host: Host, tables: list[tuple[str, str]], domains: tuple[str, ...],
               candidates: Iterable[str] = ()) -> AliasKeys:
    """Candidate keys for each of `tables` ((table, map type) of maps that cannot be listed):
    the keys their backing store holds when it can be read, plus `candidates` (the admin's
    list and the Dovecot users' addresses) for every one."""
    given = {c.strip().lower() for c in candidates if c.strip()}
    found = AliasKeys()
    for table, kind in tables:
        found.keys[table] = set(given)
        path = table.split(":")[-1]
        reader = READERS.get(kind)
        if reader is None or not path.startswith("/"):
            found.warnings.append(
                f"{table}: the keys of a {kind} map cannot be enumerated; only the Dovecot "
                f"users' addresses and aliasCandidates are asked of it. {FIX}")
            continue
        try:
            raw = host.read_file(path)
            if raw is None:
                raise CfError(f"{path}: does not exist ({host.label})")
            cf = parse_cf(raw.decode("utf-8", "replace"), path)
            columns = key_columns(cf, path)
            keys = reader(host, cf, columns, path, domains)
        except (CfError, HostError) as exc:
            found.warnings.append(f"{table}: mailferry cannot list its keys ({exc}); only the "
                                  f"Dovecot users' addresses and aliasCandidates are asked of "
                                  f"it. {FIX}")
            continue
        found.keys[table] |= keys
        found.notes.append(f"{table}: {len(keys)} key(s) in {columns.table} "
                           f"({' @ '.join(columns.columns)}), each asked of Postfix")
    return found


def read_candidates(path: str) -> list[str]:
    """An aliasCandidates file (on the reconciler's machine): one address a line, ``#``
    comments."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.split("#", 1)[0].strip() for line in text.splitlines()
            if line.split("#", 1)[0].strip()]
