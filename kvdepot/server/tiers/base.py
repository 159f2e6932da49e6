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
from dataclasses import dataclass, field
from typing import Protocol

from kvdepot import protocol as p
from kvdepot.server.effects import Delete, Demote, Prefetch, Probe
from kvdepot.server.locations import Where


class TierError(Exception):
    """A tier's I/O failed (full, unreadable, checksum mismatch)."""


def _payload_only(nbytes: int) -> int:
    return nbytes


@dataclass(frozen=True)
class TierSpec:
    """The tier's books, as the core keeps them."""

    name: str  # the Location.tier of its places; unique, never "arena"
    capacity_bytes: int  # the core never places more than this many bytes there (footprints)
    queue_depth: int  # copies to or from it in flight at once; more are not started
    # Where one rank's bytes of a chunk go: (namespace digest, key, rank) -> place. Called on
    # the RPC thread only, once per write: a tier may name every write's place anew.
    locate: Callable[[bytes, bytes, int], Where]
    # What a chunk rank of ``nbytes`` payload takes in the tier (a file's header, padding).
    footprint: Callable[[int], int] = _payload_only
    # Write every chunk as soon as it is complete in the arena (and admitted), not only when
    # it is evicted from it.
    write_through: bool = False
    # A chunk is written only once lookups have hit it this many times (0: every chunk);
    # a chunk whose later chunks live only in the tier is written whatever its hits.
    admit_hits: int = 0
    # The first estimate of how fast loads from the tier run (the core then follows its
    # measured reads): a load slower than recomputing its tokens is not started.
    read_bytes_per_s: float = 1e9
    # Chunks are written to the tier (False: it is only read, what others wrote).
    writes: bool = True
    # Other servers write it too (a store shared across nodes): a lookup asks it
    # (``Tier.probe``) for the chunks after those the index knows, and the core's places in
    # it are what it last saw there. Forgetting a place deletes nothing: the chunk may be
    # another node's hit, and the store evicts by its own policy.
    shared: bool = False


@dataclass(frozen=True)
class StoredChunk:
    """One rank's bytes of a chunk that a tier found at start (``Tier.scan``)."""

    namespace: bytes  # digest
    key: bytes
    parent: bytes  # the chunk before it in its chain; b"" for a head
    rank: int
    nbytes: int
    where: Where
    last_used: float  # seconds since the epoch (file times): the order of re-adoption


@dataclass
class TierIO:
    """What a tier's I/O did, kept by the tier on the worker threads and read by the stats
    snapshot on the RPC thread (plain ints: a reader may see a count one update behind)."""

    settings: dict[str, str] = field(default_factory=dict)  # shown as they are in status
    used_bytes: int = 0  # on the medium now
    files: int = 0
    writes: int = 0
    written_bytes: int = 0
    reads: int = 0
    read_bytes: int = 0
    checksum_failures: int = 0
    bad_files: int = 0
    temp_files_removed: int = 0
    write_errors: int = 0
    read_errors: int = 0
    already_stored: int = 0  # writes that found the chunk stored (by another node): not rewritten
    last_error: str = ""


class Tier(Protocol):
    spec: TierSpec
    io: TierIO

    def write(self, job: Demote, source: memoryview) -> None:
        """Store ``source`` (the chunk rank's ``job.nbytes`` arena bytes) at ``job.target``."""

    def read(self, job: Prefetch, target: memoryview) -> None:
        """Fill ``target`` (the arena slot, ``job.nbytes``) from ``job.source``; verify the
        bytes on the way (a mismatch is a TierError, and the tier drops the bad copy)."""

    def delete(self, job: Delete) -> None:
        """Remove what ``job.where`` holds; absent is not an error."""

    def scan(self) -> Iterator[StoredChunk]:
        """At start: what the tier holds, cleaned of anything unreadable (a shared tier: none;
        it is probed on demand)."""

    def probe(self, job: Probe) -> int:
        """How many of ``job.keys``, from the first, the tier holds whole (every rank, the
        right size, a readable format); a shared tier's only way to learn what it holds.
        A tier that is not shared is never asked."""

    def nodes(self) -> list[p.TierNode]:
        """The servers behind the tier and their state, for status (a local tier: none)."""
