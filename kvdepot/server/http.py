"""The operator's HTTP endpoint: health, readiness, Prometheus metrics, stats, admin.

GET  /healthz      200 "ok" while the process serves HTTP at all (liveness).
GET  /readyz       200 when the arena is ready to serve engines, else 503 (readiness).
GET  /metrics      Prometheus text format.
GET  /stats        JSON of ``kvdepot.protocol.ServerStats``.
POST /admin/clear  drops every unleased chunk; only when the server was started with
                   --admin-token-file or --enable-admin-api (the server then passes
                   ``clear_cache``), else 403.

Nothing but a POST under /admin/ changes any state, so the port can be scraped and probed
freely. With an admin token (``admin_token``, from --admin-token-file), every POST under /admin/
must carry it as ``Authorization: Bearer TOKEN``: none is 401, a wrong one 403, and nothing is
done; the comparison takes the same time wherever the tokens differ. No page shows key material:
/stats and /metrics hold counts and settings, never a key, a token or a password.

The standard library's ThreadingHTTPServer is enough: a scrape every few seconds and a probe or
two is all the traffic, and it keeps the server free of a web framework. Handlers run on their
own threads, never on the RPC thread; ``stats``, ``is_ready`` and ``clear_cache`` must therefore
be safe to call from another thread.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import msgspec

from kvdepot import __version__
from kvdepot.protocol import ServerStats
from kvdepot.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# A client that opens a connection and sends nothing must not hold a handler thread forever.
REQUEST_TIMEOUT_S = 10.0
# The admin POST takes no body; anything larger than this is not ours.
MAX_BODY_BYTES = 64 << 10

ADMIN_DISABLED_MESSAGE = (
    "the admin API is disabled; start the server with --admin-token-file (or, on a loopback "
    "host, --enable-admin-api) to allow POST /admin/clear"
)
# A token shorter than this is guessable: refused at start.
MIN_TOKEN_CHARS = 16
_COMPLAINT_WINDOW_S = 60.0


def load_admin_token(path: str) -> str:
    """The bearer token in the first line of ``path`` (surrounding spaces dropped).

    Raises ValueError, naming the file but never its content, when it cannot be read or the
    token is shorter than MIN_TOKEN_CHARS or holds characters a header cannot carry."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--admin-token-file: cannot read {path}: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"--admin-token-file {path}: the token (first line) must be at least "
                         f"{MIN_TOKEN_CHARS} characters, e.g. from `openssl rand -hex 32`")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"--admin-token-file {path}: the token must be printable ASCII "
                         "without spaces")
    return token


