"""Wiring: build the arena, the core, the RPC loop and the HTTP endpoint, and run them."""

from __future__ import annotations

import grp
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.arena import SharedArena
from kvdepot.server.cache import CacheCore, CacheObserver
from kvdepot.server.config import ServerConfig, parse_args
from kvdepot.server.http import HttpEndpoint
from kvdepot.server.metrics import ServerMetrics
from kvdepot.server.policies import policy_factory
from kvdepot.server.rpc import CacheServer
from kvdepot.server.tiers.disk import DiskTier

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


def build_server(config: ServerConfig) -> tuple[CacheServer, SharedArena, ThreadPoolExecutor]:
    group = grp.getgrnam(config.shm_group).gr_gid if config.shm_group else None
    arena = SharedArena(config.shm_name, config.buffer_bytes, mode=config.shm_mode, group=group)
    workers = ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="kvdepot-worker")
    disk = None
    try:
        disk = build_disk_tier(config)
        metrics = ServerMetrics(lookup_totals_from_stats=True)
        core = CacheCore(
            SlabAllocator(config.buffer_bytes, config.slab_bytes),
            config.chunk_size,
            lease_ttl_s=config.lease_ttl_s,
            reservation_ttl_s=config.reservation_ttl_s,
            policy_factory=policy_factory(config.eviction_policy),
            observer=LoggingObserver(metrics),
            tiers=[disk.spec] if disk is not None else (),
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
            tiers={disk.spec.name: disk} if disk is not None else None,
        )
    except BaseException:
        workers.shutdown(wait=False)
        if disk is not None:
            disk.close()
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
        server, arena, workers = build_server(config)
    except (OSError, ValueError, KeyError) as exc:
        log.error("Cannot start: %s", exc)
        return 1
    http = None
    try:
        if config.http_port >= 0:
            http = _start_http(config, server, arena)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        print(
            f"kvdepot cache server is running on tcp://{config.host}:{server.port} "
            f"(buffer {_gb(config.cpu_buffer_size_gb)} GB, chunk {config.chunk_size} tokens)"
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


def _start_http(config: ServerConfig, server: CacheServer, arena: SharedArena) -> HttpEndpoint:
    endpoint = HttpEndpoint(
        config.host,
        config.http_port,
        stats=server.snapshot,
        metrics=server.metrics,
        is_ready=lambda: arena.ready,
        clear_cache=server.clear_cache if config.enable_admin_api else None,
    )
    endpoint.start()
    return endpoint


def main(argv: list[str] | None = None, prog: str = "python -m kvdepot.server") -> int:
    return run(parse_args(argv, prog=prog))


if __name__ == "__main__":
    sys.exit(main())
