"""Stand-ins for the server's stats, for unit tests of the HTTP endpoint, metrics and status.

Only the unit tests use these; the end-to-end tests (tests/ops_server.py) run the real server.
"""

from __future__ import annotations

from typing import Any

from kvdepot.protocol import ServerStats, TierStats


def fake_stats(**overrides: Any) -> ServerStats:
    """A plausible ServerStats; every figure distinct so a mix-up shows in an assertion."""
    fields: dict[str, Any] = dict(
        version="0.1.0",
        boot_id="boot-1234",
        uptime_s=3725.5,
        ready=True,
        arena_bytes=5_000_000_000,
        used_bytes=1_250_000_000,
        free_bytes=3_750_000_000,
        chunk_tokens=256,
        chunks=312,
        namespaces=2,
        engines_connected=3,
        leases_held=4,
        reservations_open=1,
        lookups=1024,
        hit_chunks=640,
        miss_chunks=384,
        hit_tokens=640 * 256,
        miss_tokens=384 * 256,
        stored_chunks=1200,
        stored_tokens=1200 * 256,
        stored_bytes=48_000_000_000,
        retrieved_chunks=700,
        retrieved_tokens=700 * 256,
        retrieved_bytes=28_000_000_000,
        evicted_chunks=888,
        expired_leases=5,
        expired_reservations=6,
        errors={"BAD_FRAME": 2, "NO_SPACE": 0},
    )
    fields.update(overrides)
    return ServerStats(**fields)


def fake_tier(**overrides: Any) -> TierStats:
    """A plausible disk tier's TierStats; every figure distinct."""
    fields: dict[str, Any] = dict(
        name="disk", settings={"path": "/var/cache/kvdepot", "write_policy": "write-back"},
        capacity_bytes=100_000_000_000, used_bytes=42_000_000_000, files=1001, waiting_files=7,
        copies_in_flight=3, queue_depth=16, writes=2002, written_bytes=80_000_000_000,
        reads=903, read_bytes=36_000_000_000, checksum_failures=1, bad_files=2,
        temp_files_removed=4, write_errors=5, read_errors=6, dropped_writes=8, not_admitted=9,
        prefetch_started=910, prefetch_landed=900, prefetch_timeouts=11, prefetch_skipped=12,
        read_bytes_per_s=1.2e9, last_error="",
    )
    fields.update(overrides)
    return TierStats(**fields)
