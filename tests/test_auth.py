"""Authentication: CURVE on the control port, the admin token, and the engines' keys.

Real server processes (tests/server_process.py), real clients over TCP, keys written by
`kvdepot keys generate`; one real vLLM CPU engine pair stores and hits through a CURVE server,
and an engine with a refused key serves the same outputs without the cache.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.auth
from conftest import small_geometry
from server_process import ServerProcess

from kvdepot.client import AuthenticationFailed, ClientCurve, KVDepotClient
from kvdepot.connector.link import ServerLink
from kvdepot.connector.settings import CURVE_KEYS, ConnectorSettings, curve_key_paths
from kvdepot.connector.specs import NamespaceSpec
from kvdepot.protocol import ServerStats
from kvdepot.server.auth import CurveAuthenticator
from kvdepot.server.config import build_parser, parse_args
from kvdepot.server.main import build_server

TOKEN = "t0ken-" + "9f3c" * 8  # 38 characters
REPO = Path(__file__).resolve().parent.parent


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    out = subprocess.run([sys.executable, "-m", "kvdepot", "keys", "generate", str(directory),
                          "--name", name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return directory / f"{name}.key", directory / f"{name}.key_secret"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """name -> (public, secret certificate): the server's, and engines a, b and c's."""
    root = tmp_path_factory.mktemp("keys")
    paths = {"server": generate(root / "server", "server")}
    for name in ("a", "b", "c"):
        paths[name] = generate(root / "engines", name)
    return paths


def allowed_dir(tmp_path: Path, keys, *names: str) -> Path:
    directory = tmp_path / "allowed"
    directory.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(keys[name][0], directory)
    return directory


def curve(keys, name: str) -> ClientCurve:
    return ClientCurve.from_files(keys["server"][0], keys[name][1])


def curve_server(tmp_path: Path, keys, allowed: Path, *extra: str) -> ServerProcess:
    srv = ServerProcess(extra=["--curve-secret-key", str(keys["server"][1]),
                               "--curve-allowed-keys", str(allowed), *extra])
    srv.log_path = tmp_path / f"{srv.shm_name}.log"
    return srv


def client(srv: ServerProcess, c: ClientCurve | None, engine_id: str = "") -> KVDepotClient:
    return KVDepotClient("127.0.0.1", srv.port, curve=c, timeout_ms=5000, heartbeat=False,
                         engine_id=engine_id or None)


def http(method: str, url: str, token: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def stats(srv: ServerProcess) -> ServerStats:
    time.sleep(0.3)  # /stats is the snapshot the RPC loop publishes every 0.1 s
    status, _, body = http("GET", f"http://127.0.0.1:{srv.http_port}/stats")
    assert status == 200
    return msgspec.json.decode(body, type=ServerStats)


def store_one(c: KVDepotClient) -> None:
    ns = c.register("m", small_geometry())
    keys = c.chunk_keys(ns, list(range(ns.chunk_tokens)))
    r = c.reserve(ns, 0, keys)
    assert c.commit(r.id) == 1


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def non_loopback_ip() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for ip in out:
        if "." in ip and not ip.startswith("127."):
            return ip
    return None


def write_token(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_keys_generate_writes_a_pair_and_never_replaces_one(tmp_path):
    public, secret = generate(tmp_path / "new", "engine-1")
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert oct(public.stat().st_mode & 0o777) == "0o644"
    pub, sec = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (pub, None) and zmq.curve_public(sec) == pub
    before = secret.read_bytes()
    again = subprocess.run([sys.executable, "-m", "kvdepot", "keys", "generate",
                            str(tmp_path / "new"), "--name", "engine-1"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists; not replaced" in again.stderr
    assert secret.read_bytes() == before
    bad = subprocess.run([sys.executable, "-m", "kvdepot", "keys", "generate", str(tmp_path),
                          "--name", "../x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--name" in bad.stderr and not (tmp_path.parent / "x.key").exists()


def test_refused_clients_learn_why_at_once_and_change_nothing(tmp_path, keys):
    with curve_server(tmp_path, keys, allowed_dir(tmp_path, keys, "a")) as srv:
        good = client(srv, curve(keys, "a"))
        assert good.connect(), srv.log()
        store_one(good)
        wrong_server = ClientCurve.from_files(keys["b"][0], keys["a"][1])
        cases = [(None, "requires CURVE authentication"),
                 (curve(keys, "c"), f"refused this client's CURVE key {curve(keys, 'c').public_key.decode()}"),
                 (wrong_server, "is probably not that server's")]
        for c, why in cases:
            refused = client(srv, c)
            started = time.monotonic()
            assert not refused.connect()
            assert time.monotonic() - started < 1.0  # the handshake's answer, not the 5 s deadline
            assert isinstance(refused.last_error, AuthenticationFailed), refused.last_error
            assert why in refused.last_error.message
            with pytest.raises(AuthenticationFailed):  # every call says so, none reaches the server
                refused.register("m", small_geometry())
            refused.close()
        after = stats(srv)
        assert (after.engines_connected, after.namespaces, after.chunks) == (1, 1, 1)
        refusal = "Refused a client at 127.0.0.1: its CURVE key " + curve(keys, "c").public_key.decode()
        assert srv.log().count(refusal) == 1  # one line a minute
        good.close()


def test_unusable_key_files_stop_the_server_at_start_with_the_reason(tmp_path, keys):
    allowed = allowed_dir(tmp_path, keys, "a")
    for i, (args, code, why) in enumerate((
        ([keys["server"][0], allowed], 1, "is a public certificate; give the secret one"),
        ([keys["server"][1], tmp_path / "missing"], 1, "not a directory"),
        ([keys["a"][0]], 2, "--curve-secret-key and --curve-allowed-keys go together"),
    )):
        flags = ["--curve-secret-key", str(args[0])]
        flags += ["--curve-allowed-keys", str(args[1])] if len(args) > 1 else []
        srv = ServerProcess(extra=flags, log_path=tmp_path / f"bad-{i}.log")
        with pytest.raises(RuntimeError, match="exited early"):
            srv.start()
        assert srv.proc.returncode == code and why in srv.log(), srv.log()
        assert not os.path.exists(f"/dev/shm/{srv.shm_name}")  # nothing was made


def test_every_session_knows_its_clients_key(tmp_path, keys):
    """In-process server (built as `kvdepot serve` builds it) to read its sessions."""
    allowed = allowed_dir(tmp_path, keys, "a", "b")
    config = parse_args(["--host", "127.0.0.1", "--port", "0", "--http-port", "-1",
                         "--cpu-buffer-size", "0.01", "--shm-name", f"kvdepot-auth-{os.getpid()}",
                         "--curve-secret-key", str(keys["server"][1]),
                         "--curve-allowed-keys", str(allowed)])
    server, workers = build_server(config)
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    clients = []
    try:
        for name in ("a", "b"):
            c = KVDepotClient("127.0.0.1", server.port, curve=curve(keys, name), engine_id=name)
            assert c.connect()
            clients.append(c)
        sessions = server.run_in_loop(
            lambda: {s.engine_id: s.client_key for s in server.sessions.values()})
        assert sessions == {n: curve(keys, n).public_key.decode() for n in ("a", "b")}
    finally:
        for c in clients:
            c.close()
        server.stop()
        loop.join(5)
        workers.shutdown()
        server.arena.close()


def test_without_its_handler_a_curve_socket_lets_nobody_in(tmp_path, keys):
    """libzmq's default lets every handshake through while no ZAP handler is bound (at
    shutdown, or had the handler's thread died): the server's socket is set to refuse them."""
    auth = CurveAuthenticator(keys["server"][1], allowed_dir(tmp_path, keys, "a"))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    auth.secure(sock)  # and no auth.start(ctx)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    c = KVDepotClient("127.0.0.1", port, curve=curve(keys, "a"), timeout_ms=1000, heartbeat=False)
    assert not c.connect() and isinstance(c.last_error, AuthenticationFailed)  # no timeout
    c.close()
    sock.close(linger=0)
    ctx.term()


def test_allowed_keys_reload_on_sighup_and_on_a_directory_change(tmp_path, keys):
    allowed = allowed_dir(tmp_path, keys, "a")
    with curve_server(tmp_path, keys, allowed) as srv:
        a, b = client(srv, curve(keys, "a"), "engine-a"), client(srv, curve(keys, "b"), "engine-b")
        assert a.connect() and not b.connect()
        store_one(a)
        ns = a.register("m", small_geometry())
        lease = a.lookup(ns, a.chunk_keys(ns, list(range(ns.chunk_tokens))), lease_ms=60000)
        assert lease.hit_chunks == 1 and lease.lease
        # A malformed certificate: the reload changes nothing and says why.
        (allowed / "broken.key").write_text("curve\n    public-key = \"short\"\n")
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: srv.count(r"keys not reloaded \(SIGHUP\)") == 1)
        assert not b.connect() and a.stats().engines_connected == 1
        (allowed / "broken.key").unlink()
        # SIGHUP: b is allowed at once, without restarting the server or the client.
        shutil.copy(keys["b"][0], allowed)
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: srv.count(r"keys reloaded \(SIGHUP\)") == 1)
        assert wait_for(b.connect, timeout=5)
        # No signal: removing a's certificate is seen within a second or two; its session ends
        # (leases and reservations gone) and it can open no new one.
        (allowed / "a.key").unlink()
        assert wait_for(lambda: srv.count("Engine engine-a lost its key's access") == 1)
        assert b.stats().leases_held == 0
        assert srv.count(r"reloaded \(the directory changed\): 1 keys, 0 added, 1 removed") == 1
        with pytest.raises(AuthenticationFailed, match="no longer allowed"):
            a.stats()  # its session is gone; a new one is refused
        a.close()
        b.close()


def test_a_non_loopback_host_needs_curve_or_an_explicit_choice(tmp_path, keys):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine (hostname -I)")

    def on_ip(*extra: str, log: str) -> ServerProcess:
        srv = ServerProcess(log_path=tmp_path / log, extra=list(extra))
        srv.args[srv.args.index("--host") + 1] = ip
        return srv

    srv = on_ip(log="open.log")
    with pytest.raises(RuntimeError, match="exited early"):
        srv.start()
    assert srv.proc.returncode == 2
    assert f"--host {ip} is not a loopback address" in srv.log()
    assert "--allow-unauthenticated" in srv.log()
    admin = on_ip("--allow-unauthenticated", "--enable-admin-api", log="told.log")
    with admin:  # told explicitly: it serves, and warns
        assert "Serving %s without authentication" % ip in admin.log()
        assert "Admin API without a token" in admin.log()
        c = KVDepotClient(ip, admin.port, timeout_ms=5000, heartbeat=False)
        assert c.connect()
        c.close()
    secured = on_ip("--curve-secret-key", str(keys["server"][1]), "--curve-allowed-keys",
                    str(allowed_dir(tmp_path, keys, "a")), "--enable-admin-api", log="admin.log")
    with pytest.raises(RuntimeError, match="exited early"):
        secured.start()  # CURVE, but an admin API anyone on the network could use
    assert "--enable-admin-api on --host" in secured.log() and "--admin-token-file" in secured.log()
    secured.args += ["--admin-token-file", str(write_token(tmp_path))]
    with secured:
        c = KVDepotClient(ip, secured.port, curve=curve(keys, "a"), timeout_ms=5000, heartbeat=False)
        assert c.connect()
        c.close()


def test_admin_token_guards_every_change_and_no_page_shows_key_material(tmp_path, keys):
    with curve_server(tmp_path, keys, allowed_dir(tmp_path, keys, "a"),
                      "--admin-token-file", str(write_token(tmp_path))) as srv:
        c = client(srv, curve(keys, "a"))
        assert c.connect()
        store_one(c)
        base = f"http://127.0.0.1:{srv.http_port}"
        status, headers, body = http("POST", base + "/admin/clear")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert b"Authorization: Bearer" in body
        for wrong in ("nope", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
            assert http("POST", base + "/admin/clear", wrong)[0] == 403
        assert http("POST", base + "/admin/unknown", "nope")[0] == 403  # checked before routing
        assert stats(srv).chunks == 1  # nothing changed
        status, _, body = http("POST", base + "/admin/clear", TOKEN)
        assert status == 200 and msgspec.json.decode(body) == {"cleared_chunks": 1}
        assert stats(srv).chunks == 0
        assert srv.count("admin API: refused a request from 127.0.0.1") == 1  # one a minute
        secrets = [TOKEN] + [zmq.auth.load_certificate(keys[n][1])[1].decode()
                             for n in ("server", "a", "b", "c")]
        pages = {path: http("GET", base + path)[2].decode() for path in ("/metrics", "/stats")}
        pages["server log"] = srv.log()
        for where, text in pages.items():
            for secret in secrets:
                assert secret not in text, where
        c.close()
    for bad, why in (("short", "at least 16 characters"), ("has a space in it!", "without spaces")):
        srv = curve_server(tmp_path, keys, tmp_path / "allowed", "--admin-token-file",
                           str(write_token(tmp_path, bad)))
        with pytest.raises(RuntimeError, match="exited early"):
            srv.start()
        assert why in srv.log() and bad not in srv.log().split("Cannot start")[-1]


def test_connector_settings_take_the_key_paths_from_config_or_environment(keys, monkeypatch):
    server_pub, a_secret = str(keys["server"][0]), str(keys["a"][1])
    monkeypatch.delenv("KVDEPOT_CURVE_SERVER_KEY", raising=False)
    monkeypatch.delenv("KVDEPOT_CURVE_CLIENT_KEY", raising=False)
    assert ConnectorSettings().curve() is None
    extra = {"kvdepot.curve_server_key": server_pub, "kvdepot.curve_client_key": a_secret}
    settings = ConnectorSettings(**curve_key_paths(extra))
    assert settings.curve() == curve(keys, "a")
    assert curve(keys, "a").secret_key.decode() not in repr(settings.curve())
    monkeypatch.setenv("KVDEPOT_CURVE_SERVER_KEY", server_pub)
    monkeypatch.setenv("KVDEPOT_CURVE_CLIENT_KEY", str(keys["b"][1]))
    assert ConnectorSettings().curve() == curve(keys, "b")  # from the environment
    assert ConnectorSettings(**curve_key_paths(extra)).curve() == curve(keys, "a")  # config first
    monkeypatch.delenv("KVDEPOT_CURVE_CLIENT_KEY")
    with pytest.raises(ValueError, match="go together"):
        ConnectorSettings()
    for server, client_key, why in ((server_pub, str(keys["a"][0]), "is a public certificate"),
                                    (str(keys["server"][1]), a_secret, "holds the server's secret"),
                                    ("/nonexistent.key", a_secret, "/nonexistent.key")):
        with pytest.raises(ValueError, match=why):
            ConnectorSettings(curve_server_key=server, curve_client_key=client_key)


def test_a_refused_engine_link_serves_without_the_cache_says_why_once_and_recovers(
        tmp_path, keys, caplog):
    allowed = allowed_dir(tmp_path, keys, "a")
    with curve_server(tmp_path, keys, allowed) as srv:
        settings = ConnectorSettings(host="127.0.0.1", port=srv.port, retry_s=0.05,
                                     curve_server_key=str(keys["server"][0]),
                                     curve_client_key=str(keys["c"][1]))
        link = ServerLink(settings, engine_id="engine-c", outage_effect="serving without the cache")
        link.spec = NamespaceSpec(model="m", geometry=small_geometry(), world_size=1, salt="")
        caplog.set_level("INFO", logger="kvdepot.connector")
        started = time.monotonic()
        assert link.register_once() is None and link.down and link.ns is None
        assert time.monotonic() - started < 1.0
        for _ in range(5):
            assert link.register_once() is None
        refusals = [r for r in caplog.records if "refused this engine" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelname == "WARNING"
        assert "--curve-allowed-keys" in refusals[0].getMessage()
        shutil.copy(keys["c"][0], allowed)  # the operator allows it: no engine restart
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: link.register_once() is True, timeout=10)
        assert not link.down and "is back; using the cache again" in caplog.text
        link.close()


def test_security_doc_names_real_flags_and_settings_and_the_readme_links_it():
    doc = (REPO / "docs" / "security.md").read_text()
    readme = (REPO / "README.md").read_text()
    server_flags = {s for action in build_parser()._actions for s in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", doc))
    assert named - server_flags <= {"--name", "--from-file"}, named - server_flags
    for flag in ("--curve-secret-key", "--curve-allowed-keys", "--allow-unauthenticated",
                 "--admin-token-file"):
        assert flag in doc and f"`{flag}" in readme, flag
    for key, env in CURVE_KEYS.values():
        assert key in doc and env in doc and key in readme and env in readme
    assert "docs/security.md" in readme


def test_vllm_engines_store_and_hit_through_a_curve_server(tmp_path, keys):
    pytest.importorskip("vllm")
    import vllm_support as vs

    model = vs.write_tiny_llama(tmp_path / "tiny-llama", seed=0)
    prompt = vs.random_prompt(840, seed=1)  # 3 whole chunks + 72 tokens
    rounds = [{"prompts": [prompt], "max_tokens": 8}]
    base = vs.run_engine(model, rounds * 2)["rounds"]  # a full prefill, then vLLM's own hit
    full, hit = base[0]["outputs"][0], base[1]["outputs"][0]
    allowed = allowed_dir(tmp_path, keys, "a", "b")
    server_args = ["--curve-secret-key", str(keys["server"][1]), "--curve-allowed-keys", str(allowed)]
    srv = vs.KVDepotServer(extra_args=server_args)
    # The helper's readiness and stats client, given a key (it has none of its own).
    srv._client = KVDepotClient("127.0.0.1", srv.port, curve=curve(keys, "a"), timeout_ms=500)
    with srv:
        outs = []
        for name in ("a", "b"):
            cfg = vs.kvdepot_transfer_config(srv.port, **{
                "kvdepot.curve_server_key": str(keys["server"][0]),
                "kvdepot.curve_client_key": str(keys[name][1])})
            outs.append(vs.run_engine(model, rounds, kv_transfer_config=cfg)["rounds"][0]["outputs"][0])
        assert outs[0]["num_cached_tokens"] == 0
        vs.assert_same_output(outs[0], full)
        assert outs[1]["num_cached_tokens"] == 768  # every whole chunk, from the other engine
        vs.assert_same_output(outs[1], hit)
        stored = srv.stats().stored_chunks
        # A key the server does not know, from the environment: the same outputs, no cache.
        env = {"KVDEPOT_CURVE_SERVER_KEY": str(keys["server"][0]),
               "KVDEPOT_CURVE_CLIENT_KEY": str(keys["c"][1])}
        refused = vs.run_engine(model, rounds, kv_transfer_config=vs.kvdepot_transfer_config(srv.port),
                                env=env)
        out = refused["rounds"][0]["outputs"][0]
        assert out["num_cached_tokens"] == 0
        vs.assert_same_output(out, full)
        assert srv.stats().stored_chunks == stored
    log = Path(refused["log"]).read_text()
    warned = [line for line in log.splitlines() if "refused this engine" in line and "WARNING" in line]
    assert len(warned) == 1 and "refused this client's CURVE key" in warned[0], log[-3000:]
