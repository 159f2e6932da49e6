"""Wiring: build the arena, the core, the RPC loop and the HTTP endpoint, and run them."""

from __future__ import annotations

import grp
import logging
import signal
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import zmq

from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.arena import SharedArena
from kvdepot.server.auth import CurveAuthenticator
from kvdepot.server.cache import CacheCore, CacheObserver
from kvdepot.server.config import ServerConfig, is_loopback, parse_args, slab_bytes_for
from kvdepot.server.http import HttpEndpoint, load_admin_token
from kvdepot.server.metrics import ServerMetrics
from kvdepot.server.partition import PartitionPlan
from kvdepot.server.policies import policy_factory
from kvdepot.server.rpc import CacheServer
from kvdepot.server.tenants import TenantSpec, load_tenants
from kvdepot.server.tiers import Tier
from kvdepot.server.tiers.resp import RemoteClient, RemoteSettings
from kvdepot.server.tiers.disk import DiskTier
from kvdepot.server.tiers.remote import RemoteTier

log = logging.getLogger("kvdepot.server")

GIB = 1 << 30


class LoggingObserver(CacheObserver):
    """The log lines a user follows, and the metrics, for what the core did."""

    def __init__(self, metrics: ServerMetrics | None = None):
        self.metrics = metrics

    def on_store(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None:
        log.info("Stored %d tokens in %.4f seconds", tokens, seconds)
        if self.metrics is not None:
            self.metrics.observe_store(seconds, chunks, tokens, nbytes)

    def on_retrieve(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None:
        log.info("Retrieved %d tokens in %.4f seconds", tokens, seconds)
        if self.metrics is not None:
            self.metrics.observe_retrieve(seconds, chunks, tokens, nbytes)


def build_disk_tier(
    config: ServerConfig, tenant: TenantSpec | None = None
) -> DiskTier | None:
    """The disk tier the flags ask for (None without --disk-path), or ``tenant``'s: its
    directory under --disk-path, its quota (None when it has none); ValueError when the
    directory cannot be used."""
    if config.disk_path is None or (tenant is not None and tenant.disk_bytes <= 0):
        return None
    root, size = config.disk_path, config.disk_bytes
    if tenant is not None:
        root, size = str(Path(config.disk_path) / "tenants" / tenant.name), tenant.disk_bytes
    disk = DiskTier(
        root, size, queue_depth=config.disk_queue_depth,
        write_through=config.disk_write_policy == "write-through",
        admit_hits=config.disk_admit_hits,
    )
    p = config.prefetch
    disk.io.settings.update({
        "queue_depth": str(config.disk_queue_depth),
        "prefetch_deadline":
            f"{p.deadline_base_s * 1000:g} ms + {p.deadline_per_token_s * 1000:g} ms per token",
        "recompute_tokens_per_s": f"{p.recompute_tokens_per_s:g}",
    })
    log.info(
        "Disk tier at %s: %s GB, %s%s, O_DIRECT %s, reads ~%.2f GB/s (probe)",
        disk.root, _gb(size / (1 << 30)), config.disk_write_policy,
        f", admitted after {config.disk_admit_hits} hits" if config.disk_admit_hits else "",
        "on" if disk.direct else "off", disk.spec.read_bytes_per_s / 1e9,
    )
    return disk


def build_remote_tier(
    config: ServerConfig, threads: int, tenant: TenantSpec | None = None
) -> RemoteTier | None:
    """The remote tier the flags ask for (None without --remote), or ``tenant``'s (with its
    quota; None when it has none); connected by ``start``. ``threads``: the worker pool's,
    which may all copy to one node at once."""
    if not config.remote_urls or (tenant is not None and tenant.remote_bytes <= 0):
        return None
    client = RemoteClient(RemoteSettings(
        pool_size=threads,
        urls=config.remote_urls,
        username=config.remote_username,
        password=config.remote_password,
        ca_file=config.remote_ca_file,
        cert_file=config.remote_cert_file,
        key_file=config.remote_key_file,
    ))
    remote = RemoteTier(
        client, key_prefix=config.remote_key_prefix, ttl_s=config.remote_ttl_s,
        write_policy=config.remote_write_policy, queue_depth=config.remote_queue_depth,
        timeout_s=config.remote_timeout_ms / 1000,
        probe_timeout_s=max(0.05, config.prefetch.deadline_base_s),
        # Places of chunks in the cluster the core keeps (an index entry each): 8 buffers' worth.
        known_bytes=8 * (config.buffer_bytes if tenant is None else tenant.buffer_bytes),
        quota_bytes=None if tenant is None else tenant.remote_bytes,
        settings={
            "urls": " ".join(_without_password(u) for u in config.remote_urls),
            "tls": "on" if any(u.startswith("rediss://") for u in config.remote_urls) else "off",
            "user": config.remote_username or "default",
            "beside_disk": "yes" if config.disk_path else "",
        },
    )
    log.info(
        "Remote tier on %s: %s, TTL %d s, key prefix %r", remote.io.settings["urls"],
        config.remote_write_policy, config.remote_ttl_s, config.remote_key_prefix,
    )
    return remote


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def build_authenticator(config: ServerConfig) -> CurveAuthenticator | None:
    """CURVE as the flags ask for it (None without --curve-secret-key); ValueError when a key
    file or the allowed keys' directory cannot be used."""
    if config.curve_secret_key is None:
        if not is_loopback(config.host):
            log.warning("Serving %s without authentication (--allow-unauthenticated): anyone who "
                        "reaches port %d may read and write every engine's KV cache",
                        config.host, config.port)
        return None
    assert config.curve_allowed_keys is not None  # the parser lets them go only together
    auth = CurveAuthenticator(config.curve_secret_key, config.curve_allowed_keys)
    log.info("CURVE on: server public key %s, %d allowed client keys in %s",
             auth.public_key.decode(), auth.allowed_count, auth.allowed_dir)
    if not auth.allowed_count:
        log.warning("No allowed client keys in %s: no engine can connect until one is added",
                    auth.allowed_dir)
    return auth


def build_server(config: ServerConfig) -> tuple[CacheServer, ThreadPoolExecutor]:
    """The server the flags ask for, with its worker pool: one partition, or one per tenant
    of --tenants. Raises ValueError, OSError or KeyError (a group name) with what is wrong,
    having undone what it made."""
    auth = build_authenticator(config)  # first: a bad key file costs no segment
    tenants = load_tenants(config.tenants_file) if config.tenants_file else None
    if tenants is not None:
        assert auth is not None  # the parser requires CURVE with --tenants
        check_tenants(config, tenants, set(auth.certificate_names()))
    threads = config.max_workers
    if config.remote_urls:
        # Remote copies wait on the network, not on this CPU: several in flight keep the
        # cluster's shards busy (each shard's calls go over their own connections).
        threads = max(threads, min(config.remote_queue_depth, 8))
    workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvdepot-worker")
    metrics = ServerMetrics(lookup_totals_from_stats=True)
    boot_id = uuid.uuid4().hex  # every partition's segment names this boot
    with ExitStack() as undo:
        undo.callback(workers.shutdown, wait=False)
        if auth is not None:
            undo.callback(auth.stop)
        plans = [
            build_partition(config, tenant, boot_id, threads, metrics, undo)
            for tenant in (tenants or [None])
        ]
        single = plans[0] if tenants is None else None
        server = CacheServer(
            single.core if single else None,
            single.arena if single else None,
            host=config.host,
            port=config.port,
            heartbeat_s=config.heartbeat_s,
            session_timeout_s=config.session_timeout_s,
            metrics=metrics,
            executor=workers,
            tiers=(single.tiers or None) if single else None,
            auth=auth,
            tenants=plans if tenants is not None else (),
        )
        for plan in plans:
            for tier in plan.tiers.values():
                if isinstance(tier, RemoteTier):
                    tier.start()  # a cluster that cannot be reached is logged, and tried again
        undo.pop_all()
    log.info("Eviction policy: %s", config.eviction_policy)
    for plan in plans:
        plan.arena.touch_pages(workers)
    return server, workers


def check_tenants(config: ServerConfig, tenants: list[TenantSpec], certificates: set[str]) -> None:
    """The tenants fit the node's budgets: their buffers within --cpu-buffer-size, their disk
    quotas within --disk-size (and none without --disk-path); ValueError otherwise. Keys the
    file names that no allowed certificate has are only warned about (one may be added)."""
    buffers = sum(t.buffer_bytes for t in tenants)
    if buffers > config.buffer_bytes:
        raise ValueError(f"the tenants' buffers add up to {buffers / GIB:.2f} GB, over "
                         f"--cpu-buffer-size {config.cpu_buffer_size_gb:g} GB")
    disks = sum(t.disk_bytes for t in tenants)
    if disks and config.disk_path is None:
        raise ValueError("tenants have disk quotas, but there is no --disk-path")
    if disks > config.disk_bytes:
        raise ValueError(f"the tenants' disk quotas add up to {disks / GIB:.2f} GB, over "
                         f"--disk-size {config.disk_size_gb:g} GB")
    if any(t.remote_bytes for t in tenants) and not config.remote_urls:
        raise ValueError("tenants have remote quotas, but there is no --remote")
    for tenant in tenants:
        missing = sorted(set(tenant.keys) - certificates)
        if missing:
            log.warning("Tenant %s: no allowed certificate named %s in --curve-allowed-keys "
                        "(yet)", tenant.name, ", ".join(missing))


def build_partition(
    config: ServerConfig, tenant: TenantSpec | None, boot_id: str, threads: int,
    metrics: ServerMetrics, undo: ExitStack,
) -> PartitionPlan:
    """One partition: the whole node's cache (``tenant`` None) or a tenant's, with its own
    segment (``--shm-name``-TENANT, the tenant's owner and mode), buffer, disk directory and
    quotas. What it opens is closed by ``undo`` if the server does not start."""
    if tenant is None:
        name, size, mode, owner = config.shm_name, config.buffer_bytes, config.shm_mode, None
        group = grp.getgrnam(config.shm_group).gr_gid if config.shm_group else None
    else:
        name, size = f"{config.shm_name}-{tenant.name}", tenant.buffer_bytes
        seg = tenant.segment
        mode, owner, group = seg.mode_bits, seg.user, seg.group
    arena = SharedArena(name, size, mode=mode, group=group, boot_id=boot_id, owner=owner)
    undo.callback(arena.close)
    disk = build_disk_tier(config, tenant)
    if disk is not None:
        undo.callback(disk.close)
    remote = build_remote_tier(config, threads, tenant)
    if remote is not None:
        undo.callback(remote.close)
    tiers: dict[str, Tier] = {t.spec.name: t for t in (disk, remote) if t is not None}
    core = CacheCore(
        SlabAllocator(size, slab_bytes_for(size, config.slab_size_mb)),
        config.chunk_size,
        lease_ttl_s=config.lease_ttl_s,
        reservation_ttl_s=config.reservation_ttl_s,
        policy_factory=policy_factory(config.eviction_policy),
        observer=LoggingObserver(metrics),
        tiers=[t.spec for t in tiers.values()],
        prefetch=config.prefetch,
    )
    if disk is not None:
        # Before any engine can register: its namespace then finds its chunks waiting.
        core.adopt(disk.spec.name, list(disk.scan()))
    if tenant is not None:
        log.info("Tenant %s: buffer %s GB in %s (mode %s), disk %s GB, remote %s GB%s",
                 tenant.name, _gb(tenant.buffer_gb), arena.path, tenant.segment.mode,
                 _gb(tenant.disk_gb), _gb(tenant.remote_gb),
                 f", models {', '.join(tenant.models)}" if tenant.models else "")
    return PartitionPlan(core, arena, tiers, tenant)


def run(config: ServerConfig) -> int:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        token = load_admin_token(config.admin_token_file) if config.admin_token_file else None
        server, workers = build_server(config)
    except (OSError, ValueError, KeyError, zmq.ZMQError) as exc:
        log.error("Cannot start: %s", exc)
        return 1
    http = None
    try:
        if config.http_port >= 0:
            http = _start_http(config, server, token)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        signal.signal(signal.SIGHUP, lambda *_: _reload(server))
        auth = server.auth
        curve = f", CURVE with {auth.allowed_count} allowed client keys" if auth is not None else ""
        print(
            f"kvdepot cache server is running on tcp://{config.host}:{server.port} "
            f"(buffer {_gb(config.cpu_buffer_size_gb)} GB, chunk {config.chunk_size} tokens{curve})"
            + (f", HTTP on http://{config.host}:{http.port}" if http is not None else ""),
            flush=True,
        )
        server.serve_forever()
    finally:
        if http is not None:
            http.stop()
        # Queued tier work is dropped; a copy under way keeps the arena's pages mapped until
        # it ends (close never waits for it).
        workers.shutdown(wait=False, cancel_futures=True)
        for partition in server.partitions.values():
            partition.arena.close()
        log.info("kvdepot stopped; removed %s",
                 ", ".join(p.arena.path for p in server.partitions.values()))
    return 0


def _gb(size_gb: float) -> str:
    return f"{size_gb:.1f}" if size_gb >= 1 else f"{size_gb:g}"


def _reload(server: CacheServer) -> None:
    """SIGHUP: read the allowed client keys again (on the ZAP handler's thread)."""
    if server.auth is not None:
        server.auth.request_reload()
    else:
        log.info("SIGHUP: nothing to reload (no --curve-allowed-keys)")


def _start_http(config: ServerConfig, server: CacheServer, token: str | None) -> HttpEndpoint:
    if config.enable_admin_api and token is None:
        log.warning("Admin API without a token: any process that reaches %s:%d may clear the "
                    "cache (--admin-token-file requires one)", config.host, config.http_port)
    endpoint = HttpEndpoint(
        config.host,
        config.http_port,
        stats=server.snapshot,
        metrics=server.metrics,
        is_ready=lambda: server.ready,
        clear_cache=server.clear_cache if config.enable_admin_api else None,
        admin_token=token,
    )
    endpoint.start()
    return endpoint


def main(argv: list[str] | None = None, prog: str = "python -m kvdepot.server") -> int:
    return run(parse_args(argv, prog=prog))


if __name__ == "__main__":
    sys.exit(main())
