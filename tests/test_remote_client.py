"""The remote tier's RESP / Redis Cluster client (kvdepot/server/tiers/resp/)
against real redis-server / valkey-server processes: single servers (ACL, TLS, mutual TLS)
and 3-master + 3-replica clusters (routing, MOVED, ASK, a stalled node, a killed master and
its replica's promotion). Values live in a /dev/shm mapping, like the arena's."""

from __future__ import annotations

import mmap
import os
import random
import socket
import threading
import time
import uuid
from urllib.parse import quote

import pytest

redis = pytest.importorskip("redis", reason="redis-py drives the servers' admin side (pip install redis)")

from redis.crc import key_slot  # noqa: E402
from redis_support import (  # noqa: E402
    RedisCluster, RedisServer, free_port, make_tls_files, raw_get, server_binary, slot_tags,
)

from kvdepot.server.tiers.resp import (  # noqa: E402
    Call, RemoteAuthError, RemoteClient, RemoteSettings, RemoteTimeout, RemoteUnavailable,
    RespErrorReply,
)
from kvdepot.server.tiers.resp import wire  # noqa: E402

MiB = 1 << 20


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def started(*urls: str, **settings) -> RemoteClient:
    client = RemoteClient(RemoteSettings(urls=urls, **settings))
    client.start()
    return client


def stats(client: RemoteClient) -> dict:
    return {s.address: s for s in client.nodes()}


@pytest.fixture
def arena():
    """A 128 MiB shared-memory file, mapped (the kind of buffer values come from and go to)."""
    path = f"/dev/shm/kvdepot-remote-test-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 128 * MiB)
        mapping = mmap.mmap(fd, 128 * MiB)
        yield memoryview(mapping)
    finally:
        os.close(fd)
        os.unlink(path)
    try:
        mapping.close()
    except BufferError:  # a failed test's traceback still holds views: unmapped when collected
        pass


@pytest.fixture
def redis_server(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["redis", "valkey"])
def any_server(request, tmp_path):
    with RedisServer(tmp_path / request.param, binary=server_binary(request.param)) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisCluster(tmp_path_factory.mktemp("cluster"), node_timeout_ms=2000) as c:
        yield c


@pytest.fixture
def cluster_client(cluster):
    client = started(f"redis://127.0.0.1:{cluster.masters()[0]}")
    yield client
    client.close()


# -- single server -------------------------------------------------------------------------


def test_large_values_from_and_into_shared_memory(any_server, arena):
    """1, 16 and 40 MiB values: SET from a view of the mapping, GET straight into another;
    bytes equal, the TTL set, every byte counted."""
    client = started(any_server.url)
    try:
        sizes = [1 * MiB, 16 * MiB, 40 * MiB]
        first = None
        for size in sizes:
            src, dst = arena[:size], arena[64 * MiB:64 * MiB + size]
            src[:] = random.randbytes(size)
            key = b"{v}%d" % size
            assert client.run([Call((b"SET", key, src, b"PX", b"60000"))], soon(30)) == [b"OK"]
            assert client.run([Call((b"GET", key), into=dst)], soon(30)) == [size]
            assert dst == src
            assert 55_000 < any_server.admin().pttl(key) <= 60_000
            first = first or bytes(src)
        (value,) = client.run([Call((b"GET", b"{v}%d" % MiB))], soon())
        assert value == first
        (node,) = client.nodes()
        assert node.role == "master" and node.connected and node.errors == 0
        assert node.bytes_sent > sum(sizes) and node.bytes_received > sum(sizes) + MiB
    finally:
        client.close()


