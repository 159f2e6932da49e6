"""The connector's settings (kvdepot.connector.settings), read from vLLM's
``kv_connector_extra_config``.

Every key is optional. Users of LMCache's multi-process mode may keep ``lmcache.mp.host`` and
``lmcache.mp.port``: they are read as aliases of ``kvdepot.host`` / ``kvdepot.port`` so that
switching servers is a change of the connector name only. Environment variables
(``KVDEPOT_HOST``, ``KVDEPOT_PORT``) come last, for deployments that template vLLM's flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kvdepot.connector.settings import ConnectorSettings, curve_key_paths

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
        pending_wait_ms=float(_get(extra, "pending_wait_ms", d.pending_wait_ms)),
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
        **curve_key_paths(extra),
    )
