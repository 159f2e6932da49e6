"""A real kvdepot server process for the operations tests, and small HTTP helpers around it.

The server is started exactly as an operator starts it (python -m kvdepot.server with flags,
through tests/server_process.py), on free ports and a shared-memory segment of its own, and is
driven by the real client.
"""

from __future__ import annotations

import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

from kvdepot.client import KVDepotClient
from kvdepot.protocol import KVGeometry, ServerStats
from server_process import ServerProcess  # the launcher the other server tests use

REPO_ROOT = Path(__file__).resolve().parent.parent

# A tiny model's share of one chunk: 2 layers x (K, V) planes of 16-token blocks, 2 KV heads
# of 64 dims in bf16: 4 planes x 4 KiB x 16 blocks = 256 KiB per 256-token chunk.
TINY_GEOMETRY = KVGeometry(
    num_layers=2,
    num_kv_heads=2,
    head_size_k=64,
    head_size_v=64,
    dtype="bfloat16",
    block_size=16,
    num_planes=4,
    piece_bytes=16 * 2 * 64 * 2,
    layout="layer_major",
)


def http(method: str, url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; HTTP errors are answers here, not exceptions."""
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class OpsServer(ServerProcess):
    """The server as tests/server_process.py starts it, plus readiness and /stats helpers."""

    def __init__(self, *extra_args: str, cpu_buffer_gb: float = 0.05) -> None:
        log_dir = Path(tempfile.mkdtemp(prefix="kvdepot-ops-"))
        super().__init__(buffer_gb=cpu_buffer_gb, extra=list(extra_args), log_path=log_dir / "server.log")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> OpsServer:
        super().start(timeout)  # returns at the start line
        deadline = time.monotonic() + timeout
        while http("GET", self.base_url + "/readyz")[0] != 200:
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"/readyz not 200 after {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> int | None:
        returncode = super().stop()
        segment = Path("/dev/shm") / self.shm_name
        if segment.exists():  # only after a crash: a clean stop removes it itself
            segment.unlink()
        return returncode

    def client(self, engine_id: str = "ops-test") -> KVDepotClient:
        client = KVDepotClient(host="127.0.0.1", port=self.port, engine_id=engine_id, timeout_ms=5000)
        assert client.connect(), self.log()
        return client

    # --- /stats as the HTTP thread serves it ------------------------------------------------

    def stats(self) -> ServerStats:
        status, _, body = http("GET", self.base_url + "/stats")
        assert status == 200, body
        return msgspec.json.decode(body, type=ServerStats)

    def settled_stats(self, timeout: float = 5.0) -> ServerStats:
        """/stats once it stopped moving: the server publishes a snapshot every ~0.1 s, so
        right after a client call /stats may not show it yet."""
        previous = _without_clock(self.stats())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.25)
            current = self.stats()
            if _without_clock(current) == previous:
                return current
            previous = _without_clock(current)
        raise TimeoutError("/stats kept changing")


def _without_clock(stats: ServerStats) -> dict:
    fields = msgspec.structs.asdict(stats)
    fields.pop("uptime_s")
    return fields


def store_chunks(client: KVDepotClient, ns, keys: list[bytes], fill: int | None = None) -> int:
    """Reserve, (optionally) write every reserved slot with ``fill``, commit; chunks committed."""
    reservation = client.reserve(ns, 0, keys)
    if fill is not None:
        arena = client.arena(reservation.epoch)
        for offset in reservation.offsets:
            if offset >= 0:
                arena.slot(offset, ns.slot_bytes)[:] = fill
    return client.commit(reservation.id) if reservation.id else 0
