"""The remote tier in running servers: two real kvdepot server processes ("nodes": their own
ports and shared-memory segments) on a real Redis Cluster (3 masters, 3 replicas on loopback),
real clients storing and loading real bytes (``load`` checks every hit's bytes).

- What node A stores, node B's leased lookups answer pending, then hit (keys with the TTL;
  another tenant's salt misses; B writes nothing back, and a prompt B computes itself that A
  stored only renews the TTL). A part damaged in the cluster: B's hits end before it.
  ``kvdepot status`` and /metrics show the tier and its masters.
- Write policies: off (B reads what A wrote, writes nothing); on-evict (chunks reach the
  cluster only when they leave A's buffer).
- Credentials or TLS wrong: the server starts, logs an error naming the remote, serves from
  memory (the right password then works). rediss:// with --remote-ca-file works. A node
  stops promptly while its remote is stalled. Lookups the remote cannot answer are counted.
- A master SIGSTOPped (lookups answer by the deadline), SIGKILLed during stores and loads (no
  client error, hits right, misses allowed; the servers follow the failover), the whole
  cluster stopped and killed (the nodes serve from memory, lookups fast).

The cluster and the pair of nodes are shared by the module; the tests that break the cluster
run last, in file order.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import small_geometry
from redis.crc import key_slot
from redis_support import (
    RedisCluster, RedisServer, free_port, make_tls_files, redis_cli, server_binary,
)
from server_process import ServerProcess
from test_disk_tier import http_stats, load, prompt, store, wait_until

from kvdepot.client import KVDepotClient
from kvdepot.server.tiers.manifest import chunk_keys

CHAIN = 6  # chunks of 64 KiB per stored prompt (small_geometry)
SMALL_BUFFER_GB = "0.002"  # 30 slots of 64 KiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server_binary("redis"), redis_cli()
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def seeds(cluster: RedisCluster) -> list[str]:
    return [f"redis://127.0.0.1:{port}" for port in cluster.masters()]


def start_node(log_dir: Path, name: str, urls: list[str], prefix: str, *extra: str,
               buffer_gb: float = 0.05) -> ServerProcess:
    remote = [a for url in urls for a in ("--remote", url)]
    return ServerProcess(
        buffer_gb=buffer_gb, log_path=log_dir / f"{name}.log",
        extra=[*remote, "--remote-key-prefix", prefix, "--remote-timeout-ms", "1000", *extra],
    ).start()


def finish(*servers: ServerProcess) -> None:
    for server in servers:
        server.__exit__(None, None, None)  # SIGTERM, and the segment unlinked


def connect(server: ServerProcess) -> KVDepotClient:
    client = KVDepotClient("127.0.0.1", server.port, timeout_ms=5000)
    assert client.connect(), server.log()
    return client


def remote_tier(server: ServerProcess) -> dict:
    [tier] = [t for t in http_stats(server.http_port)["tiers"] if t["name"] == "remote"]
    return tier


def manifests(cluster: RedisCluster, prefix: str) -> int:
    return sum(
        sum(1 for _ in cluster.admin(port).scan_iter(match=f"{prefix}:*:m", count=1000))
        for port in cluster.masters()
    )


class Node:
    """A node's server and a client of it with the test's namespace."""

    def __init__(self, server: ServerProcess, salt: str = ""):
        self.server = server
        self.client = connect(server)
        self.ns = self.client.register("m", small_geometry(), 1, salt=salt)

    def chain(self, seed: int, chunks: int = CHAIN) -> list[bytes]:
        return prompt(self.client, self.ns, seed, chunks)

    def store(self, keys: list[bytes]) -> None:
        store(self.client, self.ns, keys)

    def load(self, keys: list[bytes], timeout: float = 20.0) -> tuple[int, int]:
        """(hits, the most pending any lookup answered); every hit's bytes checked."""
        return load(self.client, self.ns, keys, timeout)

    def tier(self) -> dict:
        return remote_tier(self.server)

    def stored_through(self, keys: list[bytes], timeout: float = 15.0) -> None:
        """Store ``keys`` and wait until their writes to the cluster are done."""
        before = self.tier()["writes"]
        self.store(keys)

        def done():
            t = self.tier()
            return t["writes"] >= before + len(keys) and t["copies_in_flight"] == 0
        wait_until(done, f"{len(keys)} chunks written through", timeout)

    def close(self) -> None:
        self.client.close()


