"""Shared fixtures. `world`: fed, s1 and s2 running as real processes for a whole module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedutil import FakeSystem
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
