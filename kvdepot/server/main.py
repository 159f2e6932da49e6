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


def build_server(config: ServerConfig) -> tuple[CacheServer, SharedArena, ThreadPoolExecutor]:
    group = grp.getgrnam(config.shm_group).gr_gid if config.shm_group else None
    arena = SharedArena(config.shm_name, config.buffer_bytes, mode=config.shm_mode, group=group)
    workers = ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="kvdepot-worker")
    try:
        metrics = ServerMetrics(lookup_totals_from_stats=True)
        core = CacheCore(
            SlabAllocator(config.buffer_bytes, config.slab_bytes),
            config.chunk_size,
            lease_ttl_s=config.lease_ttl_s,
            reservation_ttl_s=config.reservation_ttl_s,
            policy_factory=policy_factory(config.eviction_policy),
            observer=LoggingObserver(metrics),
        )
        server = CacheServer(
            core,
            arena,
            host=config.host,
            port=config.port,
            heartbeat_s=config.heartbeat_s,
            session_timeout_s=config.session_timeout_s,
            metrics=metrics,
            executor=workers,
        )
    except BaseException:
        workers.shutdown(wait=False)
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
