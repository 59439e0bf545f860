"""Shared fixtures. `world`: fed, s1 and s2 running as real processes for a whole module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from world import World


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One embedded world per test module; tests use their own addresses in it."""
    w = World(tmp_path_factory.mktemp("world"))
    yield w
    w.stop()