def test_wrong_length_nil_and_error_replies_keep_the_pipeline(redis_server, arena):
    client = started(redis_server.url)
    try:
        value = random.randbytes(MiB)
        client.run([Call((b"SET", b"{p}big", value))], soon())
        short, spare = arena[:MiB // 2], arena[MiB:2 * MiB]
        short[:] = bytes(MiB // 2)
        replies = client.run([
            Call((b"GET", b"{p}big"), into=short),  # a value of another length: drained
            Call((b"GET", b"{p}missing"), into=spare),
            Call((b"SET", b"{p}small", b"x")),
            Call((b"LPUSH", b"{p}big", b"x")),
            Call((b"GET", b"{p}small")),
            Call((b"NOSUCHCOMMAND", b"{p}small")),
            Call((b"GET", b"{p}big"), into=spare),
        ], soon())
        assert replies[:3] == [MiB, None, b"OK"]
        assert isinstance(replies[3], RespErrorReply) and replies[3].code == "WRONGTYPE"
        assert replies[4] == b"x"
        assert isinstance(replies[5], RespErrorReply) and replies[5].code == "ERR"
        assert replies[6] == MiB and spare == value
        assert short == bytes(MiB // 2)
        # the connection goes on, and it is the same one
        assert client.run([Call((b"GET", b"{p}small"))], soon()) == [b"x"]
        assert client.nodes()[0].open_connections == 1
    finally:
        client.close()


def test_pipelined_parts_into_views(redis_server, arena):
    """A chunk as parts (the remote tier's layout): one pipeline of SETs from views, one of a
    small GET then GETs into consecutive views; replies that arrive back to back land right
    (the read buffer holds the next reply's start when a value ends)."""
    client = started(redis_server.url)
    try:
        sizes = [4 * MiB, 4 * MiB, 3 * MiB + 17, 1]
        spans = [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]
        src, dst = arena[:sum(sizes)], arena[64 * MiB:64 * MiB + sum(sizes)]
        src[:] = random.randbytes(sum(sizes))
        dst[:] = bytes(sum(sizes))
        sets = [Call((b"SET", b"{c}part%d" % i, src[o:o + n], b"PX", b"60000"))
                for i, (o, n) in enumerate(spans)]
        assert client.run(sets + [Call((b"SET", b"{c}manifest", b"m" * 100))], soon(30)) == [b"OK"] * 5
        gets = [Call((b"GET", b"{c}manifest"))] + [
            Call((b"GET", b"{c}part%d" % i), into=dst[o:o + n]) for i, (o, n) in enumerate(spans)]
        assert client.run(gets, soon(30)) == [b"m" * 100, *sizes]
        assert dst == src
    finally:
        client.close()


def test_a_pooled_connection_the_server_closed_is_replaced(redis_server):
    """The server drops an idle pooled connection (CLIENT KILL, as on a restart or its idle
    timeout): the next call runs on a new one, no error, no backoff."""
    client = started(redis_server.url)
    try:
        assert client.run([Call((b"SET", b"k", b"v"))], soon()) == [b"OK"]
        assert redis_server.admin().client_kill_filter(_type="normal", skipme=True) >= 1
        assert client.run([Call((b"GET", b"k"))], soon()) == [b"v"]
        (node,) = client.nodes()
        assert node.backoff_until is None and node.open_connections == 1
    finally:
        client.close()


def test_bad_input_is_refused_before_anything_is_sent(redis_server):
    client = started(redis_server.url)
    try:
        before = client.nodes()[0]
        assert key_slot(b"a") != key_slot(b"b")
        bad = [
            (ValueError, [Call((b"GET", b"a")), Call((b"GET", b"b"))]),  # two hash slots
            (ValueError, [Call((b"GET", b"a"), into=memoryview(bytes(4)))]),  # read-only
            (TypeError, [Call((b"SET", "a", b"v"))]),
            (TypeError, [Call((b"SET", b"a", 5))]),
            (ValueError, [Call((b"PING",))]),  # no key to route by
            (ValueError, []),
            (TypeError, [(b"GET", b"a")]),
        ]
        for error, calls in bad:
            with pytest.raises(error):
                client.run(calls, soon())
        with pytest.raises(ValueError, match="hash slots"):
            client.run_many([[Call((b"GET", b"a"))], [Call((b"GET", b"a")), Call((b"GET", b"b"))]], soon())
        with pytest.raises(RemoteTimeout):
            client.run([Call((b"GET", b"a"))], time.monotonic() - 1)
        after = client.nodes()[0]
        assert (after.bytes_sent, after.calls) == (before.bytes_sent, before.calls)
        assert client.run([Call((b"GET", b"a"))], soon()) == [None]
    finally:
        client.close()
    for settings in [dict(urls=("http://127.0.0.1:1",)), dict(urls="redis://127.0.0.1:1"),
                     dict(urls=("redis://127.0.0.1:99999",)), dict(urls=("redis://:1",)),
                     dict(urls=("redis://127.0.0.1:1", "rediss://127.0.0.1:2")),
                     dict(urls=("redis://127.0.0.1:1/3",)),
                     dict(urls=("redis://127.0.0.1:1",), pool_size=0),
                     dict(urls=("redis://127.0.0.1:1",), connect_timeout_s=0),
                     dict(urls=("redis://127.0.0.1:1",), backoff_min_s=2, backoff_max_s=1),
                     dict(urls=("redis://127.0.0.1:1",), ca_file="/etc/hostname"),
                     dict(urls=("redis://127.0.0.1:1",), username="u")]:
        with pytest.raises(ValueError):
            RemoteSettings(**settings)
    with pytest.raises(ValueError, match="ca_file"):
        RemoteClient(RemoteSettings(urls=("rediss://127.0.0.1:1",), ca_file="/nonexistent/ca.pem"))


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_acl_user_and_password(kind, tmp_path):
    password = "s3cr@t:pw"
    with RedisServer(tmp_path, binary=server_binary(kind), username="kv", password=password) as srv:
        url = f"redis://127.0.0.1:{srv.port}"
        with RemoteClient(RemoteSettings(urls=(url,), username="kv", password=password)) as client:
            assert client.run([Call((b"SET", b"k", b"v"))], soon()) == [b"OK"]
        in_url = f"redis://kv:{quote(password, safe='')}@127.0.0.1:{srv.port}"
        with RemoteClient(RemoteSettings(urls=(in_url,))) as client:
            assert client.run([Call((b"GET", b"k"))], soon()) == [b"v"]
        for settings, why in [(dict(username="kv", password="nope"), "WRONGPASS"),
                              (dict(username="someone", password=password), "WRONGPASS"),
                              (dict(), "NOAUTH")]:
            client = RemoteClient(RemoteSettings(urls=(url,), **settings))
            t0 = time.monotonic()
            with pytest.raises(RemoteAuthError) as err:
                client.start()
            assert time.monotonic() - t0 < 1.0
            assert url in str(err.value) and why in str(err.value), err.value
            assert password not in str(err.value) and "nope" not in str(err.value)
            client.close()


def test_tls(tmp_path, arena):
    """rediss with the CA: 16 MiB both ways; plain to the TLS port and TLS to a plain port
    fail fast naming TLS; an unknown CA and a missing client certificate are auth errors."""
    tls = make_tls_files(tmp_path / "pki")
    with RedisServer(tmp_path / "tls", tls=tls) as srv, RedisServer(tmp_path / "plain") as plain, \
            RedisServer(tmp_path / "mtls", tls=tls, tls_client_auth=True) as mtls:
        with RemoteClient(RemoteSettings(urls=(srv.url,), ca_file=tls.ca)) as client:
            src, dst = arena[:16 * MiB], arena[32 * MiB:48 * MiB]
            src[:] = random.randbytes(16 * MiB)
            assert client.run([Call((b"SET", b"t", src))], soon(30)) == [b"OK"]
            assert client.run([Call((b"GET", b"t"), into=dst)], soon(30)) == [16 * MiB]
            assert dst == src
        cases = [
            (f"redis://127.0.0.1:{srv.port}", {}, RemoteAuthError, "rediss://"),
            (f"rediss://127.0.0.1:{plain.port}", dict(ca_file=tls.ca), RemoteAuthError, "redis://"),
            (srv.url, {}, RemoteAuthError, "certificate verify failed"),
            (mtls.url, dict(ca_file=tls.ca), RemoteAuthError, "TLS"),
        ]
        for url, extra, error, hint in cases:
            client = RemoteClient(RemoteSettings(urls=(url,), connect_timeout_s=0.5, **extra))
            t0 = time.monotonic()
            with pytest.raises(error) as err:
                client.start()
            assert time.monotonic() - t0 < 0.5 + 0.5, (url, err.value)
            assert "TLS" in str(err.value) and hint in str(err.value) and url in str(err.value), err.value
            client.close()
        with RemoteClient(RemoteSettings(urls=(mtls.url,), ca_file=tls.ca, cert_file=tls.client_cert,
                                         key_file=tls.client_key)) as client:
            assert client.run([Call((b"SET", b"m", b"v"))], soon()) == [b"OK"]


def test_everything_down_fails_fast_and_never_hangs(redis_server):
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)  # accepts (kernel), never answers
    try:
        urls = (f"redis://127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}",
                f"redis://127.0.0.1:{silent.getsockname()[1]}")
        client = RemoteClient(RemoteSettings(urls=urls, connect_timeout_s=0.5))
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable) as err:
            client.start()
        assert time.monotonic() - t0 < 2 * 0.5 + 0.5  # the silent one: to connect, to answer
        assert all(url in str(err.value) for url in urls), err.value
        client.close()
    finally:
        silent.close()

    client = started(redis_server.url, connect_timeout_s=0.5, backoff_min_s=0.2, backoff_max_s=1.0)
    try:
        client.run([Call((b"SET", b"k", b"v"))], soon())
        redis_server.kill()
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable):
            client.run([Call((b"GET", b"k"))], soon())
        assert time.monotonic() - t0 < 0.5
        for _ in range(20):  # in backoff, or a refused probe: never a wait
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailable):
                client.run([Call((b"GET", b"k"))], soon())
            results = client.run_many([[Call((b"GET", b"k"))], [Call((b"GET", b"j"))]], soon())
            assert all(isinstance(r, RemoteUnavailable) for r in results)
            assert time.monotonic() - t0 < 0.2
        with pytest.raises(RemoteUnavailable):
            client.refresh()
        (node,) = client.nodes()
        assert node.errors >= 1 and node.last_error and not node.open_connections
    finally:
        client.close()


