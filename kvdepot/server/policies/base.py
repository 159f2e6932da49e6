"""What an eviction policy is: an order over the keys of one tier that may be evicted.

A policy tracks the keys the caller gives it, each either evictable or held. It only decides
which evictable keys go first; the caller (ChainEvictor) decides what may go at all (nobody
reads, writes or copies it; no chunk after it in its chain stays) and tells the policy, in
these separate events:

- ``insert``: a key new to the tier (first committed), evictable.
- ``touch``: keys were used (a lookup hit them).
- ``hold`` / ``release``: a key stops being evictable for a while (leased, being written or
  copied, pinned by a request, or kept by its chain) and becomes evictable again.
- ``remove``: the key left the tier by other means than ``evict``.
- ``evict``: choose and forget ``n`` keys, all or nothing.

One policy instance serves one tier and one size class, from the RPC thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterable
from typing import ClassVar, Protocol


class EvictionPolicy(Protocol):
    name: ClassVar[str]  # the --eviction-policy value that selects it

    def insert(self, key: Hashable) -> None:
        """Track a key new to the tier, evictable."""

    def touch(
        self, keys: Iterable[Hashable], on_held: Callable[[Hashable], None] | None = None
    ) -> None:
        """Keys were used, in this order (a lookup hands a prefix's keys last to first). This
        is the hot path. A key that is not evictable now (held, or not tracked) is passed to
        ``on_held`` at its turn, which may ``release`` it."""

    def hold(self, key: Hashable) -> None:
        """A tracked key stops being evictable; it keeps its standing (recency, frequency)
        where the policy has one. Untracked keys are ignored."""

    def release(self, key: Hashable, first: bool = False) -> bool:
        """A tracked key is evictable again (after ``hold``): where it goes in the order is
        the policy's call, except with ``first``, which makes it the next to go (a chain's
        chunk whose last child just went takes that child's place). False, and nothing done,
        for an untracked key (the caller inserts it if it is new)."""

    def remove(self, key: Hashable) -> None:
        """Stop tracking a key, evictable or held; unknown keys are ignored."""

    def evict(self, n: int, protected: Container[Hashable] = frozenset()) -> list[Hashable] | None:
        """The next ``n`` evictable keys to go, in order, no longer tracked; keys in
        ``protected`` are passed over (``protected`` is asked once per key met). None, with
        no key evicted and no standing changed, when fewer than ``n`` may go."""

    def tracks(self, key: Hashable) -> bool:
        """Is the key tracked (evictable or held)?"""

    def __contains__(self, key: Hashable) -> bool:
        """Is the key tracked and evictable?"""

    def __len__(self) -> int:
        """How many tracked keys are evictable."""
