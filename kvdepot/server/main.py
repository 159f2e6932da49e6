"""Wiring: build the arena, the core, the RPC loop and the HTTP endpoint, and run them."""

from __future__ import annotations

import grp
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import zmq

from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.arena import SharedArena
from kvdepot.server.auth import CurveAuthenticator
from kvdepot.server.cache import CacheCore, CacheObserver
from kvdepot.server.config import ServerConfig, is_loopback, parse_args
from kvdepot.server.http import HttpEndpoint, load_admin_token
from kvdepot.server.metrics import ServerMetrics
from kvdepot.server.policies import policy_factory
from kvdepot.server.rpc import CacheServer
from kvdepot.server.tiers import Tier
from kvdepot.server.tiers.resp import RemoteClient, RemoteSettings
from kvdepot.server.tiers.disk import DiskTier
from kvdepot.server.tiers.remote import RemoteTier

log = logging.getLogger("kvdepot.server")


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


def build_disk_tier(config: ServerConfig) -> DiskTier | None:
    """The disk tier the flags ask for (None without --disk-path); ValueError when its
    directory cannot be used."""
    if config.disk_path is None:
        return None
    disk = DiskTier(
        config.disk_path, config.disk_bytes, queue_depth=config.disk_queue_depth,
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
        disk.root, _gb(config.disk_size_gb), config.disk_write_policy,
        f", admitted after {config.disk_admit_hits} hits" if config.disk_admit_hits else "",
        "on" if disk.direct else "off", disk.spec.read_bytes_per_s / 1e9,
    )
    return disk


def build_remote_tier(config: ServerConfig, threads: int) -> RemoteTier | None:
    """The remote tier the flags ask for (None without --remote); connected by ``start``.
    ``threads``: the worker pool's, which may all copy to one node at once."""
    if not config.remote_urls:
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
        known_bytes=8 * config.buffer_bytes,
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


def build_server(config: ServerConfig) -> tuple[CacheServer, SharedArena, ThreadPoolExecutor]:
    auth = build_authenticator(config)  # first: a bad key file costs no segment
    group = grp.getgrnam(config.shm_group).gr_gid if config.shm_group else None
    arena = SharedArena(config.shm_name, config.buffer_bytes, mode=config.shm_mode, group=group)
    threads = config.max_workers
    if config.remote_urls:
        # Remote copies wait on the network, not on this CPU: several in flight keep the
        # cluster's shards busy (each shard's calls go over their own connections).
        threads = max(threads, min(config.remote_queue_depth, 8))
    workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvdepot-worker")
    disk = remote = None
    try:
        disk = build_disk_tier(config)
        remote = build_remote_tier(config, threads)
        tiers: dict[str, Tier] = {t.spec.name: t for t in (disk, remote) if t is not None}
        metrics = ServerMetrics(lookup_totals_from_stats=True)
        core = CacheCore(
            SlabAllocator(config.buffer_bytes, config.slab_bytes),
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
        server = CacheServer(
            core,
            arena,
            host=config.host,
            port=config.port,
            heartbeat_s=config.heartbeat_s,
            session_timeout_s=config.session_timeout_s,
            metrics=metrics,
            executor=workers,
            tiers=tiers or None,
            auth=auth,
        )
        if remote is not None:
            remote.start()  # a cluster that cannot be reached is logged, and tried again
    except BaseException:
        if auth is not None:
            auth.stop()
        workers.shutdown(wait=False)
        if disk is not None:
            disk.close()
        if remote is not None:
            remote.close()
        arena.close()
        raise
    log.info("Eviction policy: %s", config.eviction_policy)
    arena.touch_pages(workers)
    return server, arena, workers


def run(config: ServerConfig) -> int:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        token = load_admin_token(config.admin_token_file) if config.admin_token_file else None
        server, arena, workers = build_server(config)
    except (OSError, ValueError, KeyError, zmq.ZMQError) as exc:
        log.error("Cannot start: %s", exc)
        return 1
    http = None
    try:
        if config.http_port >= 0:
            http = _start_http(config, server, arena, token)
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
        arena.close()
        log.info("kvdepot stopped; removed %s", arena.path)
    return 0


def _gb(size_gb: float) -> str:
    return f"{size_gb:.1f}" if size_gb >= 1 else f"{size_gb:g}"


def _reload(server: CacheServer) -> None:
    """SIGHUP: read the allowed client keys again (on the ZAP handler's thread)."""
    if server.auth is not None:
        server.auth.request_reload()
    else:
        log.info("SIGHUP: nothing to reload (no --curve-allowed-keys)")


def _start_http(
    config: ServerConfig, server: CacheServer, arena: SharedArena, token: str | None
) -> HttpEndpoint:
    if config.enable_admin_api and token is None:
        log.warning("Admin API without a token: any process that reaches %s:%d may clear the "
                    "cache (--admin-token-file requires one)", config.host, config.http_port)
    endpoint = HttpEndpoint(
        config.host,
        config.http_port,
        stats=server.snapshot,
        metrics=server.metrics,
        is_ready=lambda: arena.ready,
        clear_cache=server.clear_cache if config.enable_admin_api else None,
        admin_token=token,
    )
    endpoint.start()
    return endpoint


def main(argv: list[str] | None = None, prog: str = "python -m kvdepot.server") -> int:
    return run(parse_args(argv, prog=prog))


if __name__ == "__main__":
    sys.exit(main())