# -- cluster -------------------------------------------------------------------------------


def test_cluster_routes_each_slot_to_its_master(cluster, cluster_client, arena):
    tags = slot_tags(cluster, per_master=2)
    values = {}
    for master, master_tags in tags.items():
        for tag in master_tags:
            key, value = tag + b"k", random.randbytes(256 * 1024)
            assert cluster_client.run([Call((b"SET", key, value))], soon()) == [b"OK"]
            assert cluster.admin(master).get(key) == value  # on its owner, not elsewhere
            values[key] = value
    cluster_client.refresh()  # replicas show in CLUSTER SLOTS once they replicated something
    by_node = stats(cluster_client)
    masters = {f"127.0.0.1:{m}" for m in tags}
    assert {a for a, s in by_node.items() if s.role == "master"} == masters
    assert all(by_node[m].calls >= 2 for m in masters)
    replicas = {f"127.0.0.1:{r}" for m in tags for r in cluster.replicas_of(m)}
    assert len(replicas) == 3 and all(by_node[r].calls == 0 for r in replicas if r in by_node)
    assert {a for a, s in by_node.items() if s.role == "replica"} <= replicas

    round_trips = {m: by_node[m].round_trips for m in masters}
    views = {key: arena[i * MiB:i * MiB + len(v)] for i, (key, v) in enumerate(values.items())}
    batches = [[Call((b"GET", key), into=views[key]), Call((b"EXISTS", key[:-1] + b"none"))]
               for key in values]
    results = cluster_client.run_many(batches, soon())
    assert results == [[len(v), 0] for v in values.values()]
    assert all(views[key] == v for key, v in values.items())
    by_node = stats(cluster_client)
    assert all(by_node[m].round_trips == round_trips[m] + 1 for m in masters)  # one per node


