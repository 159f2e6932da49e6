"""Tenants: a client's key names its tenant; each tenant has its own segment, index, eviction
and quotas; salts and namespace handles cannot be borrowed.

Real server processes with CURVE and a tenant file (tests/server_process.py), real clients
over TCP, keys written by `kvdepot keys generate`, a real redis-server for the remote quota,
and two Unix users (when the tests run as root) for the segments' permissions.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from conftest import small_geometry
from redis_support import RedisServer
from server_process import ServerProcess
from test_auth import allowed_dir, curve, generate, http

from kvdepot import protocol as p
from kvdepot.client import AuthenticationFailed, KVDepotClient, KVDepotError
from kvdepot.client.arena import ArenaMapping
from kvdepot.server.tenants import parse_tenants
from kvdepot.status import run_status

MIB = 1 << 20
UID_A, UID_B = 20001, 20002  # the two tenants' users (no /etc/passwd entry needed)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    paths = {"server": generate(root / "server", "server")}
    for name in ("a1", "a2", "b", "stranger"):
        paths[name] = generate(root / "engines", name)
    return paths


def tenant_file(tmp_path: Path, a: str = "", b: str = "") -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(f"""\
tenants:
  - name: team-a
    keys: [a1, a2]
    salt: salt-of-a
    models: [m, other-model]
    buffer_gb: {2 * MIB / (1 << 30)}
    {a}
  - name: team-b
    keys: [b]
    buffer_gb: {4 * MIB / (1 << 30)}
    {b}
