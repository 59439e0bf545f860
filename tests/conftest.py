"""Shared fixtures. `world`: fed, s1 and s2 running as real processes for a whole module;
`systems`: two fake mail systems; `postgres`: a private PostgreSQL server for a module;
`shared_url`: fed's shared database on it, emptied for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from fed.routing.shared_db import metadata

from fedutil import FakeSystem
from pgutil import PrivatePostgres
from world import World


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One embedded world per test module; tests use their own addresses in it."""
    w = World(tmp_path_factory.mktemp("world"))
    yield w
    w.stop()


@pytest.fixture
def systems() -> Iterator[tuple[FakeSystem, FakeSystem]]:
    """Two fake mail systems on loopback for fed's tests: s1 speaks LMTP, s2 SMTP (a test
    module may define its own `systems`)."""
    s1, s2 = FakeSystem("s1").start(), FakeSystem("s2", protocol="smtp").start()
    yield s1, s2
    s1.stop()
    s2.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server (its own data directory and port) for one test module."""
    server = PrivatePostgres().start()
    yield server
    server.stop()


@pytest.fixture
def shared_url(postgres: PrivatePostgres) -> str:
    """The module's PostgreSQL as fed's shared database, emptied for each test."""
    engine = create_engine(postgres.url)
    metadata.drop_all(engine)
    engine.dispose()
    return postgres.url