def test_many_threads_share_bounded_pools(cluster):
    """8 threads, 2 connections per node at most: every value read back is the one its thread
    wrote."""
    client = started(f"redis://127.0.0.1:{cluster.masters()[0]}", pool_size=2)
    tags = [t for ts in slot_tags(cluster, per_master=3).values() for t in ts]
    failures = []

    def worker(n: int) -> None:
        view = memoryview(bytearray(64 * 1024))
        for i in range(25):
            key = tags[(n + i) % len(tags)] + b"thread%d" % n
            value = random.randbytes(len(view))
            try:
                assert client.run([Call((b"SET", key, value))], soon()) == [b"OK"]
                assert client.run([Call((b"GET", key), into=view)], soon()) == [len(view)]
                assert view == value
            except Exception as exc:  # reported below, with the thread's number
                failures.append((n, exc))
                return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        assert all(s.open_connections <= 2 for s in client.nodes())
        assert sum(s.calls for s in client.nodes() if s.role == "master") >= 8 * 25 * 2
    finally:
        client.close()


def test_moved_after_a_slot_migration(cluster, cluster_client, arena):
    tags = slot_tags(cluster)
    source, target = sorted(tags)[:2]
    key = tags[source][0] + b"moved"
    slot = key_slot(key)
    value = random.randbytes(MiB)
    assert cluster_client.run([Call((b"SET", key, value))], soon()) == [b"OK"]
    ids = cluster.master_ids()
    cluster.admin(target).execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    cluster.admin(source).execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    cluster.migrate(source, [key], target)
    cluster.assign_slot(slot, target)
    src, dst = f"127.0.0.1:{source}", f"127.0.0.1:{target}"
    assert cluster_client.owner_of(key) == src  # stale on purpose
    view = arena[:MiB]
    view[:] = bytes(MiB)
    assert cluster_client.run([Call((b"GET", key), into=view)], soon()) == [MiB]  # via MOVED
    assert view == value
    assert cluster_client.owner_of(key) == dst  # the slot map learned the move
    assert cluster_client.run([Call((b"GET", key), into=view)], soon()) == [MiB]


