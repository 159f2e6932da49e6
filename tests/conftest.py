"""Shared fixtures: a real server process and real clients over TCP loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_process import ServerProcess  # noqa: E402

from kvdepot.client import KVDepotClient  # noqa: E402
from kvdepot.protocol import KVGeometry  # noqa: E402


def small_geometry(layers: int = 2, heads: int = 2, head_dim: int = 16, block: int = 16) -> KVGeometry:
    piece = block * heads * 2 * head_dim * 2  # bf16, K and V side by side
    return KVGeometry(
        num_layers=layers, num_kv_heads=heads, head_size_k=head_dim, head_size_v=head_dim,
        dtype="bfloat16", block_size=block, num_planes=layers, piece_bytes=piece,
        layout=f"layer_major:{layers}x{piece}:test",
    )


@pytest.fixture
def server(tmp_path):
    with ServerProcess(log_path=tmp_path / "server.log") as srv:
        yield srv


@pytest.fixture
def make_client(server):
    clients: list[KVDepotClient] = []

    def make(**kwargs) -> KVDepotClient:
        kwargs.setdefault("timeout_ms", 2000)
        client = KVDepotClient("127.0.0.1", server.port, **kwargs)
        assert client.connect(), server.log()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
