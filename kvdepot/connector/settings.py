"""The connector's settings, one frozen value shared by every part of it.

An engine adapter builds it from its own configuration (vLLM: ``kv_connector_extra_config``,
parsed in kvdepot.integrations.vllm.config); the engine-neutral layer only reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvdepot.client import ClientCurve

DEFAULT_PORT = 5555  # the server's default (kvdepot serve --port)
CURVE_KEYS = {  # field: (kv_connector_extra_config key, environment variable)
    "curve_server_key": ("kvdepot.curve_server_key", "KVDEPOT_CURVE_SERVER_KEY"),
    "curve_client_key": ("kvdepot.curve_client_key", "KVDEPOT_CURVE_CLIENT_KEY"),
}


def _from_env(name: str) -> str | None:
    return os.environ.get(name) or None


@dataclass(frozen=True)
class ConnectorSettings:
    host: str = "localhost"
    port: int = DEFAULT_PORT
    # Deadline of every call to the server. A silent server costs at most this once; the
    # client then backs off and fails fast until it answers again.
    timeout_ms: int = 1000
    # How long the scheduler waits inline for a lookup reply before answering "ask again"
    # (None). A local round trip is ~0.1-0.3 ms, so a miss normally costs one round trip and
    # no extra scheduler step; a slow server costs a skipped step, never a stall.
    lookup_wait_ms: float = 5.0
    # How long a request may wait ("ask again") for chunks the server brings up from a lower
    # tier (disk) into the buffer. The server bounds each prefetch by its own deadline and
    # never starts one slower than recomputing; this only guards against a server that keeps
    # answering "pending".
    pending_wait_ms: float = 10_000.0
    # How long a worker waits, in a step that computes nothing, for loads in flight
    # (TransferWorker.take_finished_loads): a load that lands within it is reported in the
    # same step.
    load_wait_ms: float = 50.0
    # When a hit is loaded before its request runs: "async" (the request waits a step for the
    # copy; other requests never wait for it), "sync" (the copy is stream-ordered before the
    # request's first forward, whose launch overlaps the copy: a step and the forward's host
    # time sooner, but that step's other requests wait for the copy too), or "auto": sync when
    # no other request is known to the connector, else async.
    load_mode: str = "auto"
    # Lease on looked-up chunks, held until the load has finished; expires by itself if the
    # release is lost (crash, restart).
    lease_ms: int = 60_000
    # Store chunks of generated tokens as well as whole prompt chunks.
    store_decode: bool = False
    # Tenant salt: engines with different salts never share chunks.
    salt: str = ""
    # A name for the model in the namespace and the server's logs; engines share chunks only
    # under equal names *and* equal weights (model_identity). Default: the architecture.
    model: str | None = None
    # Which weights the namespace names (the adapter's identity module): "auto", a digest of
    # the checkpoint's configs, headers, sizes and a fixed sample of its bytes; "full", of
    # every byte; any other string: that identity as given, for copies the user knows hold
    # the same weights.
    model_identity: str = "auto"
    # The engine's policy when a load fails: kvdepot is a best-effort cache, so by default a
    # failed load is recomputed instead of failing the request (vLLM's own default is "fail").
    load_failure_policy: str = "recompute"
    # Seconds between reconnection attempts while the server is away.
    retry_s: float = 2.0
    # How long a worker waits, when the engine preempts a request, for a store still copying
    # out of its blocks before the step that may reuse them; past it the store is aborted,
    # never committed (its bytes may be another request's by then).
    preempt_wait_ms: int = 5000
    # How long shutdown waits for stores in flight before aborting the rest. vLLM gives an
    # engine-core process 5 s between SIGTERM and SIGKILL: stay under it.
    shutdown_wait_ms: int = 4000
    # CURVE, for a server that requires it: the path of the server's public certificate
    # (NAME.key) and of this engine's secret certificate (NAME.key_secret), both or neither
    # (`kvdepot keys generate`; docs/security.md). Unset: from the environment.
    curve_server_key: str | None = field(
        default_factory=lambda: _from_env("KVDEPOT_CURVE_SERVER_KEY"))
    curve_client_key: str | None = field(
        default_factory=lambda: _from_env("KVDEPOT_CURVE_CLIENT_KEY"))

    def __post_init__(self) -> None:
        """Raises ValueError when only one CURVE key is given or a key file is unusable: a
        configuration error stops the engine with the reason, never a silent cache miss."""
        self.curve()

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def curve(self) -> ClientCurve | None:
        """The client's CURVE keys, read from the files now; None without them. ValueError
        names the file and what is wrong with it."""
        server, client = self.curve_server_key, self.curve_client_key
        if server is None and client is None:
            return None
        if server is None or client is None:
            raise ValueError("kvdepot.curve_server_key and kvdepot.curve_client_key go together "
                             "(env KVDEPOT_CURVE_SERVER_KEY and KVDEPOT_CURVE_CLIENT_KEY)")
        return ClientCurve.from_files(server, client)


def curve_key_paths(extra: Mapping[str, Any]) -> dict[str, str | None]:
    """The CURVE fields of ConnectorSettings from an engine's connector configuration
    (``kvdepot.curve_server_key``, ``kvdepot.curve_client_key``), each else from the
    environment (KVDEPOT_CURVE_SERVER_KEY, KVDEPOT_CURVE_CLIENT_KEY)."""
    paths = {}
    for name, (key, env) in CURVE_KEYS.items():
        value = extra.get(key)
        paths[name] = str(value) if value not in (None, "") else _from_env(env)
    return paths