def test_ask_during_a_slot_migration(cluster, cluster_client):
    tags = slot_tags(cluster, per_master=3)
    source, target = sorted(tags)[1:3]
    tag = tags[source][2]
    moved_key, staying_key, new_key = tag + b"a", tag + b"b", tag + b"c"
    slot = key_slot(tag)
    cluster_client.run([Call((b"SET", moved_key, b"one")), Call((b"SET", staying_key, b"two"))], soon())
    ids = cluster.master_ids()
    cluster.admin(target).execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    cluster.admin(source).execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    try:
        cluster.migrate(source, [moved_key], target)
        before = stats(cluster_client)
        # the target answers MOVED to a GET without ASKING: only ASKING + GET reads it
        replies = cluster_client.run([Call((b"GET", moved_key)), Call((b"GET", staying_key)),
                                      Call((b"SET", new_key, b"three"))], soon())
        assert replies == [b"one", b"two", b"OK"]
        after = stats(cluster_client)
        src, dst = f"127.0.0.1:{source}", f"127.0.0.1:{target}"
        assert after[dst].calls >= before[dst].calls + 4  # ASKING + GET, ASKING + SET
        assert cluster_client.owner_of(tag) == src  # ASK leaves the slot map alone
        assert cluster_client.run([Call((b"GET", staying_key))], soon()) == [b"two"]
    finally:
        cluster.migrate(source, [staying_key], target)
        cluster.assign_slot(slot, target)
    assert cluster_client.run([Call((b"GET", new_key)), Call((b"GET", staying_key))], soon()) == \
        [b"three", b"two"]


