"""Where one rank's bytes of a chunk are: a location value per tier.

A chunk's rank has at most one place per tier: the arena (the shared-memory buffer engines
read and write) and any lower tier (a disk, a remote store). Each place is a ``Location``: the
tier's name, where in that tier (an arena slot, a file, a remote key) and the state of its bytes.
Locations are immutable values; a state change replaces one.

States, for a place of any tier:
- ``WRITING``: an engine is writing it (arena only, between Reserve and Commit); unreadable.
- ``READY``: whole and readable.
- ``COPYING_OUT``: readable, and a copy to another tier is reading it: it must stay.
- ``LOADING_IN``: a copy from another tier is writing it; unreadable.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec

ARENA = "arena"  # the tier name of the shared-memory buffer
MAIN_ARENA = 0  # the id of the one arena today; per-tenant arenas get others


class State(enum.IntEnum):
    WRITING = 0
    READY = 1
    COPYING_OUT = 2
    LOADING_IN = 3


READABLE = frozenset((State.READY, State.COPYING_OUT))


# gc=False: small immutable values without references to containers, made on every store.
class ArenaSlot(msgspec.Struct, frozen=True, gc=False):
    """A slot in an arena: the arena's id and the slot's byte offset in it."""

    arena: int
    offset: int


class FileRef(msgspec.Struct, frozen=True, gc=False):
    """A file of a file-backed tier, by its path relative to the tier's directory."""

    path: str


class RemoteKey(msgspec.Struct, frozen=True, gc=False):
    """An object of a remote store, by its key there."""

    key: bytes


Where = Union[ArenaSlot, FileRef, RemoteKey]


class Location(msgspec.Struct, frozen=True, gc=False):
    """One rank's bytes of a chunk in one tier."""

    tier: str
    where: Where
    state: State

    def moved(self, state: State) -> Location:
        """The same place in another state."""
        return Location(self.tier, self.where, state)
