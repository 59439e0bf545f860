"""Candidate keys of the admin's SQL alias maps (`reconciler.drivers.pfdovecot_keys`).

The .cf reading and the query shapes are pure; the key listing runs against a real SQLite
file (in WAL mode, rows still in the log, the admin's files byte-identical after) and a real
private PostgreSQL (tests/pgutil.py), read-only, with the password never in a message. The
end-to-end path with Postfix deciding each key is tests/test_adopt.py.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from reconciler.drivers.hosts import LocalHost
from reconciler.drivers.pfdovecot_keys import (
    CfError,
    KeyColumns,
    find_alias_keys,
    key_columns,
    parse_cf,
    pgsql_keys,
    sqlite_keys,
)

from pgutil import PrivatePostgres
from sysutil import free_port

DOMAINS = ("corp.example", "other.example")


def columns(query: str) -> KeyColumns:
    return key_columns({"query": query}, "x.cf")


def test_parse_cf_continuations_comments_and_bad_lines() -> None:
    text = ("# the admin's map\n\ndbpath = /var/lib/mail.sqlite\nquery = SELECT goto\n"
            "  FROM alias\n\tWHERE address = '%s'\n  # a comment inside\nhosts=db1 db2\n")
    assert parse_cf(text, "a.cf") == {"dbpath": "/var/lib/mail.sqlite", "hosts": "db1 db2",
                                      "query": "SELECT goto FROM alias WHERE address = '%s'"}
    with pytest.raises(CfError, match=r"^b\.cf:3: not a 'name = value' line$"):
        parse_cf("dbpath = /x\n\nSELECT goto FROM alias\n", "b.cf")
    with pytest.raises(CfError, match=r"^c\.cf:1: a continuation line"):
        parse_cf("  query = x\n", "c.cf")


def test_plain_query_shapes() -> None:
    assert columns("SELECT goto FROM alias WHERE address='%s' AND active = '1'") == \
        KeyColumns("alias", ("address",), "s")
    assert columns("select goto from \"alias\" where '%s' = \"address\";") == \
        KeyColumns("alias", ("address",), "s")
    assert columns("SELECT goto FROM public.forward WHERE local = '%u' AND domain = '%d'") == \
        KeyColumns("public.forward", ("local", "domain"), "ud")
    assert columns("SELECT goto FROM forward WHERE local = '%u'") == \
        KeyColumns("forward", ("local",), "u")
    assert key_columns({"table": "alias", "select_field": "goto", "where_field": "address"},
                       "old.cf") == KeyColumns("alias", ("address",), "s")


@pytest.mark.parametrize(("query", "why"), [
    ("SELECT goto FROM alias, alias_domain WHERE alias_domain.alias_domain = '%d' AND "
     "alias.address = '%u' || '@' || alias_domain.target_domain", "not SELECT ... FROM <one"),
    ("SELECT goto FROM alias WHERE address = '%s' OR address = '@%d'", "OR address"),
    ("SELECT goto FROM catchall WHERE domain = '%d'", "compares no column with '%s' or '%u'"),
    ("SELECT goto FROM alias WHERE lower(address) = lower('%s')", "lower(address)"),
    ("SELECT goto FROM alias WHERE address = '%s' AND tld = '%1'", "tld = '%1'"),
    ("DELETE FROM alias", "not SELECT"),
])
def test_other_shapes_are_refused_saying_why(query: str, why: str) -> None:
    with pytest.raises(CfError) as caught:
        columns(query)
    assert str(caught.value).startswith("x.cf: ") and why in str(caught.value)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def test_sqlite_keys_from_a_private_copy_with_its_log(tmp_path: Path) -> None:
    db = tmp_path / "mail.sqlite"
    admin = sqlite3.connect(db)
    admin.execute("PRAGMA journal_mode=WAL")
    admin.execute("PRAGMA wal_autocheckpoint=0")  # the rows below stay in mail.sqlite-wal
    admin.execute("CREATE TABLE forward (local TEXT, domain TEXT, goto TEXT)")
    admin.executemany("INSERT INTO forward VALUES (?, ?, ?)", [
        ("Sales", "corp.example", "b01@corp.example"), ("help", "corp.example", "b02"),
        (None, "corp.example", "x")])
    admin.commit()
    assert (tmp_path / "mail.sqlite-wal").stat().st_size > 0
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    cf = {"dbpath": str(db)}
    found = sqlite_keys(LocalHost(), cf, KeyColumns("forward", ("local", "domain"), "ud"),
                        "f.cf", DOMAINS)
    assert found == {"sales@corp.example", "help@corp.example"}
    found = sqlite_keys(LocalHost(), cf, KeyColumns("forward", ("local",), "u"), "f.cf",
                        DOMAINS)
    assert found == {f"{u}@{d}" for u in ("sales", "help") for d in DOMAINS}
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before  # never opened in place
    admin.close()
    with pytest.raises(CfError, match="no such table: nope"):
        sqlite_keys(LocalHost(), cf, KeyColumns("nope", ("a",), "s"), "f.cf", DOMAINS)
    with pytest.raises(CfError, match=r"dbpath .*absent.sqlite does not exist \(local\)"):
        sqlite_keys(LocalHost(), {"dbpath": str(tmp_path / "absent.sqlite")},
                    KeyColumns("forward", ("local",), "u"), "f.cf", DOMAINS)
    with pytest.raises(CfError, match=r"^f\.cf: no dbpath$"):
        sqlite_keys(LocalHost(), {}, KeyColumns("forward", ("local",), "u"), "f.cf", DOMAINS)


def test_every_map_gets_the_candidates_and_unreadable_ones_a_warning(tmp_path: Path) -> None:
    db = tmp_path / "mail.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alias (address TEXT, goto TEXT)")
        conn.execute("INSERT INTO alias VALUES ('sales@corp.example', 'b01@corp.example')")
    conn.close()
    good, bad = tmp_path / "aliases.cf", tmp_path / "join.cf"
    good.write_text(f"dbpath = {db}\nquery = SELECT goto FROM alias WHERE address = '%s'\n")
    bad.write_text(f"dbpath = {db}\nquery = SELECT goto FROM alias a JOIN x ON a.id = x.id "
                   "WHERE x.address = '%s'\n")
    tables = [(f"sqlite:{good}", "sqlite"), (f"proxy:sqlite:{bad}", "sqlite"),
              ("ldap:/etc/postfix/ldap-aliases.cf", "ldap")]
    found = find_alias_keys(LocalHost(), tables, DOMAINS, ["Support@corp.example", " "])
    assert found.keys == {f"sqlite:{good}": {"sales@corp.example", "support@corp.example"},
                          f"proxy:sqlite:{bad}": {"support@corp.example"},
                          "ldap:/etc/postfix/ldap-aliases.cf": {"support@corp.example"}}
    assert [w.split(": ", 1)[0] for w in found.warnings] == [
        f"proxy:sqlite:{bad}", "ldap:/etc/postfix/ldap-aliases.cf"]
    assert "not SELECT ... FROM <one table>" in found.warnings[0]
    assert "the keys of a ldap map cannot be enumerated" in found.warnings[1]
    assert all("fix: list the aliases' addresses" in w for w in found.warnings)
    assert found.notes == [f"sqlite:{good}: 1 key(s) in alias (address), each asked of Postfix"]


def test_pgsql_keys_read_only_and_the_password_never_shown(postgres: PrivatePostgres) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres",
                         dbname="mailferry", autocommit=True) as conn:
        conn.execute("CREATE TABLE alias (address TEXT PRIMARY KEY, goto TEXT NOT NULL)")
        conn.execute("INSERT INTO alias VALUES ('sales@corp.example', 'b01@corp.example'), "
                     "('@corp.example', 'catchall@corp.example')")
    cf = {"hosts": f"inet:127.0.0.1:{free_port()} 127.0.0.1:{postgres.port}",
          "dbname": "mailferry", "user": "postgres", "password": "s3cret-pw-77"}
    cols = columns("SELECT goto FROM alias WHERE address = '%s'")
    # the first host refuses: Postfix would try the next one, and so does the listing
    assert pgsql_keys(LocalHost(), cf, cols, "pg.cf", DOMAINS) == {
        "sales@corp.example", "@corp.example"}
    refused = {**cf, "hosts": f"127.0.0.1:{free_port()}"}
    with pytest.raises(CfError) as caught:
        pgsql_keys(LocalHost(), refused, cols, "pg.cf", DOMAINS)
    assert str(caught.value).startswith("pg.cf: 127.0.0.1: ")
    assert "s3cret-pw-77" not in str(caught.value) and "s3cret" not in repr(caught.value)
    with pytest.raises(CfError, match="no_table"):
        pgsql_keys(LocalHost(), cf, KeyColumns("no_table", ("a",), "s"), "pg.cf", DOMAINS)
