"""One half's link to the kvdepot server: connect, register the namespace, ride out outages.

Each half of a connector holds one: the scheduler's (lookups, leases) and every worker's
(loads, stores), each with a client of its own.

- Registration needs the namespace spec (model, KV geometry, world size, salt). Until it
  succeeds, the half works without the cache.
- ``connect_in_background`` makes the first attempt inline (engine start-up: one round trip,
  at most the client's deadline when the server is away), so the very first requests already
  use the cache; if it fails, a thread of the link's own retries every retry_s. ``ensure``
  is for a half with a thread of its own (a worker's I/O thread): at most one attempt per
  retry_s, each started when that thread is idle or has work.
- A session the server dropped right after the handshake (NO_SESSION) is tried once more: the
  client has just opened a new one. ``once_more_on_new_session`` does the same for any call.
- GEOMETRY_MISMATCH or BAD_REQUEST: the server answers but will not take this layout; retrying
  cannot help, so the cache stays off for this half.
- A server that refuses this engine's CURVE keys (or its lack of them) is an outage that says
  why; the attempts go on, so keys fixed on the server (allowed keys reloaded) are used without
  restarting the engine. Key files that cannot be read turn the cache off for this half.
- One line per outage when the server goes away (at ``outage_level``: the scheduler warns for
  the engine, its workers only inform), one more for a refusal, one when it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kvdepot.client import (
    AuthenticationFailed,
    KVDepotClient,
    KVDepotError,
    Namespace,
    ServerUnavailable,
)
from kvdepot.connector.logs import CONNECTOR_LOG
from kvdepot.connector.settings import ConnectorSettings
from kvdepot.connector.specs import NamespaceSpec
from kvdepot.protocol import ErrorCode

# The server refuses the namespace itself: the cache is off for good.
_REFUSALS = (int(ErrorCode.GEOMETRY_MISMATCH), int(ErrorCode.BAD_REQUEST))


class ServerLink:
    """``client`` exists from the first attempt on; ``ns`` once registered (never reset: the
    client registers again by itself on a restarted server). ``down``: in an outage.

    ``who`` prefixes every log line ("rank 1: "); ``outage_effect`` says what an outage means
    for this half. ``block_size``: when given, a server chunk that is not a whole number of
    the engine's blocks turns the cache off (the scheduler checks it for the engine: it plans
    every transfer). ``on_registered`` runs once registered, before the line that says so
    (a worker maps the server's arena there).
    """

    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        engine_id: str,
        outage_effect: str,
        who: str = "",
        outage_level: int = logging.WARNING,
        block_size: int | None = None,
        on_registered: Callable[[], None] | None = None,
        client_factory: Callable[..., KVDepotClient] = KVDepotClient,
        log: logging.Logger = CONNECTOR_LOG,
    ):
        self.settings = settings
        self.engine_id = engine_id
        self.spec: NamespaceSpec | None = None
        self.client: KVDepotClient | None = None
        self.ns: Namespace | None = None
        self.down = False
        self._why = ""  # the outage's reason logged last
        self._outage_effect = outage_effect
        self._who = who
        self._outage_level = outage_level
        self._block_size = block_size
        self._on_registered = on_registered
        self._client_factory = client_factory
        self._log = log
        self._next_attempt = 0.0  # float("inf"): refused for good
        self._closed = False

    def connect_in_background(self, spec: NamespaceSpec) -> None:
        """Register ``spec``'s namespace: the first attempt now, retries on a thread."""
        self.spec = spec
        if self.register_once() is None:
            threading.Thread(target=self._retry_loop, name="kvdepot-connect", daemon=True).start()

    def _retry_loop(self) -> None:
        while not self._closed:
            deadline = time.monotonic() + self.settings.retry_s
            while not self._closed and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._closed or self.register_once() is not None:
                return

    def ensure(self) -> bool:
        """Registered? Else one attempt, at most once per retry_s; False while the server is
        away (or refused the namespace)."""
        if self.ns is not None:
            return True
        now = time.monotonic()
        if now < self._next_attempt or self.spec is None:
            return False
        self._next_attempt = now + self.settings.retry_s
        return self.register_once() is True

    def attempt_due(self) -> bool:
        """Not registered, and ``ensure`` would attempt now."""
        return self.ns is None and time.monotonic() >= self._next_attempt

    def register_once(self) -> bool | None:
        """One attempt: True registered, False refused for good (cache off), None try later."""
        spec = self.spec
        assert spec is not None
        if self.client is None and not self._new_client():
            return False
        client, log, who = self.client, self._log, self._who
        why, refused = "not reachable", False
        try:
            ns = None
            for attempt in range(2):
                if not client.connect():
                    if isinstance(client.last_error, AuthenticationFailed):
                        why, refused = f"refused this engine ({client.last_error.message})", True
                    break
                try:
                    ns = client.register(spec.model, spec.geometry, spec.world_size, spec.salt)
                    break
                except KVDepotError as exc:
                    if attempt or exc.code != int(ErrorCode.NO_SESSION):
                        raise
            if ns is not None:
                if self._block_size and ns.chunk_tokens % self._block_size:
                    log.error(
                        "kvdepot: %sthe server's chunk size %d is not a multiple of the engine's "
                        "block size %d; the cache is off for this engine",
                        who, ns.chunk_tokens, self._block_size,
                    )
                    self._next_attempt = float("inf")
                    return False
                self.ns = ns
                self.back()
                if self._on_registered is not None:
                    self._on_registered()
                log.info(
                    "kvdepot: %sregistered at %s (namespace %s: %s, chunk %d tokens, %d B per chunk)",
                    who, self.settings.endpoint, ns.digest.hex()[:12], spec.geometry.describe(),
                    ns.chunk_tokens, ns.slot_bytes,
                )
                return True
        except KVDepotError as exc:
            if exc.code == int(ErrorCode.UNAUTHORIZED):
                # Its tenant may not use this salt or model: said once, tried again now and
                # then (a tenant file changes with a server restart).
                why, refused = f"refused this engine ({exc.message})", True
            elif exc.code in _REFUSALS:
                log.error("kvdepot: %sthe server refused this engine's KV layout (%s); cache off", who, exc)
                self._next_attempt = float("inf")
                return False
            else:
                log.debug("kvdepot: %sregister failed: %s", who, exc)
        self.away(why, refused)
        return None

    def _new_client(self) -> bool:
        """Create the client; False, with the cache off for good, when the CURVE key files
        cannot be read (they were checked when the settings were made: gone since)."""
        try:
            curve = self.settings.curve()
        except ValueError as exc:
            self._log.error("kvdepot: %s%s; the cache is off for this engine", self._who, exc)
            self._next_attempt = float("inf")
            return False
        self.client = self._client_factory(
            host=self.settings.host,
            port=self.settings.port,
            engine_id=self.engine_id,
            timeout_ms=self.settings.timeout_ms,
            **({"curve": curve} if curve is not None else {}),
        )
        return True

    def away(self, why: str, refused: bool = False) -> None:
        """The server is not answering, or ``refused`` this engine (``why``): said once per
        outage, and once more for a refusal that did not start it."""
        if not self.down or (refused and why != self._why):
            self.down = True
            self._why = why
            self._log.log(
                self._outage_level, "kvdepot: %sserver at %s %s; %s until it is back",
                self._who, self.settings.endpoint, why, self._outage_effect,
            )

    def back(self) -> None:
        """The server answered again."""
        if self.down:
            self.down = False
            self._why = ""
            self._log.info("kvdepot: %sserver at %s is back; using the cache again",
                           self._who, self.settings.endpoint)

    def close(self) -> None:
        """Stop retrying; the client says goodbye, ending the session."""
        self._closed = True
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass


def session_dropped(exc: KVDepotError) -> bool:
    """The server had dropped our session and the client has just opened a new one: not an
    outage, and nothing held before is lost but leases/reservations of the old session."""
    return isinstance(exc, ServerUnavailable) and exc.code == int(ErrorCode.NO_SESSION)


def once_more_on_new_session(call):
    """``call()``, once more if the first attempt found its session dropped."""
    try:
        return call()
    except ServerUnavailable as exc:
        if not session_dropped(exc):
            raise
        return call()
