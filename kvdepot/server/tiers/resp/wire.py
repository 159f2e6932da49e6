"""RESP2, the Redis/Valkey wire protocol, on one connection: the data path of the remote tier.

Values are chunks of KV bytes (1-64 MiB) that live in the shared-memory arena, so both
directions avoid copies where they cost:

- Sending: a command is a list of buffers. Small ``bytes`` arguments (keys, options) are
  packed into header buffers; a memoryview argument (and a large ``bytes``) is put in the
  list as it is, never copied. Plain sockets send the whole list with ``sendmsg``
  (scatter-gather); TLS sockets have no ``sendmsg`` and send buffer by buffer.
- Receiving: replies are parsed from a small read buffer (64 KiB), but a bulk reply read
  for a ``Call`` with ``into`` lands in the caller's memoryview: what the read buffer
  already holds is copied, the rest is received straight into the view with ``recv_into``.

Every blocking step takes a deadline (``time.monotonic()`` seconds) and waits no longer than
what is left of it (plain sockets: the kernel's SO_RCVTIMEO / SO_SNDTIMEO; TLS: the
socket's timeout). Errors: ``TimeoutError`` when the deadline passes, ``OSError``
(``PeerClosed`` for an orderly close) when the connection breaks, ``ssl.SSLError`` on TLS
failures, ``RespProtocolError`` for bytes that are not RESP2. After any of them the
connection's state is unknown: close it.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple, Union

import crc32c

_READ_CHUNK = 64 * 1024  # read buffer: replies' headers and small values
# Arguments up to this size are copied into a header buffer (one iovec instead of three).
_INLINE_MAX = 16 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)  # buffers per sendmsg
_TLS_SEND_CHUNK = 1 << 20  # TLS writes are all-or-nothing: bound each so deadlines hold
_TIMEOUT_SLACK_S = 0.005  # how far past a deadline a plain socket's blocking call may end
# SO_SNDBUF / SO_RCVBUF. On loopback with 16 MiB values, 4 MiB measured as fast as the
# kernel's autotuning (test_throughput_report prints both) and bounds each connection's
# kernel memory; a 4 MiB window still carries 4 GB/s at 1 ms round trips. 0: autotuning.
SOCKET_BUFFER_BYTES = 4 << 20
_CRLF = b"\r\n"
# Replies read into memory (not into a caller's view) are small: manifests, CLUSTER SLOTS,
# OK/ints; the deepest, CLUSTER SLOTS, nests arrays 3 deep.
MAX_BULK = 1 << 20
MAX_DEPTH = 8


class RespProtocolError(Exception):
    """The peer sent bytes that are not a RESP2 reply (or not the reply expected)."""


class PeerClosed(ConnectionError):
    """The peer closed the connection (end of stream while a reply was expected)."""


class TlsHandshakeFailed(ConnectionError):
    """The TLS handshake failed (``timed_out``: got no answer in time, as from a plain
    port, which waits for a command line that never comes). The cause is chained."""

    def __init__(self, message: str, *, timed_out: bool):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class RespErrorReply:
    """An error reply (``-ERR ...``, ``-MOVED 12 host:port``...): returned, not raised, so
    that one failed command does not lose the other replies of its pipeline."""

    message: str

    @property
    def code(self) -> str:
        """The first word: ``ERR``, ``WRONGTYPE``, ``MOVED``, ``ASK``, ``NOAUTH``..."""
        return self.message.split(" ", 1)[0]

    def __str__(self) -> str:
        return self.message


Reply = Union[bytes, int, None, list, RespErrorReply, "Filled"]
Arg = Union[bytes, bytearray, memoryview]


class Call(NamedTuple):
    """One command of a pipeline.

    ``args``: the command and its arguments, each ``bytes``, ``bytearray`` or a C-contiguous
    ``memoryview`` (sent as-is: e.g. ``(b"SET", key, view, b"PX", b"60000")``).
    ``into``: for a command answered by a bulk string (``GET``), a writable C-contiguous
    memoryview the value is read straight into when its length equals ``into.nbytes``; the
    reply is then the value's length (int), or None for nil. A value of another length is
    read and thrown away, and only its length is returned (``into`` untouched). Other
    replies (an error reply...) are returned as usual.
    ``checksum``: with ``into``, a value read into it is answered as ``Filled`` (its length
    and its CRC32C, computed piece by piece as the pieces arrive, while they are still in the
    CPU's cache: the caller need not read the bytes again to verify them).
    """

    args: tuple[Arg, ...]
    into: memoryview | None = None
    checksum: bool = False


class Filled(NamedTuple):
    """A value read into a ``Call.into`` with ``checksum``: its length and CRC32C."""

    nbytes: int
    crc32c: int


def checked_call(call: Call) -> Call:
    """``call`` with its memoryviews as flat byte views; raises TypeError or ValueError for
    anything that cannot go on the wire (nothing is sent then)."""
    if not isinstance(call, Call):
        raise TypeError(f"expected a Call, got {type(call).__name__}")
    if not isinstance(call.args, tuple) or not call.args:
        raise ValueError("a Call needs a non-empty tuple of args")
    args = tuple(_flat(arg, "argument") for arg in call.args)
    into = call.into
    if into is not None:
        if not isinstance(into, memoryview) or into.readonly:
            raise ValueError("into must be a writable memoryview")
        into = _flat(into, "into")
    return Call(args, into, call.checksum and into is not None)


def _flat(arg, what: str) -> Arg:
    if isinstance(arg, (bytes, bytearray)):
        return arg
    if isinstance(arg, memoryview):
        if not arg.c_contiguous:
            raise ValueError(f"a memoryview {what} must be C-contiguous")
        return arg if arg.format == "B" and arg.ndim == 1 else arg.cast("B")
    raise TypeError(f"a command {what} must be bytes, bytearray or memoryview, got {type(arg).__name__}")


def encode(calls: list[Call]) -> list[Arg]:
    """The buffers that send ``calls`` (already ``checked_call``) as one pipeline, in order.
    Memoryviews and large ``bytes`` are the callers' own buffers, not copies."""
    out: list[Arg] = []
    head = bytearray()
    for call in calls:
        head += b"*%d\r\n" % len(call.args)
        for arg in call.args:
            size = len(arg) if not isinstance(arg, memoryview) else arg.nbytes
            head += b"$%d\r\n" % size
            if size <= _INLINE_MAX and not isinstance(arg, memoryview):
                head += arg
                head += _CRLF
            else:
                out.append(head)
                out.append(arg)
                head = bytearray(_CRLF)
    if head:
        out.append(head)
    return out


class Connection:
    """One RESP2 connection (plain TCP or TLS). Used by one thread at a time.

    ``bytes_sent`` / ``bytes_received`` count wire bytes (TLS: payload bytes) since it opened.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        if not self.tls:
            # Plain sockets block in the kernel, bounded by SO_RCVTIMEO / SO_SNDTIMEO: one
            # syscall per recv while a value streams in, where a Python socket timeout adds
            # a poll before each (and an ioctl each time it is set).
            sock.settimeout(None)
            self._kernel_deadline = 0.0  # what the kernel timeouts were set for ...
            self._kernel_set_at = 0.0  # ... and when
        self.bytes_sent = 0
        self.bytes_received = 0
        self._buf = bytearray(_READ_CHUNK)
        self._start = 0  # unread bytes are self._buf[self._start:self._end]
        self._end = 0

    @classmethod
    def open(
        cls, host: str, port: int, timeout_s: float, *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> "Connection":
        """Connect (and do the TLS handshake with ``ssl_context``, checking the certificate
        against ``host``) within ``timeout_s`` seconds in all. Raises OSError: TimeoutError,
        ConnectionRefusedError..., TlsHandshakeFailed."""
        deadline = time.monotonic() + timeout_s
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if SOCKET_BUFFER_BYTES:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            if ssl_context is not None:
                sock.settimeout(_left(deadline))
                try:
                    sock = ssl_context.wrap_socket(sock, server_hostname=host)
                except TimeoutError as exc:
                    raise TlsHandshakeFailed(f"no TLS handshake answer within {timeout_s:g} s",
                                             timed_out=True) from exc
                except (ssl.SSLError, ConnectionError) as exc:
                    raise TlsHandshakeFailed(f"TLS handshake failed: {exc}", timed_out=False) from exc
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass  # closing a broken socket: nothing left to release

    def execute(self, calls: list[Call], deadline: float) -> list[Reply]:
        """Send ``calls`` in one go, then read one reply per call (see ``Call`` for ``into``).
        Raises TypeError/ValueError for bad calls before anything is sent; TimeoutError,
        OSError, ssl.SSLError or RespProtocolError when the exchange fails (close it then)."""
        calls = [checked_call(call) for call in calls]
        self.send(encode(calls), deadline)
        return [self.read_reply(deadline, call.into, call.checksum) for call in calls]

    # -- sending

    def send(self, buffers: list[Arg], deadline: float) -> None:
        """Send every byte of ``buffers`` (flat byte buffers) before ``deadline``."""
        if self.tls:
            for buf in buffers:
                self._send_tls(memoryview(buf), deadline)
            return
        views = [memoryview(buf) for buf in buffers if len(buf)]
        first = 0
        while first < len(views):
            self._bound(deadline)
            try:
                sent = self.sock.sendmsg(views[first:first + _IOV_MAX])
            except BlockingIOError:  # SO_SNDTIMEO passed with nothing sent
                continue
            self.bytes_sent += sent
            while sent:  # drop what went out; a partly sent buffer goes on from its rest
                size = views[first].nbytes
                if sent >= size:
                    sent -= size
                    first += 1
                else:
                    views[first] = views[first][sent:]
                    sent = 0

    def _send_tls(self, view: memoryview, deadline: float) -> None:
        for offset in range(0, view.nbytes, _TLS_SEND_CHUNK):
            self.sock.settimeout(_left(deadline))
            self.bytes_sent += self.sock.send(view[offset:offset + _TLS_SEND_CHUNK])

    # -- receiving

    def read_reply(
        self, deadline: float, into: memoryview | None = None, checksum: bool = False,
        depth: int = 0,
    ) -> Reply:
        """Read one reply; ``into`` and ``checksum`` as in ``Call`` (a flat writable byte
        view). RespProtocolError for arrays nested deeper than ``MAX_DEPTH`` and values over
        ``MAX_BULK`` read without ``into``: what a broken or hostile node sends must cost a
        protocol error, never the memory or the stack of the server."""
        line = self._read_line(deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = _int(rest)
            if size < 0:
                reply = None
            elif into is None:
                if size > MAX_BULK:
                    raise RespProtocolError(f"a value of {size} bytes read without a view")
                reply = self._read_bulk(size, deadline)
            else:
                reply = self._read_bulk_into(size, into, deadline, checksum)
        elif kind == b"+":
            reply = rest
        elif kind == b"-":
            reply = RespErrorReply(rest.decode("utf-8", "replace"))
        elif kind == b":":
            reply = _int(rest)
        elif kind == b"*":
            count = _int(rest)
            if depth >= MAX_DEPTH:
                raise RespProtocolError(f"arrays nested deeper than {MAX_DEPTH}")
            reply = None if count < 0 else [
                self.read_reply(deadline, depth=depth + 1) for _ in range(count)
            ]
        else:
            raise RespProtocolError(f"not a RESP2 reply: {line[:40]!r}")
        return reply

    def _read_line(self, deadline: float) -> bytes:
        while True:
            end = self._buf.find(_CRLF, self._start, self._end)
            if end >= 0:
                line = bytes(self._buf[self._start:end])
                self._start = end + 2
                return line
            self._fill(deadline)

    def _fill(self, deadline: float) -> None:
        """Receive more bytes after the unread ones (moved to the front, or the buffer grown
        for a line longer than it)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            unread = self._end - self._start
            if self._start == 0:
                self._buf.extend(bytes(len(self._buf)))
            else:
                self._buf[:unread] = self._buf[self._start:self._end]
                self._start, self._end = 0, unread
        with memoryview(self._buf) as view:
            self._end += self._recv_into(view[self._end:], deadline)

    def _take(self, into: memoryview) -> int:
        """Copy buffered bytes into the front of ``into``; returns how many."""
        count = min(self._end - self._start, into.nbytes)
        if count:
            with memoryview(self._buf) as view:
                into[:count] = view[self._start:self._start + count]
            self._start += count
        return count

    def _read_bulk(self, size: int, deadline: float) -> bytes:
        if self._end - self._start >= size + 2:
            value = bytes(self._buf[self._start:self._start + size])
            self._start += size
        else:
            value = bytearray(size)
            self._read_exact(memoryview(value), deadline)
            value = bytes(value)
        self._expect_crlf(deadline)
        return value

    def _read_bulk_into(
        self, size: int, into: memoryview, deadline: float, checksum: bool
    ) -> int | Filled:
        if size != into.nbytes:
            self._skip(size, deadline)
            reply: int | Filled = size
        elif checksum:
            reply = Filled(size, self._read_exact(into, deadline, crc32c.crc32c))
        else:
            self._read_exact(into, deadline)
            reply = size
        self._expect_crlf(deadline)
        return reply

    def _read_exact(self, into: memoryview, deadline: float, crc=None) -> int:
        """Fill ``into``; with ``crc`` (crc32c.crc32c), the CRC of what arrived, updated as
        each piece lands (0 without)."""
        got = self._take(into)
        value = crc(into[:got]) if crc is not None else 0
        while got < into.nbytes:
            n = self._recv_into(into[got:], deadline)
            if crc is not None:
                value = crc(into[got:got + n], value)
            got += n
        return value

    def _skip(self, count: int, deadline: float) -> None:
        """Read ``count`` bytes and throw them away, through the read buffer."""
        buffered = min(count, self._end - self._start)
        self._start += buffered
        count -= buffered
        if count:
            self._start = self._end = 0
            with memoryview(self._buf) as view:
                while count:
                    count -= self._recv_into(view[:count], deadline)

    def _expect_crlf(self, deadline: float) -> None:
        while self._end - self._start < 2:
            self._fill(deadline)
        if self._buf[self._start:self._start + 2] != _CRLF:
            raise RespProtocolError("a bulk string is not followed by CRLF")
        self._start += 2

    def _bound(self, deadline: float) -> None:
        """Make the plain socket's kernel timeouts end a blocking call by ``deadline`` (within
        _TIMEOUT_SLACK_S); TimeoutError when it has passed. Reset only when stale: a call
        blocks at most the time left when they were set, which overshoots ``deadline`` by
        the time since."""
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError("the deadline passed")
        if deadline != self._kernel_deadline or now - self._kernel_set_at > _TIMEOUT_SLACK_S:
            left = deadline - now
            timeval = struct.pack("@ll", int(left), max(1, int(left % 1 * 1e6)))  # 0: forever
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._kernel_deadline, self._kernel_set_at = deadline, now

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        if self.tls:
            self.sock.settimeout(_left(deadline))
            got = self.sock.recv_into(view)
        else:
            while True:
                self._bound(deadline)
                try:
                    got = self.sock.recv_into(view)
                    break
                except BlockingIOError:  # SO_RCVTIMEO passed
                    continue
        if got == 0:
            raise PeerClosed("the server closed the connection")
        self.bytes_received += got
        return got


def _left(deadline: float) -> float:
    """Seconds until ``deadline``; TimeoutError when none are left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise RespProtocolError(f"not an integer in a reply header: {text[:40]!r}") from None
