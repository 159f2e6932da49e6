"""Who may use the control port: ZMQ CURVE with a ZAP handler of the server's own.

CURVE encrypts every connection and proves the server's identity to the client (the client
knows the server's public key) and the client's to the server (its public key, checked here
against the allowed keys). Keys are in ZeroMQ's certificate format, as
``zmq.auth.create_certificates`` (and ``kvdepot keys generate``) writes them: ``NAME.key``
holds a public key, ``NAME.key_secret`` the key pair.

libzmq asks the ZAP handler (a REP socket at ``inproc://zeromq.zap.01`` in the server's ZMQ
context) about every CURVE handshake. This one answers from an in-memory set of allowed keys,
so a handshake costs no file access, and sets the ZAP reply's user id to the client's public
key (Z85, 40 characters): every message of the connection then carries it as the property
"User-Id", which the RPC loop stores in the session it creates (``Session.client_key``).

The allowed keys are reloaded when the server gets SIGHUP (``request_reload``) and when the
directory's certificates change (checked every ``RESCAN_S``: a Kubernetes Secret volume
updates itself this way). A reload that fails (a malformed certificate, an unreadable
directory) changes nothing and says why; keys that a reload removes lose their sessions at once
(``on_revoked``), and their connections can open no new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger("kvdepot.server")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_DOMAIN = b"kvdepot"
RESCAN_S = 1.0
_POLL_MS = 200  # how soon a stop or a SIGHUP is noticed while no handshake arrives
_COMPLAINT_WINDOW_S = 60.0


def _decode_key(text: bytes, what: str) -> bytes:
    """A Z85 key of 40 characters, as bytes; ValueError naming ``what`` otherwise."""
    if len(text) != 40:
        raise ValueError(f"{what}: a CURVE key is 40 Z85 characters, not {len(text)}")
    try:
        z85.decode(text)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{what}: not a Z85-encoded key") from None
    return text


def read_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a certificate file; secret is None in a public one.

    Raises ValueError with the path and the reason: no such file, no or a malformed key, or a
    secret key whose public key is not the one written beside it."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE certificate {path}: {exc}") from None
    _decode_key(public, f"{path}: public key")
    if secret is not None:
        _decode_key(secret, f"{path}: secret key")
        if zmq.curve_public(secret) != public:
            raise ValueError(f"{path}: the secret key does not belong to the public key beside it")
    return public, secret


def load_secret_certificate(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a secret certificate (``NAME.key_secret``); ValueError as
    ``read_certificate``, or for a public certificate."""
    public, secret = read_certificate(path)
    if secret is None:
        raise ValueError(
            f"{path} is a public certificate; give the secret one (NAME.key_secret, written by "
            "`kvdepot keys generate`)"
        )
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key of a certificate file (public or secret); ValueError otherwise."""
    return read_certificate(path)[0]


def load_allowed_keys(directory: str | os.PathLike) -> dict[bytes, str]:
    """Every ``*.key`` public certificate in ``directory``: Z85 public key -> certificate name.

    Raises ValueError when the directory cannot be listed or any certificate cannot be read
    (all or nothing: a reload never half-applies). Secret certificates found there are named
    in a warning and not loaded: only public keys belong in this directory."""
    root = Path(directory)
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise ValueError(f"cannot list the allowed client keys in {root}: {exc}") from None
    keys: dict[bytes, str] = {}
    for name in names:
        if name.endswith(".key_secret"):
            log.warning("%s holds a secret key: only public certificates (*.key) belong in the "
                        "allowed client keys; it is not loaded", root / name)
        elif name.endswith(".key") and not name.startswith("."):
            keys[load_public_key(root / name)] = name[: -len(".key")]
    return keys


def _directory_state(directory: Path) -> tuple:
    """What changes when a certificate is added, removed, replaced or rewritten (the files are
    followed through symlinks, as a Kubernetes Secret volume's are)."""
    state = []
    try:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.endswith(".key"):
                st = os.stat(entry.path)
                state.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError as exc:
        return ("unreadable", str(exc))
    return tuple(state)


class CurveAuthenticator:
    """The server's key pair and the allowed client keys, and the ZAP handler thread.

    Built from the files (ValueError with a clear message when any is unusable); ``start``
    binds the handler in the server's ZMQ context, ``secure`` makes a socket a CURVE server
    that asks it, ``stop`` ends the thread (before the context is terminated).
    """

    def __init__(self, secret_certificate: str | os.PathLike, allowed_keys: str | os.PathLike):
        self.public_key, self._secret_key = load_secret_certificate(secret_certificate)
        self.allowed_dir = Path(allowed_keys)
        if not self.allowed_dir.is_dir():
            raise ValueError(f"--curve-allowed-keys {self.allowed_dir}: not a directory")
        self._state = _directory_state(self.allowed_dir)
        self._allowed = load_allowed_keys(self.allowed_dir)  # replaced whole, never mutated
        self._reload = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: zmq.Socket | None = None
        self._on_revoked: Callable[[frozenset[str]], None] | None = None
        self._complaints: dict[tuple[str, bytes], tuple[float, int]] = {}

    @property
    def allowed_count(self) -> int:
        return len(self._allowed)

    def allows(self, client_key: str) -> bool:
        """Is ``client_key`` (Z85) allowed now? Any thread."""
        return client_key.encode() in self._allowed

    def certificate_names(self) -> list[str]:
        """The names of the allowed certificates (file names without .key), now."""
        return list(self._allowed.values())

    def name_of(self, client_key: str) -> str:
        """The certificate name of an allowed key (file name without .key), else ''."""
        return self._allowed.get(client_key.encode(), "")

    # --- life cycle -------------------------------------------------------------------------

    def start(self, ctx: zmq.Context,
              on_revoked: Callable[[frozenset[str]], None] | None = None) -> None:
        """Bind the ZAP handler in ``ctx`` and answer on a thread of its own. ``on_revoked``
        gets the Z85 keys a reload removed (from that thread; it must not block)."""
        self._on_revoked = on_revoked
        self._socket = ctx.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._serve, name="kvdepot-zap", daemon=True)
        self._thread.start()

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server whose every handshake this handler decides (call
        before it binds)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        # Without it libzmq lets every handshake through while no handler is bound (at
        # shutdown, or had the thread died); with it such handshakes fail.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def request_reload(self) -> None:
        """Reload the allowed keys soon (on the handler's thread); safe in a signal handler."""
        self._reload.set()

    def stop(self) -> None:
        """End the handler thread, which closes its socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # --- the handler thread -----------------------------------------------------------------

    def _serve(self) -> None:
        sock = self._socket
        assert sock is not None
        next_scan = time.monotonic() + RESCAN_S
        try:
            while not self._stopping.is_set():
                if sock.poll(_POLL_MS):
                    frames = sock.recv_multipart()
                    try:
                        reply = self._decide(frames)
                    except Exception:  # noqa: BLE001 - a bug must refuse one handshake, no more
                        log.exception("ZAP handler failed; the handshake is refused")
                        reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500",
                                 b"internal error", b"", b""]
                    sock.send_multipart(reply)
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload("SIGHUP")
                now = time.monotonic()
                if now >= next_scan:
                    next_scan = now + RESCAN_S
                    if _directory_state(self.allowed_dir) != self._state:
                        self.reload("the directory changed")
        finally:
            sock.close(linger=0)

    def _decide(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request (RFC 27: version, request id, domain, address, routing
        id, mechanism, credentials). Only CURVE with an allowed key gets 200."""
        request_id = frames[1] if len(frames) > 1 else b""
        if len(frames) < 6:  # libzmq never sends this; a reply keeps REP's turn order
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        version, _, _domain, address, _routing_id, mechanism = frames[:6]
        key = frames[6] if len(frames) == 7 and len(frames[6]) == 32 else None
        if version != b"1.0" or mechanism != b"CURVE" or key is None:
            return [b"1.0", request_id, b"400", b"CURVE with a client key required", b"", b""]
        user_id = z85.encode(key)
        if user_id not in self._allowed:
            self._complain(address.decode(errors="replace"), user_id)
            return [b"1.0", request_id, b"400", b"unknown client key", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", user_id, b""]

    def _complain(self, address: str, key: bytes) -> None:
        """One line per client address and key per minute, with the count held back."""
        now = time.monotonic()
        started, suppressed = self._complaints.get((address, key), (float("-inf"), 0))
        if now - started < _COMPLAINT_WINDOW_S:
            self._complaints[(address, key)] = (started, suppressed + 1)
            return
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning(
            "Refused a client at %s: its CURVE key %s is not in the allowed client keys (%s)%s",
            address, key.decode(), self.allowed_dir, more,
        )
        if len(self._complaints) > 10000:  # bounded under a flood of new keys
            self._complaints.clear()
        self._complaints[(address, key)] = (now, 0)

    def reload(self, why: str) -> bool:
        """Load the allowed keys again (handler thread, or before ``start``). False, with the
        keys unchanged, when the directory or a certificate cannot be read."""
        # The state first: a change made while the keys load is seen by the next scan.
        self._state = _directory_state(self.allowed_dir)
        try:
            allowed = load_allowed_keys(self.allowed_dir)
        except ValueError as exc:
            log.error("Allowed client keys not reloaded (%s): %s; the previous %d keys stay",
                      why, exc, len(self._allowed))
            return False
        removed = frozenset(k.decode() for k in self._allowed.keys() - allowed.keys())
        added = len(allowed.keys() - self._allowed.keys())
        self._allowed = allowed
        log.info("Allowed client keys reloaded (%s): %d keys, %d added, %d removed",
                 why, len(allowed), added, len(removed))
        if removed and self._on_revoked is not None:
            self._on_revoked(removed)
        return True
