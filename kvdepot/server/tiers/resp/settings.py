"""The remote tier client's errors, settings and per-node statistics (the client: client.py).

Everything here is plain data checked at construction: a bad URL, timeout or TLS file raises
ValueError naming the field, before any connection is tried.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class RemoteError(Exception):
    """A remote call failed; the message names the node (``redis://host:port``) and why."""


class RemoteUnavailable(RemoteError):
    """The node is down, refused the connection, or is in backoff after a failure: the call
    failed fast without waiting for its deadline."""


class RemoteTimeout(RemoteError):
    """The call's deadline passed; the connection it used was closed (its replies are
    unknown, and a ``Call.into`` view may hold part of a value)."""


class RemoteAuthError(RemoteError):
    """Credentials or TLS refused: WRONGPASS, NOAUTH, NOPERM, a failed TLS handshake, or TLS
    on one side only (the message says which is likely)."""


@dataclass(frozen=True)
class Endpoint:
    """A node's address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteSettings:
    """Where the remote store is and how to talk to it.

    ``urls``: seeds, ``redis://host:port`` (plain TCP) or ``rediss://host:port`` (TLS), all of
    one scheme; ``user:password@`` may be given in them (percent-encoded). Port 6379 when
    none. One seed answering is enough: the cluster's other nodes are learned from it (a
    server without cluster mode serves every slot itself).
    ``username`` / ``password``: an ACL user and its password, or a password alone (the
    ``default`` user / requirepass); they win over credentials in the URLs.
    ``ca_file``: rediss only: the CA the servers' certificates must chain to (else the
    system's CAs); certificates must name the host or IP the client connects to, including
    the IPs the cluster reports for its nodes. ``cert_file`` / ``key_file``: a client
    certificate for mutual TLS (``key_file`` may be omitted when the cert file holds it).
    ``connect_timeout_s``: seconds for TCP connect + TLS handshake + AUTH of one connection.
    ``pool_size``: connections per node at most. ``backoff_min_s`` / ``backoff_max_s``: a
    node that failed is not tried again before this many seconds, doubling per failure in a
    row (with jitter) up to the maximum; a successful connection resets it.
    Raises ValueError for anything malformed.
    """

    urls: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout_s: float = 1.0
    pool_size: int = 4
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0

    def __post_init__(self):
        if isinstance(self.urls, str) or not self.urls:
            raise ValueError("urls must be a non-empty tuple of redis:// or rediss:// URLs")
        object.__setattr__(self, "urls", tuple(self.urls))
        parsed = [_parse_url(url) for url in self.urls]
        if len({tls for tls, *_ in parsed}) > 1:
            raise ValueError("urls mix redis:// and rediss://: use one scheme for every node")
        if len({(user, password) for _t, _e, user, password in parsed if password is not None}) > 1:
            raise ValueError("urls carry different credentials: give one user and password")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0 seconds, got {self.connect_timeout_s}")
        if not (isinstance(self.pool_size, int) and self.pool_size >= 1):
            raise ValueError(f"pool_size must be an int >= 1, got {self.pool_size!r}")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("backoff must satisfy 0 < backoff_min_s <= backoff_max_s (seconds), "
                             f"got {self.backoff_min_s} and {self.backoff_max_s}")
        if self.username is not None and self.credentials()[1] is None:
            raise ValueError("username given without a password (in the settings or the URLs)")
        if (self.ca_file or self.cert_file or self.key_file) and not self.tls:
            raise ValueError("ca_file / cert_file / key_file need rediss:// URLs")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file given without cert_file")

    @property
    def tls(self) -> bool:
        return _parse_url(self.urls[0])[0]

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    def seeds(self) -> list[Endpoint]:
        return list(dict.fromkeys(endpoint for _t, endpoint, _u, _p in map(_parse_url, self.urls)))

    def credentials(self) -> tuple[str | None, str | None]:
        """(username or None, password or None): the settings' own, else the URLs'."""
        if self.password is not None:
            return self.username, self.password
        for _t, _e, user, password in map(_parse_url, self.urls):
            if password is not None:
                return self.username or user, password
        return self.username, None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client's TLS context (None for redis://). Raises ValueError naming a TLS file
        that cannot be read."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca_file {self.ca_file}: {exc}") from exc
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cert_file {self.cert_file} / key_file {self.key_file}: {exc}") from exc
        return context


def _parse_url(url: str) -> tuple[bool, Endpoint, str | None, str | None]:
    """(TLS, endpoint, username, password) of a redis:// or rediss:// URL."""
    if not isinstance(url, str):
        raise ValueError(f"a URL must be a str, got {type(url).__name__}")
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # never the password
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"URL {shown}: the scheme must be redis:// or rediss://")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"URL {shown}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"URL {shown}: no host")
    if parts.path not in ("", "/", "/0") or parts.query or parts.fragment:
        raise ValueError(f"URL {shown}: only database 0 and no options are supported")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.scheme == "rediss", Endpoint(parts.hostname, port), user, password


@dataclass(frozen=True)
class NodeStats:
    """One node as the client knows it (``RemoteClient.nodes()``).

    ``role``: "master" (serves the slots the last topology gave it), "replica" (never used
    for calls) or "unknown" (not in the last topology read). ``connected``: a pooled
    connection is open or the node is not in backoff. ``calls``: commands sent;
    ``round_trips``: pipelines; ``errors``: failed connects and exchanges (timeouts
    included); ``backoff_until``: ``time.monotonic()`` seconds before which the node is not
    tried, None when not in backoff.
    """

    address: str
    role: str
    connected: bool
    open_connections: int
    bytes_sent: int
    bytes_received: int
    calls: int
    round_trips: int
    errors: int
    last_error: str | None
    backoff_until: float | None