def test_stopped_node_times_out_alone(cluster, cluster_client):
    tags = slot_tags(cluster)
    stopped, *others = sorted(tags)
    keys = {m: tags[m][0] + b"s" for m in tags}
    for key in keys.values():
        cluster_client.run([Call((b"SET", key, b"v"))], soon())
    cluster.stop_node(stopped)
    try:
        done = {}

        def others_meanwhile():
            time.sleep(0.1)
            t0 = time.monotonic()
            for m in others:
                assert cluster_client.run([Call((b"GET", keys[m]))], soon(2)) == [b"v"]
            done["s"] = time.monotonic() - t0

        thread = threading.Thread(target=others_meanwhile)
        thread.start()
        t0 = time.monotonic()
        with pytest.raises(RemoteTimeout, match=str(stopped)):
            cluster_client.run([Call((b"GET", keys[stopped]))], time.monotonic() + 0.5)
        elapsed = time.monotonic() - t0
        thread.join()
        assert 0.45 < elapsed < 0.9
        assert done["s"] < 0.3
        t0 = time.monotonic()
        results = cluster_client.run_many([[Call((b"GET", keys[m]))] for m in sorted(tags)],
                                          time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 0.9
        assert isinstance(results[0], RemoteTimeout) and results[1:] == [[b"v"], [b"v"]]
    finally:
        cluster.cont_node(stopped)
    assert cluster_client.run([Call((b"GET", keys[stopped]))], soon()) == [b"v"]  # no backoff


def test_killed_master_fails_fast_then_its_promoted_replica_serves(tmp_path):
    with RedisCluster(tmp_path, node_timeout_ms=1000) as c:
        tags = slot_tags(c)
        victim, *others = sorted(tags)
        keys = {m: tags[m][0] + b"f" for m in tags}
        client = started(f"redis://127.0.0.1:{others[0]}", connect_timeout_s=1.0,
                         backoff_min_s=0.1, backoff_max_s=0.5)
        try:
            for m, key in keys.items():
                assert client.run([Call((b"SET", key, b"v%d" % m))], soon()) == [b"OK"]
            (replica,) = c.replicas_of(victim)
            reader = redis.Redis(host="127.0.0.1", port=replica, single_connection_client=True)
            reader.execute_command("READONLY")
            deadline = soon(5)
            while reader.get(keys[victim]) != b"v%d" % victim and time.monotonic() < deadline:
                time.sleep(0.02)
            reader.close()

            c.kill(victim)
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailable, match=str(victim)):
                client.run([Call((b"GET", keys[victim]))], soon())
            assert time.monotonic() - t0 < 1.0 + 0.5
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailable):
                client.run([Call((b"GET", keys[victim]))], soon())
            assert time.monotonic() - t0 < 0.1
            for m in others:
                assert client.run([Call((b"GET", keys[m]))], soon(2)) == [b"v%d" % m]

            promoted = c.wait_promoted(victim)
            assert promoted == replica
            deadline, reply = soon(10), None
            while time.monotonic() < deadline:  # the same client, never restarted
                try:
                    reply = client.run([Call((b"GET", keys[victim]))], soon(2))
                    break
                except RemoteUnavailable:
                    time.sleep(0.1)
            assert reply == [b"v%d" % victim]
            assert client.run([Call((b"SET", keys[victim], b"after"))], soon()) == [b"OK"]
            by_node = stats(client)
            assert by_node[f"127.0.0.1:{promoted}"].role == "master"
            assert by_node[f"127.0.0.1:{promoted}"].calls >= 2
            assert by_node[f"127.0.0.1:{victim}"].role == "unknown"
        finally:
            client.close()


# -- throughput ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_throughput_report(kind, tmp_path, arena, monkeypatch):
    """Prints the GB/s of 16 MiB GETs into a view (best of 8; run with -s to see it): this
    client with 4 MiB socket buffers, with the kernel's autotuned ones, and a bare recv_into
    loop on one socket. No timing is asserted: the machine is shared."""
    size = 16 * MiB
    src, dst = arena[:size], arena[64 * MiB:64 * MiB + size]
    src[:] = random.randbytes(size)

    def best_gbps(get) -> float:
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            get()
            times.append(time.perf_counter() - t0)
        assert dst == src
        return size / min(times) / 1e9

    with RedisServer(tmp_path, binary=server_binary(kind)) as srv:
        figures = {}
        for label, buffers in [("4 MiB buffers", 4 * MiB), ("kernel buffers", 0)]:
            monkeypatch.setattr(wire, "SOCKET_BUFFER_BYTES", buffers)
            with RemoteClient(RemoteSettings(urls=(srv.url,))) as client:
                t0 = time.perf_counter()
                client.run([Call((b"SET", b"bench", src))], soon(30))
                figures[f"SET {label}"] = size / (time.perf_counter() - t0) / 1e9
                dst[:] = bytes(size)
                figures[f"GET {label}"] = best_gbps(
                    lambda: client.run([Call((b"GET", b"bench"), into=dst)], soon(30)))
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            dst[:] = bytes(size)
            figures["GET raw recv_into"] = best_gbps(lambda: raw_get(sock, b"bench", dst))
    print(f"\n{kind}, 16 MiB, GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