class Pair:
    def __init__(self, a: Node, b: Node, prefix: str):
        self.a, self.b, self.prefix = a, b, prefix


@pytest.fixture(scope="module")
def pair(cluster, tmp_path_factory):
    """Nodes A and B, write-through, on the cluster."""
    logs = tmp_path_factory.mktemp("nodes")
    prefix = f"kvp{uuid.uuid4().hex[:6]}"
    servers = [start_node(logs, "a", seeds(cluster), prefix)]
    try:
        servers.append(start_node(logs, "b", seeds(cluster)[:1], prefix))  # B learns the rest
        nodes = [Node(s) for s in servers]
        yield Pair(*nodes, prefix)
        for n in nodes:
            n.close()
    finally:
        finish(*servers)


SEED = iter(range(1000, 1_000_000))  # fresh prompts, never stored before in this module


def test_what_node_a_stores_node_b_hits_through_the_cluster(pair, cluster):
    a, b = pair.a, pair.b
    seed = next(SEED)
    keys = a.chain(seed)
    a.stored_through(keys)
    assert in_cluster(cluster, pair.prefix, a.ns, keys) == CHAIN
    for port in cluster.masters():  # every key expires, after --remote-ttl (default 1 day)
        for name in cluster.admin(port).scan_iter(match=f"{pair.prefix}:*", count=1000):
            assert 86_000_000 < cluster.admin(port).pttl(name) <= 86_400_000, name
    assert b.client.lookup(b.ns, keys).hit_chunks == 0  # not in B's buffer
    assert b.load(keys) == (CHAIN, CHAIN)  # pending while B probes and loads, then hits
    tier = wait_until(lambda: (t := b.tier())["reads"] >= CHAIN and t, "B's stats")  # ~0.1 s old
    assert tier["probe_found"] == CHAIN and tier["checksum_failures"] == 0
    assert b.client.lookup(b.ns, keys).hit_chunks == CHAIN  # in B's buffer now
    # The same tokens of another tenant (its salt in the namespace digest, so in every key).
    other = Node(b.server, salt="tenant-2")
    try:
        assert other.load(other.chain(seed))[0] == 0
    finally:
        other.close()
    # What B loaded from the cluster is not written back; a prompt B computes itself that A
    # stored before only renews the TTL of A's keys.
    again = a.chain(next(SEED))
    a.stored_through(again)
    b.store(again)
    tier = wait_until(lambda: (t := b.tier())["already_stored"] == CHAIN and t, "TTLs renewed")
    assert tier["writes"] == 0 and tier["write_errors"] == 0


def test_a_damaged_chunk_in_the_cluster_ends_node_bs_hits_there(pair, cluster):
    """A part overwritten with other bytes of its length: B's probe sees every manifest, but
    the chunk's read fails its CRC: B hits the chunks before it (bytes checked), never it;
    its keys are deleted."""
    a, b = pair.a, pair.b
    keys = a.chain(next(SEED))
    a.stored_through(keys)
    part = chunk_keys(pair.prefix.encode(), a.ns.digest, keys[2], 0).part(0)
    owner = cluster.admin(cluster.owner(key_slot(part)))
    value = bytearray(owner.get(part))
    value[1000] ^= 0x10
    owner.set(part, bytes(value), keepttl=True)
    before = b.tier()["checksum_failures"]
    assert b.load(keys) == (2, CHAIN)
    wait_until(lambda: b.tier()["checksum_failures"] == before + 1, "the CRC mismatch counted")
    assert not owner.exists(part) and in_cluster(cluster, pair.prefix, a.ns, keys[2:3]) == 0