""")
    return path


def start(tmp_path: Path, keys, tenants: Path, *extra: str) -> ServerProcess:
    allowed = allowed_dir(tmp_path, keys, "a1", "a2", "b", "stranger")
    srv = ServerProcess(buffer_gb=0.02, extra=[
        "--curve-secret-key", str(keys["server"][1]), "--curve-allowed-keys", str(allowed),
        "--tenants", str(tenants), *extra])
    srv.log_path = tmp_path / f"{srv.shm_name}.log"
    return srv.start()


def connect(srv: ServerProcess, keys, name: str) -> KVDepotClient:
    c = KVDepotClient("127.0.0.1", srv.port, curve=curve(keys, name), timeout_ms=5000,
                      heartbeat=False, engine_id=name, prefault=False)
    assert c.connect(), c.last_error
    return c


def stats(srv: ServerProcess) -> p.ServerStats:
    time.sleep(0.3)  # /stats is the snapshot the RPC loop publishes every 0.1 s
    status, _, body = http("GET", f"http://127.0.0.1:{srv.http_port}/stats")
    assert status == 200
    return msgspec.json.decode(body, type=p.ServerStats)


def tenant_row(s: p.ServerStats, name: str) -> p.TenantStats:
    (row,) = [t for t in s.tenants if t.name == name]
    return row


def chunk_bytes(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def store_chain(c: KVDepotClient, ns, seed: int, chunks: int, per_call: int = 4) -> list[bytes]:
    """Store a chain of ``chunks`` chunks (seeded bytes); its keys. Stops early on NO_SPACE."""
    keys = c.chunk_keys(ns, [seed * 7919 + i for i in range(chunks * ns.chunk_tokens)])
    arena = c.arena_array()
    for start in range(0, len(keys), per_call):
        part = keys[start : start + per_call]
        r = c.reserve(ns, 0, part, parent=keys[start - 1] if start else b"")
        for i, (status, off) in enumerate(zip(r.status, r.offsets)):
            if status == p.SlotStatus.RESERVED:
                arena[off : off + ns.slot_bytes] = chunk_bytes(seed * 1000 + start + i, ns.slot_bytes)
        if r.id:
            c.commit(r.id)
        if p.SlotStatus.NO_SPACE in r.status:
            break
    return keys


def hits_with_right_bytes(c: KVDepotClient, ns, keys: list[bytes], seed: int) -> int:
    """Leading chunks that hit and hold exactly what was stored."""
    got = c.lookup(ns, keys, lease_ms=5000)
    arena = c.arena_array()
    for i in range(got.hit_chunks):
        off = got.offsets[i]
        assert np.array_equal(arena[off : off + ns.slot_bytes], chunk_bytes(seed * 1000 + i, ns.slot_bytes)), i
    if got.lease:
        c.release([got.lease])
    return got.hit_chunks


def test_tenant_files_are_checked_whole_with_clear_errors():
    ok = parse_tenants("tenants:\n - {name: a, keys: [k], buffer_gb: 1}\n")
    assert ok[0].namespace_salt == "a" and ok[0].segment.mode_bits == 0o600
    for text, why in [
        ("tenants: []", "no tenants"),
        ("tenants:\n - {name: a, keys: [k], buffer_gb: 1}\n - {name: a, keys: [j], buffer_gb: 1}",
         "two tenants are named"),
        ("tenants:\n - {name: a, keys: [k], buffer_gb: 1}\n - {name: b, keys: [k], buffer_gb: 1}",
         "key 'k' is given to tenants a and b"),
        ("tenants:\n - {name: a, keys: [k], buffer_gb: 1, salt: x}\n"
         " - {name: b, keys: [j], buffer_gb: 1, salt: x}", "salt 'x'"),
        ("tenants:\n - {name: A_b, keys: [k], buffer_gb: 1}", "DNS label"),
        ("tenants:\n - {name: a, keys: [k], buffer_gb: 0}", "buffer_gb"),
        ("tenants:\n - {name: a, keys: [], buffer_gb: 1}", "no keys"),
        ("tenants:\n - {name: a, keys: [../x], buffer_gb: 1}", "not a certificate name"),
        ("tenants:\n - {name: a, keys: [k], buffer_gb: 1, quota: 3}", "unknown field"),
        ("tenants:\n - {name: a, keys: [k], buffer_gb: 1, segment: {mode: '0644'}}", "mode"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_tenants(text)


def test_a_tenant_file_that_does_not_fit_stops_the_server_with_the_reason(tmp_path, keys):
    allowed = allowed_dir(tmp_path, keys, "a1", "b")
    big = tmp_path / "big.yaml"
    big.write_text("tenants:\n - {name: a, keys: [a1], buffer_gb: 1}\n")
    srv = ServerProcess(buffer_gb=0.02, extra=[
        "--curve-secret-key", str(keys["server"][1]), "--curve-allowed-keys", str(allowed),
        "--tenants", str(big)])
    srv.log_path = tmp_path / "big.log"
    with pytest.raises(RuntimeError, match="exited early"):
        srv.start()
    assert "buffers add up to 1.00 GB, over --cpu-buffer-size 0.02 GB" in srv.log()
    assert not Path(f"/dev/shm/{srv.shm_name}-a").exists()
    no_curve = subprocess.run([sys.executable, "-m", "kvdepot.server", "--tenants", str(big)],
                              capture_output=True, text=True, timeout=60)
    assert no_curve.returncode == 2 and "--tenants needs --curve-secret-key" in no_curve.stderr


def test_each_tenant_maps_its_own_segment_and_strangers_are_refused(tmp_path, keys):
    srv = start(tmp_path, keys, tenant_file(tmp_path))
    clients = []
    try:
        a1, a2, b = (connect(srv, keys, n) for n in ("a1", "a2", "b"))
        clients = [a1, a2, b]
        assert a1._arena.name == a2._arena.name == f"{srv.shm_name}-team-a"
        assert b._arena.name == f"{srv.shm_name}-team-b"
        assert (a1._arena.size, b._arena.size) == (2 * MIB, 4 * MIB)
        for tenant in ("team-a", "team-b"):
            assert os.stat(f"/dev/shm/{srv.shm_name}-{tenant}").st_mode & 0o777 == 0o600
        assert not Path(f"/dev/shm/{srv.shm_name}").exists()  # no segment shared by all

        stranger = KVDepotClient("127.0.0.1", srv.port, curve=curve(keys, "stranger"),
                                 timeout_ms=5000, heartbeat=False)
        assert not stranger.connect()
        assert isinstance(stranger.last_error, AuthenticationFailed)
        assert stranger.last_error.code == p.ErrorCode.UNAUTHORIZED
        assert "'stranger' belongs to no tenant" in str(stranger.last_error)
        stranger.close()
        s = stats(srv)
        assert s.engines_connected == 3 and [t.name for t in s.tenants] == ["team-a", "team-b"]
        assert (tenant_row(s, "team-a").engines_connected, tenant_row(s, "team-b").engines_connected) == (2, 1)
        assert s.arena_bytes == 6 * MIB
        status, _, body = http("GET", f"http://127.0.0.1:{srv.http_port}/metrics")
        metrics = body.decode()
        assert status == 200
        assert 'kvdepot_tenant_buffer_capacity_bytes{tenant="team-a"} 2.097152e+06' in metrics
        assert 'kvdepot_tenant_engines_connected{tenant="team-a"} 2.0' in metrics
        assert "salt-of-a" not in metrics and '"a1"' not in metrics  # no salt, no key name
        table = io.StringIO()
        assert run_status(f"127.0.0.1:{srv.http_port}", out=table) == 0
        assert "tenant team-a" in table.getvalue() and "of its 2.10 MB buffer" in table.getvalue()
        # A tenant's engine sees its own partition's stats, nothing of the other tenant.
        own = b.stats()
        assert [t.name for t in own.tenants] == ["team-b"] and own.arena_bytes == 4 * MIB
    finally:
        for c in clients:
            c.close()
        assert srv.stop() == 0
    assert not Path(f"/dev/shm/{srv.shm_name}-team-a").exists()


def test_salts_and_models_are_the_tenants_and_handles_cannot_be_borrowed(tmp_path, keys):
    srv = start(tmp_path, keys, tenant_file(tmp_path))
    clients = []
    try:
        a1, a2, b = (connect(srv, keys, n) for n in ("a1", "a2", "b"))
        clients = [a1, a2, b]
        geometry = small_geometry()
        ns_a = a1.register("m", geometry)  # no salt claimed: the tenant's is used
        assert a2.register("m", geometry, salt="salt-of-a").digest == ns_a.digest
        assert a2.register("m", geometry, salt="salt-of-a").id == ns_a.id  # one namespace
        before = stats(srv)
        for claim in ("team-b", "", "salt-of-b"):
            if claim:
                with pytest.raises(KVDepotError, match="UNAUTHORIZED.*not your tenant's"):
                    a1.register("m", geometry, salt=claim)
        with pytest.raises(KVDepotError, match="UNAUTHORIZED.*may not cache model 'secret'"):
            a1.register("secret", geometry)
        ns_b = b.register("m", geometry)  # any model for team-b, its own salt
        assert ns_b.digest != ns_a.digest
        assert stats(srv).namespaces == before.namespaces + 1  # the refusals made nothing

        # Handles are random 62-bit numbers, not ordinals, and only their tenant's.
        assert min(ns_a.id, ns_b.id) > 1 << 20
        keys_a = store_chain(a1, ns_a, seed=1, chunks=3)
        blob = b"".join(keys_a)
        replies = {}
        for label, handle in (("a's handle", ns_a.id), ("nobody's", ns_a.id ^ 0x5A5A5A)):
            for request in (p.Lookup(req_id=1, namespace=handle, keys=blob, lease_ms=1000),
                            p.Reserve(req_id=2, namespace=handle, rank=0, keys=blob),
                            p.Acquire(req_id=3, namespace=handle, rank=0, keys=blob)):
                reply = _raw(b, request)
                assert isinstance(reply, p.ErrorReply), (label, reply)
                replies.setdefault(type(request).__name__, set()).add(
                    (reply.code, reply.message.replace(str(handle), "H")))
        # The same answer whether the handle is another tenant's or nobody's.
        assert all(len(v) == 1 for v in replies.values()), replies
        assert {c for v in replies.values() for c, _ in v} == {p.ErrorCode.UNKNOWN_NAMESPACE}
        assert hits_with_right_bytes(a2, ns_a, keys_a, seed=1) == 3  # nothing changed for a
    finally:
        for c in clients:
            c.close()
        srv.stop()


def _raw(c: KVDepotClient, request: p.Message) -> p.Reply:
    """One request as the client would send it, the reply whatever it is (errors included)."""
    try:
        return c._call_raw(request)
    except KVDepotError as exc:
        return p.ErrorReply(req_id=0, code=exc.code, message=exc.message)


def test_a_lookup_of_another_tenants_prefix_answers_like_any_miss(tmp_path, keys):
    srv = start(tmp_path, keys, tenant_file(tmp_path))
    clients = []
    try:
        a, b = connect(srv, keys, "a1"), connect(srv, keys, "b")
        clients = [a, b]
        ns_a, ns_b = a.register("m", small_geometry()), b.register("m", small_geometry())
        stored = store_chain(a, ns_a, seed=2, chunks=8)
        assert hits_with_right_bytes(a, ns_a, stored, seed=2) == 8
        strangers = [os.urandom(16) for _ in range(8)]

        def timed(keys: list[bytes]) -> tuple[list[float], p.LookupReply]:
            times, reply = [], None
            for _ in range(300):
                t0 = time.perf_counter()
                got = b.lookup(ns_b, keys)
                times.append(time.perf_counter() - t0)
                reply = got
            return times, reply

        t_prefix, r_prefix = timed(stored)  # a's exact keys, from b
        t_random, r_random = timed(strangers)
        assert (r_prefix.hit_chunks, r_prefix.lease, r_prefix.pending) == (0, 0, 0)
        assert (r_prefix.hit_chunks, r_prefix.lease, r_prefix.pending, r_prefix.offsets) == \
            (r_random.hit_chunks, r_random.lease, r_random.pending, r_random.offsets)
        # The same path (b's own index, where neither exists): medians within noise. The bound
        # is loose on purpose (a shared CI machine); the figure is in the failure message.
        m_prefix, m_random = statistics.median(t_prefix), statistics.median(t_random)
        assert 0.5 < m_prefix / m_random < 2.0, (m_prefix, m_random)
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_quotas_hold_under_concurrent_stores_and_no_tenant_evicts_another(tmp_path, keys):
    """team-a (2 MiB buffer, 4 MiB disk) floods from two engines and four threads at once;
    team-b's chunks, stored first, all stay and read back right. Each tier's bytes stay
    within the tenant's quota."""
    disk = tmp_path / "disk"
    tenants = tenant_file(tmp_path, a="disk_gb: 0.00390625", b="disk_gb: 0.00390625")
    srv = start(tmp_path, keys, tenants, "--disk-path", str(disk), "--disk-size", "0.01")
    clients = []
    try:
        b = connect(srv, keys, "b")
        clients.append(b)
        ns_b = b.register("m", small_geometry())
        b_chains = [(seed, store_chain(b, ns_b, seed=seed, chunks=4)) for seed in (10, 11, 12)]
        errors: list[BaseException] = []

        def flood(name: str, first_seed: int) -> None:
            try:
                c = connect(srv, keys, name)
                clients.append(c)
                ns = c.register("m", small_geometry())
                for seed in range(first_seed, first_seed + 25):
                    store_chain(c, ns, seed=seed, chunks=6)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=flood, args=(name, 100 + 50 * i))
                   for i, name in enumerate(("a1", "a2", "a1", "a2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        s = stats(srv)
        a_row, b_row = tenant_row(s, "team-a"), tenant_row(s, "team-b")
        assert a_row.stored_bytes > 2 * a_row.arena_bytes  # past its quota, evicting
        assert a_row.evicted_chunks > 0 and a_row.used_bytes <= a_row.arena_bytes == 2 * MIB
        assert b_row.evicted_chunks == 0
        for seed, chain in b_chains:
            assert hits_with_right_bytes(b, ns_b, chain, seed=seed) == 4
        disks = {t.name: t for t in s.tiers}
        assert disks["team-a/disk"].capacity_bytes == 4 * MIB
        assert 0 < disks["team-a/disk"].used_bytes <= 4 * MIB
        assert (disk / "tenants" / "team-a").is_dir() and (disk / "tenants" / "team-b").is_dir()
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_a_tenants_remote_quota_bounds_what_it_writes_per_ttl(tmp_path, keys):
    with RedisServer(tmp_path / "redis") as redis:
        tenants = tenant_file(tmp_path, a=f"remote_gb: {1 * MIB / (1 << 30)}")
        srv = start(tmp_path, keys, tenants, "--remote", redis.url, "--remote-ttl", "600")
        clients = []
        try:
            a, b = connect(srv, keys, "a1"), connect(srv, keys, "b")
            clients = [a, b]
            ns_a = a.register("m", small_geometry())
            store_chain(a, ns_a, seed=5, chunks=24)  # write-through: 24 x 64 KiB = 1.5 MiB
            row = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                row = {t.name: t for t in stats(srv).tiers}["team-a/remote"]
                if row.writes + row.write_errors >= 24 and not row.copies_in_flight:
                    break
            assert row is not None and row.written_bytes <= 1 * MIB < row.written_bytes + ns_a.slot_bytes * row.write_errors
            assert row.write_errors > 0 and "over quota" in row.last_error
            assert "team-b/remote" not in {t.name for t in stats(srv).tiers}  # no quota: no tier
        finally:
            for c in clients:
                c.close()
            srv.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="two Unix users need root to set up")
def test_an_engine_of_one_tenant_cannot_map_anothers_segment(tmp_path, keys):
    """Segments owned by each tenant's user, mode 0600: the OS refuses the other user."""
    tenants = tenant_file(tmp_path, a=f"segment: {{user: {UID_A}, mode: '0600'}}",
                          b=f"segment: {{user: {UID_B}, mode: '0600'}}")
    srv = start(tmp_path, keys, tenants)
    try:
        seg_a, seg_b = (f"/dev/shm/{srv.shm_name}-team-{t}" for t in "ab")
        assert os.stat(seg_a).st_uid == UID_A and os.stat(seg_b).st_uid == UID_B
        assert as_user(UID_B, [f"{srv.shm_name}-team-a", f"{srv.shm_name}-team-b"]) == [
            "denied 13", "mapped"]
        assert as_user(UID_A, [f"{srv.shm_name}-team-a", f"{srv.shm_name}-team-b"]) == [
            "mapped", "denied 13"]
    finally:
        srv.stop()


def as_user(uid: int, segments: list[str]) -> list[str]:
    """Map each segment as an engine would (ArenaMapping, read-write) in a child process
    running as ``uid``: "mapped" or "denied ERRNO" per segment. A fork, not an exec: the
    other user need not be able to read this interpreter's files."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        try:
            os.setgid(uid)
            os.setuid(uid)
            out = []
            for name in segments:
                try:
                    ArenaMapping(name, 4096).close()
                    out.append("mapped")
                except PermissionError as exc:
                    out.append(f"denied {exc.errno}")
            os.write(write, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    return data.split("\n")


def test_the_security_docs_tenant_file_is_a_valid_one():
    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    block = doc.split("```yaml\n# /etc/kvdepot/tenants.yaml\n", 1)[1].split("```", 1)[0]
    tenants = parse_tenants(block)
    assert [t.name for t in tenants] == ["team-a", "team-b"]
    assert tenants[0].segment.user == 1001 and tenants[1].namespace_salt == "team-b"


def test_vllm_engines_share_within_a_tenant_and_never_across(tmp_path, keys):
    """Real vLLM CPU engines through a server with tenants: a second engine of team-a hits
    every whole chunk the first stored (bit-equal to vLLM's own prefix-cache hit); team-b's
    engine, same prompt, misses and computes the same output; a team-a engine claiming
    team-b's salt is refused and serves without the cache, same output."""
    pytest.importorskip("vllm")
    import vllm_support as vs

    model = vs.write_tiny_llama(tmp_path / "tiny-llama", seed=0)
    prompt = vs.random_prompt(840, seed=1)  # 3 whole chunks + 72 tokens
    rounds = [{"prompts": [prompt], "max_tokens": 8}]
    base = vs.run_engine(model, rounds * 2)["rounds"]  # a full prefill, then vLLM's own hit
    full, hit = base[0]["outputs"][0], base[1]["outputs"][0]
    allowed = allowed_dir(tmp_path, keys, "a1", "a2", "b")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n"
                       " - {name: team-a, keys: [a1, a2], buffer_gb: 0.02}\n"
                       " - {name: team-b, keys: [b], buffer_gb: 0.02}\n")
    srv = vs.KVDepotServer(cpu_buffer_gb=0.05, extra_args=[
        "--curve-secret-key", str(keys["server"][1]), "--curve-allowed-keys", str(allowed),
        "--tenants", str(tenants)])
    srv._client = KVDepotClient("127.0.0.1", srv.port, curve=curve(keys, "a1"), timeout_ms=500)

    def engine(name: str, **extra) -> dict:
        cfg = vs.kvdepot_transfer_config(srv.port, **{
            "kvdepot.curve_server_key": str(keys["server"][0]),
            "kvdepot.curve_client_key": str(keys[name][1]), **extra})
        return vs.run_engine(model, rounds, kv_transfer_config=cfg)

    with srv:
        outs = [engine(name)["rounds"][0]["outputs"][0] for name in ("a1", "a2", "b")]
        assert [o["num_cached_tokens"] for o in outs] == [0, 768, 0]
        vs.assert_same_output(outs[0], full)
        vs.assert_same_output(outs[1], hit)
        vs.assert_same_output(outs[2], full)
        borrowed = engine("a2", **{"kvdepot.salt": "team-b"})
        out = borrowed["rounds"][0]["outputs"][0]
        assert out["num_cached_tokens"] == 0
        vs.assert_same_output(out, full)
    log = Path(borrowed["log"]).read_text()
    said = [line for line in log.splitlines() if "refused this engine" in line]
    assert said and "this salt is not your tenant's" in said[0], log[-3000:]


def test_a_connection_taking_over_a_sessions_routing_id_gets_none_of_it(tmp_path, keys):
    """Routing ids are guessable, and a peer may pick its own: a connection of tenant b under
    the id a session of tenant a had (its connection just closed) is not that session: every
    request but Hello is refused, and nothing of a's is reached."""
    srv = start(tmp_path, keys, tenant_file(tmp_path))
    ctx = zmq.Context()
    took_over = 0
    try:
        for trial in range(20):
            victim = dealer(ctx, srv, keys, "a1", b"victim-%d" % trial)
            hello = p.Hello(req_id=1, protocol_version=p.PROTOCOL_VERSION, engine_id="victim")
            assert isinstance(ask(victim, hello), p.HelloReply)
            reg = ask(victim, p.Register(req_id=2, model="m", geometry=small_geometry()))
            assert isinstance(reg, p.RegisterReply)
            victim.close(linger=0)
            thief = dealer(ctx, srv, keys, "b", b"victim-%d" % trial)
            lookup = p.Lookup(req_id=3, namespace=reg.namespace, keys=os.urandom(16), lease_ms=1000)
            reply = ask(thief, lookup)
            thief.close(linger=0)
            if reply is None:  # the ROUTER still had the old connection: the thief was dropped
                continue
            assert isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.NO_SESSION, reply
            took_over += "for this connection" in reply.message
        assert took_over, "no trial reached the session before its end: the check went untested"
    finally:
        ctx.term()
        srv.stop()


def dealer(ctx: zmq.Context, srv: ServerProcess, keys, name: str, routing_id: bytes) -> zmq.Socket:
    c = curve(keys, name)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.setsockopt(zmq.CURVE_SERVERKEY, c.server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, c.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, c.secret_key)
    sock.connect(f"tcp://127.0.0.1:{srv.port}")
    return sock


def ask(sock: zmq.Socket, request: p.Message, timeout_ms: int = 2000) -> p.Reply | None:
    sock.send(p.encode(request))
    if not sock.poll(timeout_ms):
        return None
    return p.decode_reply(sock.recv())
