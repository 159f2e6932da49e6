"""One synthetic engine of the soak, in its own process: ``python bench/soak_client.py SPEC``.

It loops until SIGTERM: pick a namespace and a prompt (bench/soak_data.py; now and then with
one or two chunks nobody stored before after it, so stores, evictions and the disk tier's
own cap keep working all run long), load the chunks
the server has and check every byte of every rank's slot against the bytes the chunk's key
names, then store (reserve, write, commit; now and then abort) a random number of the chunks
that were missing. Loads go two ways, as the vLLM connector's do: a leased Lookup whose offsets
cover every rank (asking again while chunks are ``pending`` from disk), or one Acquire per rank.

A read counts as verified only when the Release of its lease succeeds afterwards: then the
lease held through the copy, and the server promised nobody would write those slots. A read
whose lease had ended (expired while the process was stopped, the session dropped, the server
restarted) is void: counted, never judged. A verified read whose bytes differ is a mismatch,
written at once to ``mismatches.jsonl`` (a SIGKILL a moment later loses nothing).

Counters go to ``stats-<client>-<incarnation>.json`` twice a second (written whole, renamed),
so a SIGKILL loses at most half a second of counts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_data import CHUNK_TOKENS, NAMESPACES, PromptTree, chunk_bytes, first_difference  # noqa: E402

from kvdepot.client import KVDepotClient, KVDepotError, Namespace, ServerRestarted  # noqa: E402
from kvdepot.protocol import ErrorCode, SlotStatus  # noqa: E402

FLUSH_S = 0.5


def error_kind(exc: BaseException) -> str:
    """``ServerUnavailable``, ``ServerRestarted``, ``KVDepotError:UNKNOWN_LEASE``, ..."""
    name = type(exc).__name__
    if isinstance(exc, KVDepotError) and type(exc) is KVDepotError:
        try:
            return f"{name}:{ErrorCode(exc.code).name}"
        except ValueError:
            return f"{name}:{exc.code}"
    return name


class SyntheticEngine:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        self.out = Path(spec["out_dir"])
        self.tag = f"{spec['client']}-{spec['incarnation']}"
        self.counts: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}  # the first message of each kind
        self.stopping = False
        self.trees = [PromptTree(spec["tree_seed"] + i) for i in range(len(NAMESPACES))]
        self.client = KVDepotClient("127.0.0.1", spec["port"], engine_id=f"soak-{self.tag}",
                                    timeout_ms=spec["timeout_ms"], prefault=False)
        self.namespaces: list[Namespace] = []
        self._flushed = 0.0

    # --- bookkeeping ------------------------------------------------------------------------

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._flushed < FLUSH_S:
            return
        self._flushed = now
        path = self.out / f"stats-{self.tag}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"client": self.spec["client"], "incarnation": self.spec["incarnation"],
                                   "counts": dict(self.counts), "error_examples": self.error_examples}))
        os.replace(tmp, path)

    def error(self, exc: BaseException) -> None:
        kind = error_kind(exc)
        self.counts[f"error:{kind}"] += 1
        self.error_examples.setdefault(kind, str(exc)[:400])

    def mismatch(self, ns: Namespace, key: bytes, rank: int, offset: int, at: int, how: str) -> None:
        self.counts["mismatches"] += 1
        record = {"client": self.tag, "namespace": ns.model, "world_size": ns.world_size,
                  "salt": ns.salt, "key": key.hex(), "rank": rank, "offset": offset,
                  "first_bad_byte": at, "via": how, "boot": self.client.boot_id,
                  "time": time.time()}
        with open(self.out / "mismatches.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.flush(force=True)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping and not self.namespaces:
            try:
                self.namespaces = [
                    self.client.register(n.model, n.geometry, n.world_size, n.salt) for n in NAMESPACES
                ]
            except KVDepotError as exc:  # the server is down or restarting: try again
                self.error(exc)
                self.flush()
                time.sleep(0.2)
        pause = self.spec["pause_ms"] / 1000
        while not self.stopping:
            try:
                self.one_operation()
            except KVDepotError as exc:
                self.error(exc)
                time.sleep(0.05)  # the client fails fast while the server is away
            self.flush()
            time.sleep(self.rng.uniform(0, 2 * pause))
        self.client.close()
        self.flush(force=True)

    def one_operation(self) -> None:
        which = self.rng.randrange(len(self.namespaces))
        ns = self.namespaces[which]
        prompt = self.trees[which].pick(self.rng)
        if self.rng.random() < self.spec["fresh_share"]:  # a question nobody asked before
            prompt = prompt + [self.rng.randrange(1 << 20, 1 << 21)
                               for _ in range(CHUNK_TOKENS * self.rng.randint(1, 2))]
        keys = self.client.chunk_keys(ns, prompt)
        self.counts["operations"] += 1
        if self.rng.random() < self.spec["acquire_share"]:
            hit = self.load_by_acquire(ns, keys)
        else:
            hit = self.load_by_lookup(ns, keys)
        if hit < len(keys):
            self.store(ns, keys, hit)

    # --- loads ------------------------------------------------------------------------------

    def load_by_lookup(self, ns: Namespace, keys: list[bytes]) -> int:
        lease_ms = self.rng.choice(self.spec["lease_ms"])
        result = self.client.lookup(ns, keys, lease_ms=lease_ms)
        self.counts["lookups"] += 1
        try:
            deadline = time.monotonic() + self.spec["pending_wait_s"]
            while result.pending and time.monotonic() < deadline:
                self.counts["pending_chunks"] += result.pending
                time.sleep(0.02)
                again = self.client.lookup(ns, keys, lease_ms=lease_ms)  # before giving the old one back
                self.counts["lookups"] += 1
                self.release_quietly(result.lease, result.epoch)
                result = again
        except BaseException:
            self.release_quietly(result.lease, result.epoch)
            raise
        self.counts["lookup_hit_chunks"] += result.hit_chunks
        self.counts["lookup_chunks"] += len(keys)
        if not result.hit_chunks:
            self.release_quietly(result.lease, result.epoch)
            return 0
        reads = [(keys[i], r, off) for r in range(ns.world_size)
                 for i, off in enumerate(result.rank_offsets(r))]
        self.verify(ns, reads, result.lease, result.epoch, "lookup")
        return result.hit_chunks

    def load_by_acquire(self, ns: Namespace, keys: list[bytes]) -> int:
        """One Acquire per rank, as the ranks of a TP engine do; the hit is what every rank has."""
        lease_ms = self.rng.choice(self.spec["lease_ms"])
        hit = len(keys)
        for rank in range(ns.world_size):
            acquired = self.client.acquire(ns, rank, keys, lease_ms=lease_ms)
            self.counts["acquires"] += 1
            self.counts["acquire_chunks"] += len(acquired.offsets)
            hit = min(hit, len(acquired.offsets))
            if acquired.offsets:
                reads = [(keys[i], rank, off) for i, off in enumerate(acquired.offsets)]
                self.verify(ns, reads, acquired.lease, acquired.epoch, "acquire")
            else:
                self.release_quietly(acquired.lease, acquired.epoch)
        return hit

    def verify(self, ns: Namespace, reads: list[tuple[bytes, int, int]], lease: int, epoch: int,
               how: str) -> None:
        """Copy the slots while the lease holds them, release it, then judge the copies."""
        copies = []
        try:
            arena = self.client.arena(epoch)  # ServerRestarted when the boot changed meanwhile
            copies = [arena.slot(off, ns.slot_bytes).copy() for _, _, off in reads]
        except ServerRestarted as exc:
            self.error(exc)
        except (TypeError, ValueError, AttributeError):
            # The heartbeat thread noticed a new boot and closed this mapping under us.
            self.counts["error:arena_closed_during_read"] += 1
        held = False
        if epoch == self.client.epoch:  # else the lease went with the old boot
            try:
                self.client.release([lease], retrieved=[lease] if copies else [])
                held = bool(copies)
            except KVDepotError as exc:
                self.error(exc)
        for (key, rank, off), got in zip(reads, copies):
            want = chunk_bytes(key, rank, ns.slot_bytes)
            at = first_difference(got, want)
            if held:
                self.counts["verified_chunks"] += 1
                self.counts["verified_bytes"] += ns.slot_bytes
                if at >= 0:
                    self.mismatch(ns, key, rank, off, at, how)
            else:
                self.counts["void_reads"] += 1
                self.counts["void_reads_differing"] += at >= 0

    def release_quietly(self, lease: int, epoch: int) -> None:
        if lease and epoch == self.client.epoch:
            try:
                self.client.release([lease])
            except KVDepotError as exc:
                self.error(exc)

    # --- stores -----------------------------------------------------------------------------

    def store(self, ns: Namespace, keys: list[bytes], hit: int) -> None:
        """Store chunks ``hit..hit+n`` (n random: like a prefill that stops early), every rank
        in a random order, each rank's reservation committed (or now and then aborted) before
        the next rank's: a kill in between leaves a chunk that only some ranks have."""
        todo = keys[hit : hit + self.rng.randint(1, len(keys) - hit)]
        parent = keys[hit - 1] if hit else b""
        ranks = list(range(ns.world_size))
        self.rng.shuffle(ranks)
        for rank in ranks:
            reservation = self.client.reserve(ns, rank, todo, parent=parent)
            self.counts["reserves"] += 1
            for status in reservation.status:
                self.counts[f"slot:{SlotStatus(status).name}"] += 1
            if not reservation.id:
                continue
            try:
                arena = self.client.arena(reservation.epoch)
                written = 0
                for key, status, off in zip(todo, reservation.status, reservation.offsets):
                    if status == SlotStatus.RESERVED:
                        arena.slot(off, ns.slot_bytes)[:] = chunk_bytes(key, rank, ns.slot_bytes)
                        written += 1
                if self.rng.random() < self.spec["abort_share"]:
                    self.client.abort(reservation.id)
                    self.counts["aborted_reservations"] += 1
                    continue
                self.counts["committed_chunks"] += self.client.commit(reservation.id)
                self.counts["written_chunks"] += written
            except ServerRestarted:
                raise  # the reservation went with the old boot
            except (TypeError, ValueError, AttributeError):
                self.counts["error:arena_closed_during_write"] += 1
                self.abort_quietly(reservation.id, reservation.epoch)
            except BaseException:
                self.abort_quietly(reservation.id, reservation.epoch)
                raise

    def abort_quietly(self, reservation: int, epoch: int) -> None:
        if epoch == self.client.epoch:
            try:
                self.client.abort(reservation)
            except KVDepotError as exc:
                self.error(exc)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    engine = SyntheticEngine(spec)

    def stop(signum, frame):  # noqa: ANN001 - signal handler signature
        engine.stopping = True

    signal.signal(signal.SIGTERM, stop)
    engine.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
