"""The station API's OpenAPI description, fuzzed against the real running API (schemathesis).

Why. The description at `/v1/openapi.json` is what other tools and future agents trust; a
fuzzer generating requests from it and checking every answer against it finds both kinds of
lie: routes that crash (500) on input the description allows or forbids, and answers the
description does not announce (status codes, bodies). The run is bounded (a few dozen
examples per route, no deadline) so it takes seconds. What it found so far, all fixed in the
API: 405 answers without `Allow`; a 500 on `"kind": {}` (unhashable); huge `migration_id` and
`internal_date` values crashing the database driver or the storage; `69.0` refused as an
integer; a folder name too long for the target's storage answered 503 (retry forever) instead
of a refusal; empty or non-base64 `data` allowed by the description.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from reconciler.api.stations import OPENAPI

from stationkit import STATION, World, add_migration, world

__all__ = ["world"]  # the fixture, imported for pytest

schema = schemathesis.openapi.from_dict(OPENAPI)
# Bounded and reproducible in CI; FUZZ_EXAMPLES=600 explores further with fresh randomness.
_EXAMPLES = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXAMPLES or 40), deadline=None, derandomize=not _EXAMPLES,
                suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_own_station_routes_keep_their_description(case: Any, world: World) -> None:
    if not getattr(world, "_fuzz_migration", False):
        add_migration(world.store, action="local-migrate", state=8)
        world._fuzz_migration = True  # type: ignore[attr-defined]
    if "name" in (case.path_parameters or {}):
        case.path_parameters["name"] = STATION
    case.call_and_validate(base_url=world.api,
                           headers={"Authorization": f"Bearer {world.tokens[STATION]}"})


@schema.parametrize()
@FUZZ
def test_any_station_name_is_refused_cleanly(case: Any, world: World) -> None:
    case.call_and_validate(base_url=world.api,
                           headers={"Authorization": f"Bearer {world.tokens[STATION]}"})


pytestmark = pytest.mark.timeout(120)
