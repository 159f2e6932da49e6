"""One segment, one server: a second server never takes a live server's segment, and an engine
never uses a mapping that is not its server's segment of this boot (real server processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import small_geometry
from server_process import REPO, ServerProcess, free_port
from test_server import store_pattern, tokens

from kvdepot import protocol as p
from kvdepot.client import ArenaMismatch, KVDepotClient, ServerUnavailable
from kvdepot.client.arena import ArenaMapping
from kvdepot.server.arena import IDENTITY_BYTES, SegmentInUse, SharedArena


def serve_args(shm_name: str, port: int) -> list[str]:
    """`kvdepot serve` as a user types it, on its own ports."""
    return [
        sys.executable, "-m", "kvdepot", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--http-port", "-1", "--cpu-buffer-size", "0.02", "--shm-name", shm_name,
    ]


def segment(name: str) -> os.stat_result:
    return os.stat(f"/dev/shm/{name}")


def client_of(server: ServerProcess, **kw) -> KVDepotClient:
    return KVDepotClient("127.0.0.1", server.port, timeout_ms=2000, **kw)


def test_a_second_server_on_a_live_segment_exits_and_the_first_keeps_serving(tmp_path):
    with ServerProcess(log_path=tmp_path / "first.log") as first:
        before = segment(first.shm_name)
        early = client_of(first)
        assert early.connect()
        ns = early.register("m", small_geometry())
        keys = early.chunk_keys(ns, tokens(1, 256 * 4))
        written = store_pattern(early, ns, 0, keys[:2], seed=1)

        second = subprocess.run(
            serve_args(first.shm_name, free_port()), cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert second.returncode != 0
        out = second.stdout + second.stderr
        assert f"/dev/shm/{first.shm_name} is held by a running kvdepot server (pid {first.proc.pid}" in out
        assert "another --shm-name" in out and "cache server is running" not in out
        after = segment(first.shm_name)
        assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)  # untouched

        # An engine connecting now (the victim) maps the first server's segment: what
        # it stores, another engine reads back byte for byte, and the early engine too.
        late, reader = client_of(first), client_of(first)
        assert late.connect() and reader.connect()
        ns_late = late.register("m", small_geometry())
        written += store_pattern(late, ns_late, 0, keys[2:], seed=2)  # after the early chunks
        ns_reader = reader.register("m", small_geometry())
        for c, n in ((reader, ns_reader), (early, ns)):
            hit = c.lookup(n, keys, lease_ms=5000)
            assert hit.hit_chunks == 4
            arena = c.arena_array()
            assert [arena[o : o + n.slot_bytes].tobytes() for o in hit.rank_offsets(0)] == written
            c.release([hit.lease], retrieved=[hit.lease])
        for c in (early, late, reader):
            c.close()
        assert first.alive
    assert not os.path.exists(f"/dev/shm/{first.shm_name}")  # removed by its own server


def test_servers_started_together_on_one_name_leave_exactly_one_running(tmp_path):
    name = f"kvdepot-test-race-{os.getpid()}"
    ports = [free_port() for _ in range(3)]
    logs = [open(tmp_path / f"s{i}.log", "w") for i in range(3)]
    procs = [
        subprocess.Popen(serve_args(name, port), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for port, log in zip(ports, logs)
    ]
    try:
        deadline = time.monotonic() + 60
        while sum(proc.poll() is not None for proc in procs) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        running = [i for i, proc in enumerate(procs) if proc.poll() is None]
        assert len(running) == 1, [(tmp_path / f"s{i}.log").read_text() for i in range(3)]
        for i, proc in enumerate(procs):
            if i not in running:
                assert proc.returncode != 0
                assert "is held by a running kvdepot server" in (tmp_path / f"s{i}.log").read_text()
        winner = KVDepotClient("127.0.0.1", ports[running[0]], timeout_ms=5000)
        assert winner.connect()  # and its mapping is its own segment (checked at mapping)
        ns = winner.register("m", small_geometry())
        keys = winner.chunk_keys(ns, tokens(3, 256 * 2))
        store_pattern(winner, ns, 0, keys, seed=3)
        assert winner.lookup(ns, keys).hit_chunks == 2
        winner.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for log in logs:
            log.close()
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f".{name}.")]  # no temporaries


def test_after_sigkill_the_next_server_replaces_the_stale_segment(tmp_path):
    dead = ServerProcess(log_path=tmp_path / "dead.log").start()
    stale = segment(dead.shm_name)
    dead.kill()  # no cleanup ran; the kernel dropped its lock
    assert segment(dead.shm_name).st_ino == stale.st_ino
    with ServerProcess(log_path=tmp_path / "next.log", shm_name=dead.shm_name) as nxt:
        assert "Replaced a stale shared-memory segment" in nxt.log()
        assert segment(nxt.shm_name).st_ino != stale.st_ino
        client = client_of(nxt)
        assert client.connect()
        ns = client.register("m", small_geometry())
        keys = client.chunk_keys(ns, tokens(4, 256 * 3))
        store_pattern(client, ns, 0, keys, seed=4)
        assert client.lookup(ns, keys).hit_chunks == 3
        client.close()


def test_an_engine_refuses_a_segment_that_is_not_its_servers(tmp_path):
    with ServerProcess(log_path=tmp_path / "a.log") as a, ServerProcess(log_path=tmp_path / "b.log") as b:
        settled = client_of(a)
        assert settled.connect()
        ns = settled.register("m", small_geometry())
        keys = settled.chunk_keys(ns, tokens(5, 256 * 2))
        written = store_pattern(settled, ns, 0, keys, seed=5)
        boot_b = client_of(b)
        assert boot_b.connect()
        b_boot = boot_b.boot_id
        boot_b.close()

        # Behind a's back, its name now points at b's live segment (what an old server that
        # ignores locks, or an operator, can do), then at a file of the right size that no
        # server wrote.
        os.rename(f"/dev/shm/{b.shm_name}", f"/dev/shm/{a.shm_name}")
        impostor = client_of(a, heartbeat=False)
        assert not impostor.connect()
        with pytest.raises(ArenaMismatch) as err:
            impostor.register("m", small_geometry())
        assert isinstance(err.value, ServerUnavailable)  # the connector's "serve without the cache"
        assert err.value.code == p.ErrorCode.ARENA_MISMATCH
        message = str(err.value)
        assert f"/dev/shm/{a.shm_name} is not the segment of the server this engine talks to" in message
        assert f"boot {b_boot[:8]}" in message
        assert not impostor.connected and impostor.epoch == 0

        size = segment(a.shm_name).st_size
        os.unlink(f"/dev/shm/{a.shm_name}")
        with open(f"/dev/shm/{a.shm_name}", "wb") as f:
            f.truncate(size)
        with pytest.raises(ArenaMismatch, match="no kvdepot identity"):
            impostor.lookup(ns, keys)
        impostor.close()

        # The engine mapped before keeps a's real segment: its chunks are intact and readable.
        got = settled.acquire(ns, 0, keys)
        arena = settled.arena_array()
        assert [arena[o : o + ns.slot_bytes].tobytes() for o in got.offsets] == written
        settled.release([got.lease])
        settled.close()
        assert a.alive and b.alive
        # A server removes its own segment at exit, never a file that took its name.
        assert a.stop() == 0 and b.stop() == 0
        assert os.path.getsize(f"/dev/shm/{a.shm_name}") == size


def test_the_arena_lock_and_identity_in_one_process():
    name = f"kvdepot-test-lock-{os.getpid()}"
    first = SharedArena(name, 1 << 20)
    try:
        with pytest.raises(SegmentInUse, match=f"pid {os.getpid()}, boot {first.boot_id[:8]}"):
            SharedArena(name, 1 << 20)
        assert os.path.getsize(f"/dev/shm/{name}") == (1 << 20) + IDENTITY_BYTES
        mapping = ArenaMapping(name, 1 << 20, boot_id=first.boot_id)
        mapping.array[:4] = np.frombuffer(b"kv\x00\x01", dtype=np.uint8)
        mapping.close()
        for boot, size in (("0" * 32, 1 << 20), (first.boot_id, 1 << 19)):
            with pytest.raises(OSError, match="is not the segment of the server"):
                ArenaMapping(name, size, boot_id=boot)
    finally:
        first.close()
    second = SharedArena(name, 1 << 20)  # a closed server's name is free at once
    second.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_an_engine_that_cannot_see_the_segment_says_why_and_serves_without_it(tmp_path):
    with ServerProcess(log_path=tmp_path / "server.log") as srv:
        os.unlink(f"/dev/shm/{srv.shm_name}")  # as seen from a container with its own /dev/shm
        client = client_of(srv, heartbeat=False)
        assert not client.connect()
        with pytest.raises(ArenaMismatch, match="does not exist here.*share the host's IPC namespace"):
            client.stats()
        client.close()
        assert srv.alive
