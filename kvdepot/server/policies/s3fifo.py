"""S3-FIFO: a small FIFO that filters one-hit keys, a main FIFO with second chances, ghosts.

After Yang et al., "FIFO queues are all you need for cache eviction" (SOSP 2023). A new key
enters the small queue, which the policy keeps at about a tenth of its keys; a key used while
there moves to the main queue when it reaches the small queue's end, others go (and are
remembered as ghosts). The main queue gives a key used since its last pass another round
(up to three uses are counted). A ghost inserted again goes straight to the main queue.
Scan-resistant: a burst of chunks read once cannot push out chunks that are read again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterable

SMALL_SHARE = 0.1
MAX_USES = 3


class S3FIFOPolicy:
    """A held key keeps its queue and its use count; released, it goes back to the new end of
    its queue (it was in use until now)."""

    name = "s3fifo"

    def __init__(self) -> None:
        self._small: OrderedDict[Hashable, None] = OrderedDict()  # evictable, next to go first
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._uses: dict[Hashable, int] = {}  # every tracked key
        self._in_main: set[Hashable] = set()  # tracked keys of the main queue, held or not
        self._held: set[Hashable] = set()
        # Released with ``first``: evictable, and going before both queues, latest first.
        self._first: OrderedDict[Hashable, None] = OrderedDict()
        self._ghosts: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def insert(self, key: Hashable) -> None:
        self.remove(key)
        self._uses[key] = 0
        if self._ghosts.pop(key, _ABSENT) is not _ABSENT:
            self._in_main.add(key)
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(
        self, keys: Iterable[Hashable], on_held: Callable[[Hashable], None] | None = None
    ) -> None:
        uses, held = self._uses, self._held
        for key in keys:
            count = uses.get(key)
            if count is not None and count < MAX_USES:
                uses[key] = count + 1
            if on_held is not None and (count is None or key in held):
                on_held(key)

    def hold(self, key: Hashable) -> None:
        if key in self._uses and key not in self._held:
            self._unqueue(key)
            self._held.add(key)

    def release(self, key: Hashable, first: bool = False) -> bool:
        if key not in self._uses:
            return False
        if first:
            self._held.discard(key)
            self._unqueue(key)
            self._first[key] = None
            self._first.move_to_end(key, last=False)
        elif key in self._held:
            self._held.remove(key)
            (self._main if key in self._in_main else self._small)[key] = None
        # else: evictable already, and its place stays
        return True

    def remove(self, key: Hashable) -> None:
        if self._uses.pop(key, None) is not None:
            self._unqueue(key)
            self._in_main.discard(key)
            self._held.discard(key)

    def _unqueue(self, key: Hashable) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)
        self._first.pop(key, None)

    def evict(self, n: int, protected: Container[Hashable] = frozenset()) -> list[Hashable] | None:
        small, main, uses = self._small, self._main, self._uses
        chosen: list[Hashable] = []
        done: list[tuple[str, Hashable]] = []  # every step, to undo a search that fails
        target_small = max(1, int(len(uses) * SMALL_SHARE))
        # Protected keys passed over in a row, per queue: once a whole queue was, it has
        # nothing to give. Every other step takes a key, promotes one or spends one of its
        # uses, so the search ends.
        first_before = list(self._first)
        for key in first_before:
            if len(chosen) == n:
                break
            if key not in protected:
                del self._first[key]
                chosen.append(key)
                done.append(("first-taken", key))
        small_passed = main_passed = 0
        while len(chosen) < n:
            small_open = small and small_passed < len(small)
            main_open = main and main_passed < len(main)
            if small_open and (len(small) >= target_small or not main_open):
                key = next(iter(small))
                if key in protected:
                    small.move_to_end(key)
                    small_passed += 1
                    done.append(("small-round", key))
                    continue
                small_passed = 0
                del small[key]
                if uses[key]:
                    main[key] = None
                    self._in_main.add(key)
                    done.append(("promoted", key))
                else:
                    chosen.append(key)
                    done.append(("small-taken", key))
            elif main_open:
                key = next(iter(main))
                if key in protected:
                    main.move_to_end(key)
                    main_passed += 1
                    done.append(("main-round", key))
                    continue
                main_passed = 0
                if uses[key]:
                    uses[key] -= 1
                    main.move_to_end(key)
                    done.append(("used-round", key))
                else:
                    del main[key]
                    chosen.append(key)
                    done.append(("main-taken", key))
            else:
                break
        if len(chosen) < n:
            self._undo(done)
            self._first = OrderedDict.fromkeys(first_before)
            return None
        for what, key in done:
            if what.endswith("-taken"):
                del uses[key]
                if what == "small-taken" or what == "first-taken" and key not in self._in_main:
                    self._ghosts[key] = None
                self._in_main.discard(key)
        while len(self._ghosts) > max(len(uses), 1):
            self._ghosts.popitem(last=False)
        return chosen

    def _undo(self, done: list[tuple[str, Hashable]]) -> None:
        # In reverse order each step is undone on the state it left, so every queue ends
        # exactly as it was: every step took or moved its queue's first key.
        small, main = self._small, self._main
        for what, key in reversed(done):
            if what == "first-taken":
                continue  # the caller puts the first keys back as they were
            if what == "promoted":
                del main[key]
                self._in_main.discard(key)
            elif what == "used-round":
                self._uses[key] += 1
            queue = small if what in ("small-round", "small-taken", "promoted") else main
            queue[key] = None
            queue.move_to_end(key, last=False)

    def tracks(self, key: Hashable) -> bool:
        return key in self._uses

    def __contains__(self, key: Hashable) -> bool:
        return key in self._uses and key not in self._held

    def __len__(self) -> int:
        return len(self._small) + len(self._main) + len(self._first)


_ABSENT = object()