class _Response:
    """What a route answers: status, body and content type (headers are added on send)."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}

    @classmethod
    def text(cls, status: HTTPStatus, text: str, **headers: str) -> _Response:
        return cls(status, (text + "\n").encode(), headers=headers)

    @classmethod
    def json(cls, status: HTTPStatus, payload: object) -> _Response:
        return cls(status, json.dumps(payload).encode() + b"\n", "application/json")


class HttpEndpoint:
    """Serves the operator endpoints on a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        stats: Callable[[], ServerStats],
        metrics: ServerMetrics,
        is_ready: Callable[[], bool],
        clear_cache: Callable[[], int] | None = None,
        admin_token: str | None = None,
    ) -> None:
        """``clear_cache``: None keeps the admin API off; ``admin_token``: None lets any
        caller use it (a server on a loopback host only)."""
        self._address = (host, port)
        self._stats = stats
        self._metrics = metrics
        self._is_ready = is_ready
        self._clear_cache = clear_cache
        self._admin_token = None if admin_token is None else admin_token.encode()
        self._refusals = (float("-inf"), 0)  # (last logged, held back since)
        self._server: _EndpointServer | None = None
        self._thread: threading.Thread | None = None
        # (method, path) -> route; a path known under another method answers 405, not 404.
        self._routes: dict[tuple[str, str], Callable[[], _Response]] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics_page,
            ("GET", "/stats"): self._stats_page,
            ("POST", "/admin/clear"): self._admin_clear,
        }

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind (raises OSError if the port is taken) and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("HttpEndpoint already started")
        self._server = _EndpointServer(self._address, _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="kvdepot-http",
            daemon=True,
        )
        self._thread.start()
        logger.info("HTTP endpoint on http://%s:%d (healthz, readyz, metrics, stats)", *self.address)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            return self._address
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0)."""
        return self.address[1]

    # --- dispatch ---------------------------------------------------------------------------

    def respond(
        self, method: str, raw_path: str, authorization: str | None = None, client: str = ""
    ) -> _Response:
        """The answer to ``method raw_path``; ``authorization``: the request's Authorization
        header, ``client``: its address (for the log)."""
        path = urlsplit(raw_path).path.rstrip("/") or "/"
        if method not in ("GET", "HEAD") and path.startswith("/admin/"):
            refused = self._check_token(authorization, client)
            if refused is not None:
                return refused
        route = self._routes.get((method, path))
        if route is not None:
            return route()
        allowed = sorted(m for (m, p) in self._routes if p == path)
        if allowed:
            return _Response.text(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} not allowed on {path}; use {', '.join(allowed)}",
                Allow=", ".join(allowed),
            )
        return _Response.text(
            HTTPStatus.NOT_FOUND,
            f"no such endpoint {path}; try /healthz /readyz /metrics /stats",
        )

    def _check_token(self, authorization: str | None, client: str) -> _Response | None:
        """None when the request may change state, else the refusal (401 without a bearer
        token, 403 with a wrong one)."""
        if self._admin_token is None or self._clear_cache is None:
            return None
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            self._log_refusal(client, "no bearer token")
            return _Response.text(
                HTTPStatus.UNAUTHORIZED,
                "the admin API needs the token of --admin-token-file: "
                "send 'Authorization: Bearer TOKEN'",
                **{"WWW-Authenticate": 'Bearer realm="kvdepot admin"'},
            )
        # compare_digest: the time taken does not tell how much of a guess was right.
        if not hmac.compare_digest(given.strip().encode(), self._admin_token):
            self._log_refusal(client, "a wrong token")
            return _Response.text(HTTPStatus.FORBIDDEN, "wrong admin token")
        return None

    def _log_refusal(self, client: str, what: str) -> None:
        """One line a minute, with the count held back (handler threads race on the count:
        it is a hint for the operator, never a limit)."""
        now = time.monotonic()
        logged_at, held_back = self._refusals
        if now - logged_at < _COMPLAINT_WINDOW_S:
            self._refusals = (logged_at, held_back + 1)
            return
        more = f" ({held_back} more since the last report)" if held_back else ""
        logger.warning("admin API: refused a request from %s with %s%s", client or "?", what, more)
        self._refusals = (now, 0)

    # --- routes -----------------------------------------------------------------------------

    def _healthz(self) -> _Response:
        return _Response.text(HTTPStatus.OK, "ok")

    def _readyz(self) -> _Response:
        try:
            ready = bool(self._is_ready())
        except Exception:  # a readiness check that fails is a "not ready", not a 500
            logger.exception("readiness check failed")
            ready = False
        if ready:
            return _Response.text(HTTPStatus.OK, "ready")
        return _Response.text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready")

    def _metrics_page(self) -> _Response:
        try:
            self._metrics.update_from_stats(self._stats())
        except Exception:
            # Still serve the event metrics: a scrape with stale gauges beats a failed scrape.
            logger.exception("could not refresh the metrics from the server stats")
        return _Response(HTTPStatus.OK, self._metrics.render(), self._metrics.content_type)

    def _stats_page(self) -> _Response:
        body = msgspec.json.encode(self._stats()) + b"\n"
        return _Response(HTTPStatus.OK, body, "application/json")

    def _admin_clear(self) -> _Response:
        if self._clear_cache is None:
            return _Response.text(HTTPStatus.FORBIDDEN, ADMIN_DISABLED_MESSAGE)
        cleared = int(self._clear_cache())
        logger.warning("admin API: cache cleared (%d chunks dropped)", cleared)
        return _Response.json(HTTPStatus.OK, {"cleared_chunks": cleared})


class _EndpointServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung scraper must not keep the process alive at exit
    allow_reuse_address = True  # restart on the same port while old sockets sit in TIME_WAIT

    def __init__(self, address: tuple[str, int], handler: type, endpoint: HttpEndpoint) -> None:
        self.endpoint = endpoint
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 (stdlib signature)
        # The default prints a traceback to stderr for every reset connection.
        logger.debug("HTTP connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _EndpointServer
    server_version = f"kvdepot/{__version__}"
    sys_version = ""  # do not advertise the Python version
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("GET", send_body=False)

    def do_POST(self) -> None:
        self._serve_with_body("POST")

    # Other methods get the same 405/404 answers as everything else, not the stdlib's 501.
    def do_PUT(self) -> None:
        self._serve_with_body("PUT")

    def do_PATCH(self) -> None:
        self._serve_with_body("PATCH")

    def do_DELETE(self) -> None:
        self._serve_with_body("DELETE")

    def _serve_with_body(self, method: str) -> None:
        if self._discard_body():
            self._serve(method)

    def _discard_body(self) -> bool:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send(_Response.text(HTTPStatus.BAD_REQUEST, "bad or oversized request body"))
            return False
        if length:
            self.rfile.read(length)
        return True

    def _serve(self, method: str, send_body: bool = True) -> None:
        try:
            response = self.server.endpoint.respond(
                method, self.path, self.headers.get("Authorization"), self.client_address[0]
            )
        except Exception:
            # Never let a handler error take down the thread or leave the client hanging.
            logger.exception("HTTP %s %s failed", method, self.path)
            response = _Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        self._send(response, send_body)

    def _send(self, response: _Response, send_body: bool = True) -> None:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("HTTP client went away before the answer to %s", self.path)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        # Probes and scrapes arrive every few seconds: access lines stay at debug.
        logger.debug("%s - " + format, self.address_string(), *args)
