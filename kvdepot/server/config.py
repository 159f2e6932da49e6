"""Server settings and the command line that sets them."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field

from kvdepot.server.policies import DEFAULT_POLICY, POLICY_CLASSES
from kvdepot.server.prefetching import PrefetchSettings

GB = 1_000_000_000
MIB = 1 << 20
WRITE_POLICIES = ("write-back", "write-through")
REMOTE_WRITE_POLICIES = ("write-through", "on-evict", "off")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "localhost"
    port: int = 5555
    chunk_size: int = 256
    cpu_buffer_size_gb: float = 5.0
    max_workers: int = 1
    shm_name: str = "kvdepot"
    shm_mode: int = 0o600
    shm_group: str | None = None
    slab_size_mb: int = 0  # 0: derived from the buffer size
    lease_ttl_s: float = 30.0
    reservation_ttl_s: float = 30.0
    session_timeout_s: float = 10.0
    heartbeat_s: float = 1.0
    http_port: int = 8555  # -1: no HTTP endpoint
    enable_admin_api: bool = False
    log_level: str = "INFO"
    eviction_policy: str = DEFAULT_POLICY
    disk_path: str | None = None  # None: no disk tier
    disk_size_gb: float = 0.0
    disk_write_policy: str = "write-back"
    disk_admit_hits: int = 0
    disk_queue_depth: int = 16
    prefetch: PrefetchSettings = PrefetchSettings()
    remote_urls: tuple[str, ...] = ()  # empty: no remote tier
    remote_ttl_s: int = 86_400
    remote_write_policy: str = "write-through"
    remote_key_prefix: str = "kvdepot"
    remote_username: str | None = None
    remote_password: str | None = field(default=None, repr=False)  # never in a log line
    remote_ca_file: str | None = None
    remote_cert_file: str | None = None
    remote_key_file: str | None = None
    remote_queue_depth: int = 16
    remote_timeout_ms: float = 2000.0
    curve_secret_key: str | None = None  # the server's secret certificate; None: no CURVE
    curve_allowed_keys: str | None = None  # directory of the allowed clients' certificates
    allow_unauthenticated: bool = False  # a non-loopback host without CURVE, said explicitly
    tenants_file: str | None = None  # tenants.py's YAML; None: one cache for every client
    admin_token_file: str | None = None  # POST /admin/* needs its token (bearer)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_size_gb * GB)

    @property
    def buffer_bytes(self) -> int:
        return int(self.cpu_buffer_size_gb * GB)

    @property
    def slab_bytes(self) -> int:
        return slab_bytes_for(self.buffer_bytes, self.slab_size_mb)


def slab_bytes_for(buffer_bytes: int, slab_size_mb: int = 0) -> int:
    """The allocator's slab size for a buffer: --slab-size-mb when given (non-zero), else
    derived from the buffer's size."""
    if slab_size_mb:
        return slab_size_mb * MIB
    # Big enough that a large model's chunk (tens of MiB per rank) wastes little of a
    # slab, small enough that a buffer has many slabs to share between models.
    target = min(256 * MIB, max(MIB, buffer_bytes // 16))
    # Equal slabs that tile the buffer (4 KiB-aligned), so no tail of it goes unused.
    count = -(-buffer_bytes // target)
    return max(4096, buffer_bytes // count // 4096 * 4096)


def build_parser(prog: str = "kvdepot serve") -> argparse.ArgumentParser:
    d = ServerConfig()
    ap = argparse.ArgumentParser(
        prog=prog, description="Run the kvdepot KV-cache server (one per node)."
    )
    ap.add_argument("--host", default=d.host, help="interface for ZMQ and HTTP (default %(default)s)")
    ap.add_argument("--port", type=int, default=d.port, help="ZMQ port (default %(default)s)")
    ap.add_argument("--chunk-size", type=int, default=d.chunk_size,
                    help="tokens per cached chunk (default %(default)s)")
    ap.add_argument("--cpu-buffer-size", type=float, default=d.cpu_buffer_size_gb,
                    help="shared-memory buffer in GB (default %(default)s)")
    ap.add_argument("--max-workers", type=int, default=d.max_workers,
                    help="threads for blocking background work: touching the buffer's pages, "
                         "tier I/O (default %(default)s)")
    ap.add_argument("--shm-name", default=d.shm_name,
                    help="name of the segment in /dev/shm (default %(default)s)")
    ap.add_argument("--shm-mode", default="0600",
                    help="octal permissions of the segment: 0600 (owner) or 0660 (group)")
    ap.add_argument("--shm-group", default=None, help="group that owns the segment (with 0660)")
    ap.add_argument("--slab-size-mb", type=int, default=0,
                    help="allocation slab size in MiB (default: from the buffer size)")
    ap.add_argument("--lease-ttl", type=float, default=d.lease_ttl_s,
                    help="seconds a read lease lives unless released (default %(default)s)")
    ap.add_argument("--reservation-ttl", type=float, default=d.reservation_ttl_s,
                    help="seconds a store may take from reserve to commit (default %(default)s)")
    ap.add_argument("--session-timeout", type=float, default=d.session_timeout_s,
                    help="seconds of engine silence before its leases are dropped (default %(default)s)")
    ap.add_argument("--http-port", type=int, default=d.http_port,
                    help="port of /healthz /readyz /metrics /stats; -1 disables (default %(default)s)")
    ap.add_argument("--enable-admin-api", action="store_true",
                    help="allow POST /admin/clear on the HTTP endpoint")
    ap.add_argument("--eviction-policy", default=d.eviction_policy, choices=sorted(POLICY_CLASSES),
                    help="which evictable chunk goes first: lru (least recently used) or "
                         "s3fifo (scan-resistant: chunks read once go before chunks read "
                         "again) (default %(default)s)")
    disk = ap.add_argument_group("disk tier (below the buffer; off unless --disk-path is given)")
    disk.add_argument("--disk-path", default=None,
                      help="directory of the disk tier's chunk files: an empty or new one, or "
                           "a previous server's (its chunks are served again)")
    disk.add_argument("--disk-size", type=float, default=None,
                      help="GB (10^9 bytes) the disk tier may hold at most, headers and "
                           "temporary files included (required with --disk-path)")
    disk.add_argument("--disk-write-policy", default=d.disk_write_policy,
                      choices=WRITE_POLICIES,
                      help="write-back: a chunk is written when evicted from the buffer; "
                           "write-through: as soon as it is stored (default %(default)s)")
    disk.add_argument("--disk-admit-hits", type=int, default=d.disk_admit_hits,
                      help="write only chunks that lookups hit this many times (default "
                           "%(default)s: every chunk)")
    disk.add_argument("--disk-queue-depth", type=int, default=d.disk_queue_depth,
                      help="disk writes and loads in flight at once; a write that finds the "
                           "queue full is dropped and counted (default %(default)s)")
    p = d.prefetch
    disk.add_argument("--prefetch-deadline-ms", type=float, default=p.deadline_base_s * 1000,
                      help="a lookup's loads from disk count as misses after this many ms "
                           "(default %(default)s) ...")
    disk.add_argument("--prefetch-deadline-per-token-ms", type=float,
                      default=p.deadline_per_token_s * 1000,
                      help="... plus this many ms per token loaded (default %(default)s)")
    disk.add_argument("--recompute-tokens-per-s", type=float, default=p.recompute_tokens_per_s,
                      help="prefill speed an engine reaches at least: a load from disk "
                           "expected to be slower than recomputing its tokens is not started "
                           "(default %(default)s)")
    remote = ap.add_argument_group(
        "remote tier (a Redis/Valkey Cluster or server shared by the nodes; off unless "
        "--remote is given)")
    remote.add_argument("--remote", action="append", default=[], metavar="URL",
                        help="redis://HOST:PORT or rediss://HOST:PORT (TLS) of a cluster node "
                             "or a single server; repeat for more seed nodes. User and "
                             "password: env KVDEPOT_REMOTE_USER / KVDEPOT_REMOTE_PASSWORD or "
                             "--remote-password-file")
    remote.add_argument("--remote-ttl", type=int, default=d.remote_ttl_s, metavar="SECONDS",
                        help="every key written expires after this many seconds (default "
                             "%(default)s); the cluster's maxmemory policy evicts before that")
    remote.add_argument("--remote-write-policy", default=d.remote_write_policy,
                        choices=REMOTE_WRITE_POLICIES,
                        help="write-through: a chunk is written as soon as it is stored, so "
                             "other nodes hit it at once; on-evict: when it leaves this "
                             "node's buffer; off: read what other nodes wrote, write nothing "
                             "(default %(default)s)")
    remote.add_argument("--remote-key-prefix", default=d.remote_key_prefix,
                        help="first part of every key: one per deployment sharing a cluster "
                             "(default %(default)s)")
    remote.add_argument("--remote-password-file", default=None, metavar="PATH",
                        help="file whose first line is the password (instead of the "
                             "environment)")
    remote.add_argument("--remote-ca-file", default=None, metavar="PATH",
                        help="CA bundle that signs the servers' certificates (rediss://)")
    remote.add_argument("--remote-cert-file", default=None, metavar="PATH",
                        help="client certificate for servers that require one (rediss://)")
    remote.add_argument("--remote-key-file", default=None, metavar="PATH",
                        help="the client certificate's private key")
    remote.add_argument("--remote-queue-depth", type=int, default=d.remote_queue_depth,
                        help="remote writes and loads in flight at once; a write that finds "
                             "the queue full is dropped and counted (default %(default)s)")
    remote.add_argument("--remote-timeout-ms", type=float, default=d.remote_timeout_ms,
                        help="a remote write is given up after this many ms; lookups wait "
                             "for the cluster at most --prefetch-deadline-ms (default "
                             "%(default)s)")
    auth = ap.add_argument_group(
        "authentication (CURVE on the ZMQ port, a token for the admin API; required on a "
        "non-loopback --host; see docs/security.md)")
    auth.add_argument("--curve-secret-key", default=None, metavar="PATH",
                      help="the server's secret certificate (NAME.key_secret, from `kvdepot "
                           "keys generate`): engines must speak CURVE and know its public key")
    auth.add_argument("--curve-allowed-keys", default=None, metavar="DIR",
                      help="directory of the allowed engines' public certificates (*.key); "
                           "reloaded on SIGHUP and when its files change")
    auth.add_argument("--allow-unauthenticated", action="store_true",
                      help="serve a non-loopback --host without CURVE (and the admin API "
                           "without a token): anyone who reaches the ports may read and write "
                           "every engine's KV cache")
    auth.add_argument("--tenants", dest="tenants_file", default=None, metavar="FILE",
                      help="tenant file (YAML, docs/security.md): which client keys belong to "
                           "which tenant, its salt, models and quotas; each tenant gets a "
                           "buffer (segment) of its own. Needs CURVE")
    auth.add_argument("--admin-token-file", default=None, metavar="PATH",
                      help="file whose first line is the bearer token POST /admin/* requires "
                           "(enables the admin API)")
    ap.add_argument("--log-level", default=os.environ.get("KVDEPOT_LOG_LEVEL", d.log_level),
                    help="DEBUG, INFO, WARNING or ERROR (env KVDEPOT_LOG_LEVEL; default INFO)")
    return ap


def parse_args(argv: list[str] | None = None, prog: str = "kvdepot serve") -> ServerConfig:
    ap = build_parser(prog)
    a = ap.parse_args(argv)
    if a.chunk_size < 1 or a.chunk_size > 1 << 20:
        ap.error("--chunk-size must be between 1 and 1048576 tokens")
    if a.cpu_buffer_size <= 0:
        ap.error("--cpu-buffer-size must be positive")
    if a.max_workers < 1:
        ap.error("--max-workers must be at least 1")
    try:
        mode = int(a.shm_mode, 8)
    except ValueError:
        ap.error(f"--shm-mode {a.shm_mode!r} is not an octal mode")
    if mode & ~0o660 or not mode & 0o600 == 0o600:
        ap.error("--shm-mode must be 0600 or 0660 (never world-readable)")
    for name in ("lease_ttl", "reservation_ttl", "session_timeout"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if (a.disk_path is None) != (a.disk_size is None):
        ap.error("--disk-path and --disk-size go together")
    if a.disk_size is not None and a.disk_size <= 0:
        ap.error("--disk-size must be positive")
    if a.disk_admit_hits < 0 or a.disk_queue_depth < 1:
        ap.error("--disk-admit-hits must be >= 0 and --disk-queue-depth >= 1")
    remote = _remote_settings(ap, a)
    auth = _auth_settings(ap, a)
    try:
        prefetch = PrefetchSettings(
            deadline_base_s=a.prefetch_deadline_ms / 1000,
            deadline_per_token_s=a.prefetch_deadline_per_token_ms / 1000,
            recompute_tokens_per_s=a.recompute_tokens_per_s,
        )
    except ValueError as exc:
        ap.error(f"prefetch settings: {exc}")
    return ServerConfig(
        host=a.host,
        port=a.port,
        chunk_size=a.chunk_size,
        cpu_buffer_size_gb=a.cpu_buffer_size,
        max_workers=a.max_workers,
        shm_name=a.shm_name,
        shm_mode=mode,
        shm_group=a.shm_group,
        slab_size_mb=a.slab_size_mb,
        lease_ttl_s=a.lease_ttl,
        reservation_ttl_s=a.reservation_ttl,
        session_timeout_s=a.session_timeout,
        http_port=a.http_port,
        enable_admin_api=a.enable_admin_api or a.admin_token_file is not None,
        log_level=a.log_level.upper(),
        eviction_policy=a.eviction_policy,
        disk_path=a.disk_path,
        disk_size_gb=a.disk_size or 0.0,
        disk_write_policy=a.disk_write_policy,
        disk_admit_hits=a.disk_admit_hits,
        disk_queue_depth=a.disk_queue_depth,
        prefetch=prefetch,
        **remote,
        **auth,
    )


def _remote_settings(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """The remote tier's fields of ServerConfig; credentials from the environment or a file,
    never from the command line (it shows in ps)."""
    for url in a.remote:
        if not url.startswith(("redis://", "rediss://")):
            ap.error(f"--remote {url!r}: give redis://HOST:PORT or rediss://HOST:PORT")
    if a.remote_ttl < 1 or a.remote_queue_depth < 1 or a.remote_timeout_ms <= 0:
        ap.error("--remote-ttl, --remote-queue-depth and --remote-timeout-ms must be positive")
    prefix = a.remote_key_prefix
    if not prefix or len(prefix) > 64 or any(c in prefix for c in "{}:* \t\r\n"):
        ap.error(f"--remote-key-prefix {prefix!r}: 1-64 characters, none of braces, ':', '*' "
                 "or spaces")
    if bool(a.remote_cert_file) != bool(a.remote_key_file):
        ap.error("--remote-cert-file and --remote-key-file go together")
    password = os.environ.get("KVDEPOT_REMOTE_PASSWORD") or None
    if a.remote_password_file:
        try:
            with open(a.remote_password_file) as f:
                password = f.readline().rstrip("\r\n")
        except OSError as exc:
            ap.error(f"--remote-password-file: {exc}")
    for flag in ("remote_ca_file", "remote_cert_file", "remote_key_file"):
        path = getattr(a, flag)
        if path and not os.path.isfile(path):
            ap.error(f"--{flag.replace('_', '-')}: no file at {path}")
    return dict(
        remote_urls=tuple(a.remote),
        remote_ttl_s=a.remote_ttl,
        remote_write_policy=a.remote_write_policy,
        remote_key_prefix=a.remote_key_prefix,
        remote_username=os.environ.get("KVDEPOT_REMOTE_USER") or None,
        remote_password=password,
        remote_ca_file=a.remote_ca_file,
        remote_cert_file=a.remote_cert_file,
        remote_key_file=a.remote_key_file,
        remote_queue_depth=a.remote_queue_depth,
        remote_timeout_ms=a.remote_timeout_ms,
    )


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``: "localhost" or a loopback address (127.0.0.0/8,
    ::1). Any other name or address, "0.0.0.0" included, counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _auth_settings(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """The authentication fields of ServerConfig. The files are read when the server starts
    (a clear error then, exit 1): here only what goes together is checked."""
    if (a.curve_secret_key is None) != (a.curve_allowed_keys is None):
        ap.error("--curve-secret-key and --curve-allowed-keys go together")
    if a.tenants_file is not None and a.curve_secret_key is None:
        ap.error("--tenants needs --curve-secret-key and --curve-allowed-keys: a client's key "
                 "names its tenant")
    if not is_loopback(a.host) and not a.allow_unauthenticated:
        if a.curve_secret_key is None:
            ap.error(f"--host {a.host} is not a loopback address: anyone who reaches it could "
                     "read and write every engine's KV cache. Give --curve-secret-key and "
                     "--curve-allowed-keys (docs/security.md), or --allow-unauthenticated to "
                     "serve it open")
        if a.enable_admin_api and a.admin_token_file is None and a.http_port >= 0:
            ap.error(f"--enable-admin-api on --host {a.host} (not a loopback address) needs "
                     "--admin-token-file, or --allow-unauthenticated to leave it open")
    return dict(
        curve_secret_key=a.curve_secret_key,
        curve_allowed_keys=a.curve_allowed_keys,
        allow_unauthenticated=a.allow_unauthenticated,
        admin_token_file=a.admin_token_file,
        tenants_file=a.tenants_file,
    )
