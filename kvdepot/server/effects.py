"""What the core asks the edges to do (effects), and what they report back (completions).

The core (cache.py) changes only its own state. Whatever needs I/O or another thread, it
appends to its outbox as an effect; the RPC thread takes them (``CacheCore.take_effects``)
after every request and completion and hands them to the tier workers (workers.py). A worker
that finishes a copy reports a completion, which the RPC thread gives back to the core
(``CacheCore.complete``). Namespaces are named by their digest here: a tier's files outlive
the server's run-time namespace ids.
"""

from __future__ import annotations

from typing import Union

import msgspec

from kvdepot.server.locations import ArenaSlot, Where


class Evicted(msgspec.Struct, frozen=True, gc=False):
    """A chunk left ``tier`` (its places there are free). Nothing to do but count it."""

    tier: str
    key: bytes


class Demote(msgspec.Struct, frozen=True, gc=False):
    """Copy one rank's bytes of a chunk from its arena slot to a lower tier, then report
    ``DemotionDone(job)``. The slot stays put and unchanged until then."""

    job: int
    tier: str
    namespace: bytes  # digest
    key: bytes
    rank: int
    source: ArenaSlot
    nbytes: int
    target: Where
    # The key of the chunk before it in its chain (b"": a head, or not known), written beside
    # the bytes so that a restarted server can link what it finds into chains again.
    parent: bytes = b""


class Prefetch(msgspec.Struct, frozen=True, gc=False):
    """Copy one rank's bytes of a chunk from a lower tier into an arena slot reserved for it,
    then report ``PrefetchDone(job)``."""

    job: int
    tier: str
    namespace: bytes
    key: bytes
    rank: int
    source: Where
    target: ArenaSlot
    nbytes: int


class Delete(msgspec.Struct, frozen=True, gc=False):
    """Remove one rank's bytes of a chunk from a lower tier; nothing to report (the core has
    already forgotten them, and a tier's start-up scan removes what a failed delete left)."""

    tier: str
    namespace: bytes
    key: bytes
    rank: int
    where: Where


class Probe(msgspec.Struct, frozen=True, gc=False):
    """Ask a shared tier (one other servers write too) which of a lookup's chunks it holds,
    every rank whole, then report ``ProbeDone(job, found)``: how many of ``keys``, from the
    first, it holds. ``keys`` are consecutive chunks of one chain; ``slot_bytes``: what each
    rank of each must hold."""

    job: int
    tier: str
    namespace: bytes  # digest
    world_size: int
    slot_bytes: int
    keys: list[bytes]


Effect = Union[Evicted, Demote, Prefetch, Delete, Probe]


class DemotionDone(msgspec.Struct, frozen=True, gc=False):
    """A Demote job ended: ``ok`` when the tier holds the whole bytes, else ``error`` says
    why and the tier holds nothing of them."""

    job: int
    ok: bool
    error: str = ""


class PrefetchDone(msgspec.Struct, frozen=True, gc=False):
    """A Prefetch job ended: ``ok`` when the arena slot holds the whole, verified bytes;
    ``seconds``: the read's share of the tier's time (its wall time over the reads running
    beside it), from which the core estimates the tier's speed."""

    job: int
    ok: bool
    error: str = ""
    seconds: float = 0.0


class ProbeDone(msgspec.Struct, frozen=True, gc=False):
    """A Probe job ended: the tier holds the first ``found`` of its keys (0 when it failed:
    ``error`` says why; a tier that cannot answer is a miss, never an engine's error)."""

    job: int
    found: int
    error: str = ""


Completion = Union[DemotionDone, PrefetchDone, ProbeDone]
