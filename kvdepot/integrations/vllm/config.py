"""The connector's settings, read from vLLM's ``kv_connector_extra_config``.

Every key is optional. Users of LMCache's multi-process mode may keep ``lmcache.mp.host`` and
``lmcache.mp.port``: they are read as aliases of ``kvdepot.host`` / ``kvdepot.port`` so that
switching servers is a change of the connector name only. Environment variables
(``KVDEPOT_HOST``, ``KVDEPOT_PORT``) come last, for deployments that template vLLM's flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 5555  # the server's default (kvdepot serve --port)


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
    # How long a worker's get_finished waits for loads in flight (see worker_side): a load
    # that lands within it is reported in the same step.
    load_wait_ms: float = 50.0
    # When a hit is loaded before its request runs: "async" (vLLM's WAITING_FOR_REMOTE_KVS: the
    # request waits a step for the copy; other requests never wait for it), "sync" (the copy
    # is stream-ordered before the request's first forward, whose launch overlaps the copy:
    # a step and the forward's host time sooner, but that step's other requests wait for the
    # copy too), or "auto": sync when no other request is known to the connector, else async.
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
    # Which weights the namespace names (identity.py): "auto", a digest of the checkpoint's
    # configs, headers, sizes and a fixed sample of its bytes; "full", of every byte; any other
    # string: that identity as given, for copies the user knows hold the same weights.
    model_identity: str = "auto"
    # vLLM's policy when a load fails: kvdepot is a best-effort cache, so by default a failed
    # load is recomputed instead of failing the request (vLLM's own default is "fail").
    load_failure_policy: str = "recompute"
    # Seconds between reconnection attempts while the server is away.
    retry_s: float = 2.0
    # How long a worker waits, when vLLM preempts a request, for a store still copying out of
    # its blocks before the step that may reuse them; past it the store is aborted, never
    # committed (its bytes may be another request's by then).
    preempt_wait_ms: int = 5000
    # How long shutdown waits for stores in flight before aborting the rest. vLLM gives an
    # engine-core process 5 s between SIGTERM and SIGKILL: stay under it.
    shutdown_wait_ms: int = 4000

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


_ALIASES = {
    "host": ("kvdepot.host", "lmcache.mp.host"),
    "port": ("kvdepot.port", "lmcache.mp.port"),
}


def _get(extra: Mapping[str, Any], name: str, default: Any) -> Any:
    for key in _ALIASES.get(name, (f"kvdepot.{name}",)):
        if key in extra and extra[key] is not None:
            return extra[key]
    return default


LOAD_MODES = ("auto", "sync", "async")


def _load_mode(value: Any) -> str:
    mode = str(value).strip().lower()
    if mode not in LOAD_MODES:
        raise ValueError(f"kvdepot.load_mode must be one of {LOAD_MODES}, not {value!r}")
    return mode


def _model_identity(value: Any) -> str:
    identity = str(value).strip()
    if not identity:
        raise ValueError("kvdepot.model_identity must be 'auto', 'full' or a non-empty identity")
    return identity.lower() if identity.lower() in ("auto", "full") else identity


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _host(value: Any) -> str:
    host = str(value).strip()
    # LMCache's key takes a ZMQ-style "tcp://host"; ours takes the bare host. Accept both.
    for prefix in ("tcp://", "zmq://"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    if host.count(":") == 1 and not host.startswith("["):  # "host:port" given as the host
        host = host.split(":", 1)[0]
    return host or "localhost"


def settings_from_extra_config(extra: Mapping[str, Any] | None) -> ConnectorSettings:
    extra = dict(extra or {})
    d = ConnectorSettings()
    host = _get(extra, "host", os.environ.get("KVDEPOT_HOST", d.host))
    port = _get(extra, "port", os.environ.get("KVDEPOT_PORT", d.port))
    policy = str(_get(extra, "load_failure_policy", d.load_failure_policy))
    if policy not in ("recompute", "fail"):
        raise ValueError(f"kvdepot.load_failure_policy must be 'recompute' or 'fail', not {policy!r}")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"kvdepot.port must be an integer, not {port!r}") from None
    model = _get(extra, "model", None)
    return ConnectorSettings(
        host=_host(host),
        port=port,
        timeout_ms=int(_get(extra, "timeout_ms", d.timeout_ms)),
        lookup_wait_ms=float(_get(extra, "lookup_wait_ms", d.lookup_wait_ms)),
        load_wait_ms=float(_get(extra, "load_wait_ms", d.load_wait_ms)),
        lease_ms=int(_get(extra, "lease_ms", d.lease_ms)),
        load_mode=_load_mode(_get(extra, "load_mode", d.load_mode)),
        store_decode=_bool(_get(extra, "store_decode", d.store_decode)),
        salt=str(_get(extra, "salt", d.salt)),
        model=None if model is None else str(model),
        model_identity=_model_identity(_get(extra, "model_identity", d.model_identity)),
        load_failure_policy=policy,
        retry_s=float(_get(extra, "retry_s", d.retry_s)),
        preempt_wait_ms=int(_get(extra, "preempt_wait_ms", d.preempt_wait_ms)),
        shutdown_wait_ms=int(_get(extra, "shutdown_wait_ms", d.shutdown_wait_ms)),
    )
