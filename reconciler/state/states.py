"""The migration states of the patent's Figure 2 (DESIGN.md, "The state machine").

An `IntEnum`: the state store keeps the bare integers (no schema change), and a member
compares equal to its integer, so rows read back as `int` and code comparing against these
names agree. States 11 and 12 are not used by the method (Figure 2 jumps from 10 to 13).
"""

from __future__ import annotations

from enum import IntEnum


class MigrationState(IntEnum):
    """Where one migration stands; each value is the state its last step (E-number) reached."""

    RECORDED = 0  # E1: recorded from the specs (address, source, target, window, modes)
    PRESTAGED = 1  # E2: BOX2 created with its internal address, redirect BOX2 -> BOX1
    FIRST_CHECK = 2  # E20: first station check passed
    SECOND_CHECK = 3  # E21-E23: second check passed, mailbox type and size reported
    ADDRESSES_FORMED = 4  # E3-E4: AD1 formed on BOX2, syncfed marker, redirect removed
    HELD = 5  # E5-E8: up-sync verified by fed, hold active for AD1 and its aliases
    FLIPPED = 6  # E9: directory ADP1 -> ADP2, held mail released, redirect BOX1 -> BOX2
    MOVER_TOOK = 7  # E13-E14: the data mover took the mailbox
    DATA_COPIED = 8  # E15-E17: old mail (and diary data) copied and verified
    STATION_DONE = 9  # E30-E33: station uploaded local data and switched the client
    DONE = 10  # E40: addresses and data done, as the modes require
    SOURCE_DELETED = 13  # E41-E42: old mailbox deleted on the source, redirect gone


# Between "addresses formed" and "done": what counts against a policy's maxParallel.
ACTIVE_STATES: frozenset[MigrationState] = frozenset({
    MigrationState.ADDRESSES_FORMED, MigrationState.HELD, MigrationState.FLIPPED,
    MigrationState.MOVER_TOOK, MigrationState.DATA_COPIED, MigrationState.STATION_DONE,
})
