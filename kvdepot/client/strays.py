"""The client's book of replies nobody waits for any more, and of what they grant."""

from __future__ import annotations

import msgspec

from kvdepot import protocol as p

_MAX_ABANDONED = 10000  # a server that never answers them must not grow the set forever


class Strays:
    """Requests given up on (a deadline passed, the caller went away), and the leases and
    reservations their late replies granted (a lookup answered after its deadline, a request
    aborted while its lookup was in flight): given back with the next request, not left to pin
    chunks until their TTL. Used under the client's lock."""

    def __init__(self) -> None:
        self._abandoned: set[int] = set()
        self._leases: list[int] = []
        self._reservations: list[int] = []

    def abandon(self, req_id: int) -> None:
        """Nobody will take the reply to ``req_id``: what it grants is given back."""
        self._abandoned.add(req_id)
        if len(self._abandoned) > _MAX_ABANDONED:
            self._abandoned.clear()

    def take(self, reply: p.Reply) -> bool:
        """True if ``reply`` answers an abandoned request (then kept here, to give back)."""
        if reply.req_id not in self._abandoned:
            return False
        self._abandoned.discard(reply.req_id)
        self.reclaim(reply)
        return True

    def reclaim(self, reply: p.Reply) -> None:
        """Note what an unwanted reply holds on the server, to give it back."""
        for r in reply.replies if isinstance(reply, p.BatchReply) else (reply,):
            if isinstance(r, (p.LookupReply, p.AcquireReply)) and r.lease:
                self._leases.append(r.lease)
            elif isinstance(r, p.ReserveReply) and r.reservation:
                self._reservations.append(r.reservation)

    def requests(self) -> list[msgspec.Struct]:
        """The Release and Aborts that give everything noted back (req_id to set); the book
        is then empty."""
        requests: list[msgspec.Struct] = []
        if self._leases:
            requests.append(p.Release(req_id=0, leases=self._leases))
        requests += [p.Abort(req_id=0, reservation=r) for r in self._reservations]
        self._leases, self._reservations = [], []
        return requests

    def void(self) -> None:
        """A new server boot: what the old one granted is gone with it."""
        self._leases, self._reservations = [], []
