"""``RemoteClient``: the data path to a Redis/Valkey Cluster (or one server without cluster
mode), for the remote tier.

- Routing: a pipeline goes to the master owning the hash slot of its calls' keys (args[1]),
  from a slot map read with CLUSTER SLOTS. Replicas are never used (a read from one may miss
  a write just acknowledged). MOVED updates the map, re-runs the redirected calls on the new
  owner and wakes the background refresh; ASK re-runs them on the named node, each after
  ASKING, without touching the map.
- Connections: a pool per node (``pool_size`` at most), plain TCP or TLS, AUTH once per
  connection when a password is set (RESP2, nothing else per connection).
- Deadlines: every call takes ``deadline``, ``time.monotonic()`` seconds; every socket wait
  is bounded by what is left. A call past it raises RemoteTimeout and closes its connection.
- Failures: a refused or broken connection marks the node failed: it is in backoff
  (RemoteUnavailable at once, no network) for an exponentially growing, jittered time. A
  background thread re-reads the topology when MOVED is seen, every second while a master is
  failing or timing out, and every 15 s otherwise, so that a promoted replica is followed
  without a restart.
- ``run_many``: pipelines grouped by node, one round trip per node, nodes in parallel (the
  first on the calling thread, the others on the client's threads).

Wire encoding and reply parsing: wire.py; opening connections, AUTH, one exchange and its
errors: connect.py; node pools and topology parsing: nodes.py; settings, errors,
statistics: settings.py.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

from redis.crc import key_slot

from kvdepot.server.tiers.resp.connect import AUTH_CODES, NodeIO
from kvdepot.server.tiers.resp.nodes import SLOTS, Node, parse_cluster_slots, parse_redirect
from kvdepot.server.tiers.resp.settings import (
    Endpoint, NodeStats, RemoteAuthError, RemoteError, RemoteSettings, RemoteTimeout,
    RemoteUnavailable,
)
from kvdepot.server.tiers.resp.wire import (
    Call, Reply, RespErrorReply, RespProtocolError, checked_call,
)

log = logging.getLogger("kvdepot.server")

_ASKING = Call((b"ASKING",))
_MAX_REDIRECTS = 5  # a slot bounced further than this is a cluster in flux: fail the call
_FAILING_REFRESH_S = 1.0  # topology re-read period while a master is failing
# ... and otherwise: a failover, a reshard or a node added while this client was idle is
# learnt before the next call finds the old owner gone.
_IDLE_REFRESH_S = 15.0
_MIN_REFRESH_GAP_S = 0.25  # bursts of MOVED cost one re-read
_PARALLEL_NODES = 32  # client threads for run_many's other nodes (created when needed)


class RemoteClient:
    """The remote store's client (see the module docstring). Thread-safe: many worker
    threads may call ``run`` / ``run_many`` at once; ``start`` first, ``close`` last."""

    def __init__(self, settings: RemoteSettings):
        self._settings = settings
        self._wake = threading.Event()  # a topology refresh is wanted (or close)
        self._io = NodeIO(settings, on_trouble=self._wake.set)  # ValueError for a bad TLS file
        self._rng = random.Random()
        self._lock = threading.Lock()  # _nodes, _closed
        self._nodes: dict[Endpoint, Node] = {}
        self._slots: list[Node | None] = [None] * SLOTS  # replaced whole by a refresh
        self._closed = False
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- life cycle

    def start(self) -> None:
        """Connect to the seeds (the first that answers is enough), authenticate, and read
        the topology (CLUSTER SLOTS; a server without cluster mode serves every slot).
        Raises RemoteAuthError (credentials refused; TLS on one side only: the message names
        the URL) or RemoteUnavailable (no seed answered: each is given connect_timeout_s to
        connect and as long to answer)."""
        if self._refresher is not None or self._closed:
            raise RuntimeError("RemoteClient.start() is called once, before close()")
        for endpoint in self._settings.seeds():
            self._node(endpoint, "unknown")
        self.refresh()
        self._executor = ThreadPoolExecutor(_PARALLEL_NODES, thread_name_prefix="kvdepot-remote")
        self._refresher = threading.Thread(target=self._refresh_loop, name="kvdepot-remote-topology",
                                           daemon=True)
        self._refresher.start()

    def close(self) -> None:
        """Stop the background refresh, wait for run_many's threads, close every connection.
        Calls after it raise RemoteUnavailable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            nodes = list(self._nodes.values())
        self._stop.set()
        self._wake.set()
        if self._refresher is not None:
            self._refresher.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for node in nodes:
            node.close()

    def __enter__(self) -> "RemoteClient":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls

    def run(self, calls: list[Call], deadline: float) -> list[Reply]:
        """One pipeline on the master owning the hash slot of the calls' keys (args[1]; all
        in one slot), replies in order (see resp.Call: bytes, int, None, list,
        RespErrorReply; a call with ``into``: the value's length).

        Raises ValueError / TypeError for bad calls (several slots, no key, a read-only
        ``into``...: nothing is sent); RemoteTimeout when ``deadline`` (time.monotonic()
        seconds) passes; RemoteUnavailable when the node is down or in backoff (at once,
        without network); RemoteAuthError on NOAUTH / WRONGPASS / NOPERM; RemoteError for a
        reply that is not RESP or too many redirections."""
        calls = self._checked(calls)
        slot = _slot_of(calls)
        self._before(deadline)
        return self._run_on(self._owner(slot), calls, slot, deadline, 0)

    def run_many(self, batches: list[list[Call]], deadline: float) -> list[list[Reply] | RemoteError]:
        """Several pipelines (each in one hash slot, as for ``run``): those owned by one node
        go in one round trip; nodes are served in parallel (the first group on the calling
        thread). Returns per batch its replies, or the RemoteError that failed it: a node's
        failure fails its batches only. Raises ValueError / TypeError for a bad batch before
        anything is sent, RemoteTimeout when ``deadline`` has already passed. Returns only
        when every group is done (no ``into`` view is written after it returns)."""
        if not isinstance(batches, list):
            raise TypeError(f"batches must be a list of lists of Call, got {type(batches).__name__}")
        checked = [self._checked(batch) if batch else [] for batch in batches]
        slots = [_slot_of(batch) if batch else -1 for batch in checked]
        self._before(deadline)
        results: list = [[] for _ in batches]
        groups: dict[Node, list[int]] = {}
        for i, slot in enumerate(slots):
            if slot >= 0:
                try:
                    groups.setdefault(self._owner(slot), []).append(i)
                except RemoteUnavailable as exc:
                    results[i] = exc
        work = list(groups.items())
        futures = []
        for node, idxs in work[1:]:
            try:
                futures.append(self._executor.submit(
                    self._run_group, node, idxs, checked, slots, deadline, results))
            except RuntimeError:  # close() ran meanwhile: its threads are gone
                for i in idxs:
                    results[i] = RemoteUnavailable("the remote client is closed")
        try:
            if work:
                self._run_group(*work[0], checked, slots, deadline, results)
        finally:
            wait(futures)  # no thread may write into a view after this returns
        for future in futures:
            future.result()
        return results

    def refresh(self) -> None:
        """Re-read the topology from a reachable node: masters known to be healthy first,
        then the seeds, then any other node (each within 2 x connect_timeout_s: connecting,
        then its answer). Also done by itself on MOVED and every second while a master is
        failing. Raises RemoteAuthError or RemoteUnavailable (naming each node tried and
        why) when no node answers."""
        errors: list[RemoteError] = []
        for node in self._refresh_order():
            deadline = time.monotonic() + 2 * self._settings.connect_timeout_s
            try:
                reply = self._io.exchange(node, [Call((b"CLUSTER", b"SLOTS"))], deadline)[0]
                if isinstance(reply, RespErrorReply):
                    if "cluster support disabled" in reply.message:
                        self._apply([(0, SLOTS - 1, node.endpoint, [])])
                        return
                    error = RemoteAuthError if reply.code in AUTH_CODES else RemoteError
                    raise error(f"{node.where}: CLUSTER SLOTS: {reply.message}")
                self._apply(parse_cluster_slots(reply, node.endpoint))
                return
            except RespProtocolError as exc:
                errors.append(RemoteError(f"{node.where}: {exc}"))
            except RemoteError as exc:
                errors.append(exc)
        auth = any(isinstance(exc, RemoteAuthError) for exc in errors)
        why = "; ".join(map(str, errors)) or "no node known"
        raise (RemoteAuthError if auth else RemoteUnavailable)(f"no node gave the topology: {why}")

    def owner_of(self, key: bytes) -> str | None:
        """``host:port`` of the master the slot map names for ``key`` (None: no owner known)."""
        node = self._slots[key_slot(bytes(key))]
        return None if node is None else str(node.endpoint)

    def nodes(self) -> list[NodeStats]:
        """Every node known (masters, replicas, seeds), with its counters."""
        with self._lock:
            nodes = list(self._nodes.values())
        return [node.stats() for node in nodes]

    # -- routing

    def _checked(self, calls) -> list[Call]:
        if not isinstance(calls, list) or not calls:
            raise ValueError("calls must be a non-empty list of Call")
        calls = [checked_call(call) for call in calls]
        if any(len(call.args) < 2 for call in calls):
            raise ValueError("every call needs a key (args[1]) to route it")
        return calls

    def _before(self, deadline: float) -> None:
        if self._refresher is None:
            raise RuntimeError("RemoteClient.start() was not called")
        if self._closed:
            raise RemoteUnavailable("the remote client is closed")
        if time.monotonic() >= deadline:
            raise RemoteTimeout("the deadline passed before the call started")

    def _owner(self, slot: int) -> Node:
        node = self._slots[slot]
        if node is None:
            self._wake.set()
            raise RemoteUnavailable(f"no node serves hash slot {slot} (as last known)")
        return node

    def _node(self, endpoint: Endpoint, role: str | None = None) -> Node:
        with self._lock:
            node = self._nodes.get(endpoint)
            if node is None:
                s = self._settings
                node = self._nodes[endpoint] = Node(
                    endpoint, role or "unknown", scheme=s.scheme, pool_size=s.pool_size,
                    backoff_min_s=s.backoff_min_s, backoff_max_s=s.backoff_max_s, rng=self._rng)
            elif role is not None:
                node.role = role
            return node

    def _run_group(self, node: Node, idxs: list[int], batches: list[list[Call]], slots: list[int],
                   deadline: float, results: list) -> None:
        try:
            replies = self._io.exchange(node, [call for i in idxs for call in batches[i]], deadline)
        except RemoteError as exc:
            for i in idxs:
                results[i] = exc
            return
        at = 0
        for i in idxs:
            count = len(batches[i])
            try:
                results[i] = self._follow(node, batches[i], replies[at:at + count], slots[i], deadline, 0)
            except RemoteError as exc:
                results[i] = exc
            at += count

    def _run_on(self, node: Node, calls: list[Call], slot: int, deadline: float, hops: int) -> list[Reply]:
        return self._follow(node, calls, self._io.exchange(node, calls, deadline), slot, deadline, hops)

    def _follow(self, node: Node, calls: list[Call], replies: list[Reply], slot: int,
                deadline: float, hops: int) -> list[Reply]:
        """``replies`` with MOVED / ASK followed; raises RemoteAuthError on an auth reply."""
        redirects: dict[tuple[str, Endpoint], list[int]] = {}
        for i, reply in enumerate(replies):
            if not isinstance(reply, RespErrorReply):
                continue
            if reply.code in ("MOVED", "ASK"):
                try:
                    kind, _slot, target = parse_redirect(reply, node.endpoint)
                except RespProtocolError as exc:
                    raise RemoteError(f"{node.where}: {exc}") from None
                redirects.setdefault((kind, target), []).append(i)
            elif reply.code in AUTH_CODES:
                raise RemoteAuthError(f"{node.where}: {reply.message}")
            elif reply.code == "CLUSTERDOWN":
                self._wake.set()
        if not redirects:
            return replies
        if hops >= _MAX_REDIRECTS:
            raise RemoteError(f"{node.where}: hash slot {slot} redirected more than {_MAX_REDIRECTS} times")
        replies = list(replies)
        for (kind, target), idxs in redirects.items():
            sub = [calls[i] for i in idxs]
            if kind == "MOVED":
                owner = self._node(target, "master")
                self._slots[slot] = owner
                self._wake.set()
                got = self._run_on(owner, sub, slot, deadline, hops + 1)
            else:
                other = self._node(target)
                asked = self._io.exchange(other, [c for call in sub for c in (_ASKING, call)], deadline)
                got = self._follow(other, sub, asked[1::2], slot, deadline, hops + 1)
            for i, reply in zip(idxs, got, strict=True):
                replies[i] = reply
        return replies

    # -- topology

    def _apply(self, ranges: list[tuple[int, int, Endpoint, list[Endpoint]]]) -> None:
        slots: list[Node | None] = [None] * SLOTS
        masters: set[Endpoint] = set()
        replicas: set[Endpoint] = set()
        for first, last, master, others in ranges:
            owner = self._node(master)
            slots[first:last + 1] = [owner] * (last - first + 1)
            masters.add(master)
            replicas.update(self._node(r).endpoint for r in others)
        with self._lock:
            for endpoint, node in self._nodes.items():
                node.role = ("master" if endpoint in masters
                             else "replica" if endpoint in replicas else "unknown")
        self._slots = slots

    def _refresh_order(self) -> list[Node]:
        """Healthy masters, then seeds, then the rest; suspect nodes last."""
        with self._lock:
            nodes = list(self._nodes.values())
        seeds = set(self._settings.seeds())

        def rank(node: Node) -> tuple[bool, int]:
            kind = 0 if node.role == "master" else 1 if node.endpoint in seeds else 2
            return node.suspect, kind

        return sorted(nodes, key=rank)

    def _refresh_loop(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            with self._lock:
                failing = any(n.suspect and n.role == "master" for n in self._nodes.values())
            self._wake.wait(_FAILING_REFRESH_S if failing else _IDLE_REFRESH_S)
            self._wake.clear()
            gap = last + _MIN_REFRESH_GAP_S - time.monotonic()
            if self._stop.wait(max(gap, 0)):
                return
            last = time.monotonic()
            try:
                self.refresh()
            except RemoteError as exc:
                log.debug("remote topology refresh failed: %s", exc)
            except Exception:  # noqa: BLE001 - the thread must outlive any reply a node sends
                log.exception("remote topology refresh failed")


def _slot_of(calls: list[Call]) -> int:
    slots = {key_slot(bytes(call.args[1])) for call in calls}
    if len(slots) > 1:
        raise ValueError(f"the calls' keys are in several hash slots {sorted(slots)[:8]}: "
                         "one pipeline per slot (use a hash tag, {...}, to group keys)")
    return slots.pop()
