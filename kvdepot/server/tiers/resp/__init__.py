"""kvdepot's own RESP client: the remote tier's data path to a Redis/Valkey Cluster or server.

Values move straight between sockets and the arena's pages (``Call.into``, ``recv_into``;
memoryviews sent as they are), which redis-py cannot do: it reads large values at 0.1-0.3
GB/s here, this client at the raw socket's 0.6-1.6 (bench/remote_tier.py). Modules:

- wire.py: RESP2 encoding, one connection, reading replies (into a caller's view);
- client.py: ``RemoteClient``: routing by hash slot, MOVED/ASK, pipelines per node,
  deadlines, backoff, the topology refresh;
- connect.py: opening connections (TCP or TLS), AUTH, one exchange and its errors;
- nodes.py: a node's connection pool, backoff and counters; CLUSTER SLOTS and redirections;
- settings.py: ``RemoteSettings``, the errors, per-node statistics.
"""

from kvdepot.server.tiers.resp.client import RemoteClient
from kvdepot.server.tiers.resp.settings import (
    NodeStats, RemoteAuthError, RemoteError, RemoteSettings, RemoteTimeout, RemoteUnavailable,
)
from kvdepot.server.tiers.resp.wire import Call, Filled, Reply, RespErrorReply

__all__ = [
    "Call", "Filled", "NodeStats", "RemoteAuthError", "RemoteClient", "RemoteError",
    "RemoteSettings", "RemoteTimeout", "RemoteUnavailable", "Reply", "RespErrorReply",
]