def test_status_and_metrics_show_the_tier_and_its_three_masters(pair, cluster):
    url = f"http://127.0.0.1:{pair.a.server.http_port}"
    out = subprocess.run([sys.executable, "-m", "kvdepot", "status", "--url", url],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert re.search(r"remote tier\s+redis://", out), out
    masters = cluster.masters()
    assert len(masters) == 3
    for port in masters:
        assert re.search(rf"127\.0\.0\.1:{port}\s+master, up", out), out
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    up = {
        m.group("node"): float(m.group("value"))
        for line in metrics.splitlines()
        if line.startswith("kvdepot_remote_node_up{") and 'role="master"' in line
        for m in [re.search(r'node="(?P<node>[^"]+)".* (?P<value>\S+)$', line)]
    }
    assert up == {f"127.0.0.1:{port}": 1.0 for port in masters}, metrics


def test_write_policy_off_reads_what_others_wrote_and_writes_nothing(cluster, tmp_path, pair):
    a = pair.a
    reader = Node(start_node(tmp_path, "reader", seeds(cluster), pair.prefix,
                             "--remote-write-policy", "off"))
    try:
        keys = a.chain(next(SEED))
        a.stored_through(keys)
        assert reader.load(keys) == (CHAIN, CHAIN)
        count = manifests(cluster, pair.prefix)
        own = reader.chain(next(SEED))
        reader.store(own)
        assert reader.load(own) == (CHAIN, 0)  # served from its buffer
        time.sleep(0.5)  # time for writes, were any started
        tier = reader.tier()
        assert (tier["writes"], tier["write_errors"], tier["copies_in_flight"]) == (0, 0, 0)
        assert manifests(cluster, pair.prefix) == count
        assert in_cluster(cluster, pair.prefix, a.ns, own) == 0
        assert a.load(own)[0] == 0  # A asked the cluster: nothing there
    finally:
        reader.close()
        finish(reader.server)


def test_on_evict_writes_chunks_only_when_they_leave_the_buffer(cluster, tmp_path):
    prefix = f"kve{uuid.uuid4().hex[:6]}"
    a = Node(start_node(tmp_path, "a", seeds(cluster), prefix, "--remote-write-policy", "on-evict",
                        buffer_gb=float(SMALL_BUFFER_GB)))
    b = Node(start_node(tmp_path, "b", seeds(cluster), prefix))
    try:
        kept = a.chain(next(SEED), 8)
        a.store(kept)
        time.sleep(0.5)
        assert manifests(cluster, prefix) == 0 and a.tier()["writes"] == 0
        for _ in range(20):  # more prompts overflow the 30-slot buffer: kept leaves it
            if in_cluster(cluster, prefix, a.ns, kept) == 8:
                break
            a.store(a.chain(next(SEED), 8))
            wait_until(lambda: a.tier()["copies_in_flight"] == 0, "writes done")
        assert in_cluster(cluster, prefix, a.ns, kept) == 8
        tier = a.tier()
        assert tier["writes"] >= 8 and tier["write_errors"] == 0
        assert a.client.lookup(a.ns, kept).hit_chunks < 8  # it did leave A's buffer
        assert b.load(kept) == (8, 8)
    finally:
        for n in (a, b):
            n.close()
        finish(a.server, b.server)


def in_cluster(cluster: RedisCluster, prefix: str, ns, keys: list[bytes]) -> int:
    """How many of ``keys`` (rank 0) have a manifest in the cluster."""
    found = 0
    for key in keys:
        manifest = chunk_keys(prefix.encode(), ns.digest, key, 0).manifest
        found += cluster.admin(cluster.owner(key_slot(manifest))).exists(manifest)
    return found


# --- credentials and TLS ----------------------------------------------------------------------


def failed_start_line(server: ServerProcess) -> str:
    lines = [line for line in server.log().splitlines() if "Remote tier: cannot use" in line]
    assert lines, server.log()
    return lines[0]


def serves_from_memory(node: Node) -> None:
    keys = node.chain(next(SEED))
    started = time.monotonic()
    assert node.load(keys)[0] == 0  # a miss: the tier answers its probe at once
    node.store(keys)
    assert node.load(keys) == (CHAIN, 0)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("user, given", [
    (None, "env"), ("kv", "env"), (None, "url"),
], ids=["requirepass", "acl-user", "password-in-url"])  # fmt: skip
def test_a_wrong_password_is_logged_and_the_node_serves_from_memory(
    tmp_path, monkeypatch, user, given
):
    with RedisServer(tmp_path / "redis", username=user, password="right-secret") as redis:
        if user:
            monkeypatch.setenv("KVDEPOT_REMOTE_USER", user)

        def node_with(password: str, name: str) -> Node:
            url = redis.url
            if given == "env":
                monkeypatch.setenv("KVDEPOT_REMOTE_PASSWORD", password)
            else:
                url = url.replace("//", f"//:{password}@")
            return Node(start_node(tmp_path, name, [url], "kvw"))

        node = node_with("wrong-secret", "wrong")
        try:
            line = failed_start_line(node.server)
            assert redis.url in line and ("WRONGPASS" in line or "refused" in line), line
            serves_from_memory(node)
            assert "connect" in remote_tier(node.server)["last_error"]
            assert redis.admin().dbsize() == 0
        finally:
            node.close()
            finish(node.server)
        assert "wrong-secret" not in node.server.log()
        right = node_with("right-secret", "right")  # the same, with the right password: used
        try:
            right.stored_through(right.chain(next(SEED)))
            assert redis.admin().dbsize() == 2 * CHAIN  # a manifest and a part each
        finally:
            right.close()
            finish(right.server)
        assert "cannot use" not in right.server.log() and "right-secret" not in right.server.log()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    with RedisServer(d / "redis", tls=make_tls_files(d / "certs")) as server:
        yield server


def test_tls_required_but_redis_url_given_is_logged_and_the_node_serves_from_memory(
    tmp_path, tls_server
):
    url = f"redis://127.0.0.1:{tls_server.port}"
    node = Node(start_node(tmp_path, "node", [url], "kvt"))
    try:
        line = failed_start_line(node.server)
        assert url in line and "rediss://" in line, line  # names the remote, suggests TLS
        serves_from_memory(node)
    finally:
        node.close()
        finish(node.server)


def test_rediss_with_a_ca_file_shares_chunks(tmp_path, tls_server):
    ca = ["--remote-ca-file", tls_server.tls.ca]
    prefix = f"kvs{uuid.uuid4().hex[:6]}"
    a = Node(start_node(tmp_path, "a", [tls_server.url], prefix, *ca))
    b = Node(start_node(tmp_path, "b", [tls_server.url], prefix, *ca))
    try:
        assert "cannot use" not in a.server.log()
        keys = a.chain(next(SEED))
        a.stored_through(keys)
        assert b.load(keys) == (CHAIN, CHAIN)
        assert remote_tier(b.server)["settings"]["tls"] == "on"
    finally:
        for n in (a, b):
            n.close()
        finish(a.server, b.server)


def test_a_node_stops_promptly_while_its_remote_is_stalled(tmp_path):
    """SIGTERM with writes and a probe waiting on a SIGSTOPped server: bounded by their
    deadlines (1 s), never a hang."""
    with RedisServer(tmp_path / "redis") as redis:
        node = Node(start_node(tmp_path, "node", [redis.url], "kvq"))
        try:
            node.stored_through(node.chain(next(SEED)))
            redis.signal(signal.SIGSTOP)
            for _ in range(4):
                node.store(node.chain(next(SEED)))
            node.client.lookup(node.ns, node.chain(next(SEED)), lease_ms=1000)  # a probe
            wait_until(lambda: node.tier()["copies_in_flight"] > 0, "writes waiting", 2)
            node.close()
            started = time.monotonic()
            assert node.server.stop() == 0
            assert time.monotonic() - started < 4
        finally:
            redis.signal(signal.SIGCONT)
            finish(node.server)


def test_lookups_the_remote_cannot_answer_count_as_failed_probes(tmp_path):
    nothing = f"redis://127.0.0.1:{free_port()}"  # no server there
    node = Node(start_node(tmp_path, "node", [nothing], "kvf"))
    try:
        for _ in range(3):
            assert node.load(node.chain(next(SEED)))[0] == 0
        tier = wait_until(lambda: (t := node.tier())["probes"] >= 3 and t, "3 probes")
        assert tier["probe_errors"] == tier["probes"], tier
    finally:
        node.close()
        finish(node.server)


# --- the cluster failing: these run last (file order), they break the module's cluster -------


def timed_load(node: Node, keys: list[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    hits, _pending = node.load(keys)
    return hits, time.monotonic() - started


def test_a_stalled_master_costs_misses_and_lookups_answer_by_the_deadline(pair, cluster):
    a, b = pair.a, pair.b
    keys = a.chain(next(SEED), 24)  # over every master's slots (24 hash tags: all but surely)
    a.stored_through(keys)
    stalled = cluster.masters()[1]
    cluster.stop_node(stalled)
    try:
        hits, took = timed_load(b, keys)  # the probe's node group waits to the deadline (1 s)
        assert hits < 24 and took < 1.5, (hits, took)
        fresh = a.chain(next(SEED))  # A stores (writing through to a stalled node) and serves
        started = time.monotonic()
        a.store(fresh)
        assert a.load(fresh) == (CHAIN, 0) and time.monotonic() - started < 1.5
        assert a.server.alive and b.server.alive
    finally:
        cluster.cont_node(stalled)
    cluster.wait_ready(30)


def test_a_master_killed_during_stores_and_loads_costs_misses_never_errors(pair, cluster):
    """A stores new prompts, B loads those stored a moment before (each load checks every
    hit's bytes) while a master dies; once its replica took over, the servers follow it."""
    a, b = Node(pair.a.server), Node(pair.b.server)  # clients of the threads' own
    chains: list[tuple[float, list[bytes]]] = []
    errors: list[BaseException] = []
    hits: list[int] = []
    stop = threading.Event()

    def storing():
        try:
            while not stop.is_set():
                keys = a.chain(next(SEED))
                a.store(keys)
                chains.append((time.monotonic(), keys))
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def loading():
        try:
            done = 0
            while not stop.is_set():
                if done < len(chains) and time.monotonic() - chains[done][0] > 0.3:
                    hits.append(b.load(chains[done][1])[0])
                    done += 1
                else:
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=storing), threading.Thread(target=loading)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        killed = cluster.masters()[0]
        cluster.kill(killed)
        # While the replica takes over (wait_promoted must be called before it is done: it
        # reads the dead master's slots from the topology).
        cluster.wait_promoted(killed)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for n in (a, b):
            n.close()
    assert not errors, errors
    assert len(hits) >= 5 and sum(hits) > 0, hits
    assert pair.a.server.alive and pair.b.server.alive

    # The servers follow the failover: a node learns it when a call to the dead master fails
    # (then it reads the topology again), so the first chain after it may still miss. Chains of
    # 24 chunks touch every master's slots (all but surely): both nodes learn on the first.
    deadline = time.monotonic() + 15
    while True:
        keys = pair.a.chain(next(SEED), 24)
        pair.a.store(keys)
        wait_until(lambda: pair.a.tier()["copies_in_flight"] == 0, "writes done")
        if pair.b.load(keys)[0] == 24:
            break
        assert time.monotonic() < deadline, f"no full hit on B after the failover: {pair.b.tier()}"
    for _ in range(3):  # and from then on, every time
        keys = pair.a.chain(next(SEED), 24)
        pair.a.stored_through(keys)
        assert pair.b.load(keys) == (24, 24), pair.b.tier()


def test_the_whole_cluster_stopped_the_nodes_serve_from_memory(pair, cluster):
    a, b = pair.a, pair.b
    stored = [a.chain(next(SEED)) for _ in range(2)]
    for keys in stored:
        a.stored_through(keys)
    for port in cluster.live():
        cluster.stop_node(port)
    for phase, old in (("stopped", stored[0]), ("killed", stored[1])):
        for node in (a, b):
            fresh = node.chain(next(SEED))
            started = time.monotonic()
            node.store(fresh)
            assert node.load(fresh) == (CHAIN, 0), phase
            assert time.monotonic() - started < 1.5, phase
        hits, took = timed_load(b, old)  # in the cluster only: a miss, by the deadline
        assert hits == 0 and took < 1.5, (phase, took)
        assert a.server.alive and b.server.alive
        if phase == "stopped":
            cluster.stop()  # SIGKILL every node: connections refused from now on
