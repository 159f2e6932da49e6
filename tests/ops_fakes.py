"""Stand-ins for the server's stats, for unit tests of the HTTP endpoint, metrics and status.

Only the unit tests use these; the end-to-end tests (tests/ops_server.py) run the real server.
"""

from __future__ import annotations

from typing import Any

from kvdepot.protocol import ServerStats


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
