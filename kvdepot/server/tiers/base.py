"""What a storage tier below the arena implements (a local disk, a store shared across nodes).

The arena (the shared-memory buffer engines map) is the first tier; it needs no code here.
A lower tier has two halves:

- ``TierSpec``: pure data and pure functions the core uses on the RPC thread to keep the
  tier's books (its byte cap, how many copies may be in flight, where a chunk would go).
- ``Tier``: the I/O, always run on the ``--max-workers`` threads (workers.py), never on the
  RPC thread. Every method blocks until its I/O is done and raises ``TierError`` (or any
  OSError) when it fails; a failed ``write`` leaves nothing readable behind (write aside,
  then rename), a failed ``read`` leaves the slot's bytes unspecified (the core frees it).
  The arena views handed to ``write`` and ``read`` are valid during the call only: keep no
  reference to them (or to slices or arrays over them).

A tier is one new module implementing both against these protocols; the core and the RPC
loop do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from kvdepot.server.effects import Delete, Demote, Prefetch
from kvdepot.server.locations import Where


class TierError(Exception):
    """A tier's I/O failed (full, unreadable, checksum mismatch)."""


@dataclass(frozen=True)
class TierSpec:
    """The tier's books, as the core keeps them."""

    name: str  # the Location.tier of its places; unique, never "arena"
    capacity_bytes: int  # the core never places more than this many payload bytes there
    queue_depth: int  # copies to or from it in flight at once; more are not started
    # Where one rank's bytes of a chunk go: (namespace digest, key, rank) -> place. Pure.
    locate: Callable[[bytes, bytes, int], Where]


@dataclass(frozen=True)
class StoredChunk:
    """One rank's bytes of a chunk that a tier found at start (``Tier.scan``)."""

    namespace: bytes  # digest
    key: bytes
    rank: int
    nbytes: int
    where: Where
    last_used: float  # seconds since the epoch (file times): the order of re-adoption


class Tier(Protocol):
    spec: TierSpec

    def write(self, job: Demote, source: memoryview) -> None:
        """Store ``source`` (the chunk rank's ``job.nbytes`` arena bytes) at ``job.target``."""

    def read(self, job: Prefetch, target: memoryview) -> None:
        """Fill ``target`` (the arena slot, ``job.nbytes``) from ``job.source``; verify the
        bytes on the way (a mismatch is a TierError, and the tier drops the bad copy)."""

    def delete(self, job: Delete) -> None:
        """Remove what ``job.where`` holds; absent is not an error."""

    def scan(self) -> Iterator[StoredChunk]:
        """At start: what the tier holds, cleaned of anything unreadable."""
