"""Fuzz target ``wire``: the msgpack decoders of every request and reply (kvdepot.protocol).

Every input is one frame, decoded both as a request (what the server's ROUTER loop does with
an engine's frame) and as a reply (what an engine's client does with the server's frame).

Properties:
- Decoding raises msgspec.DecodeError (ValidationError is one) or returns a message of the
  union it decodes: any other exception escapes both the server's and the client's handlers
  (the client catches DecodeError only).
- A Batch holds only single requests, a BatchReply only single replies.
- What decodes re-encodes, and that re-encoding decodes and encodes to the same bytes (a
  canonical form: nothing the server accepts is lost or changed in its reply path).
- Key blobs split into whole 16-byte keys or raise ValueError (what the core turns into
  BAD_REQUEST).

msgspec's decoder is C code atheris cannot instrument: the fuzzer is guided by this module's
and kvdepot.protocol's Python branches and by the seeds (every message type, encoded by the
real encoder), which libFuzzer's byte mutations change field by field.
"""

from __future__ import annotations

import typing

from fuzz_common import fuzz, instrumented

with instrumented(__name__):
    import msgspec

    from kvdepot import protocol as p

SINGLE_REQUESTS = typing.get_args(p.SingleRequest)
REQUESTS = typing.get_args(p.Request)
REPLIES = typing.get_args(p.Reply)
SINGLE_REPLIES = tuple(t for t in REPLIES if t is not p.BatchReply)
_INT64 = (-(1 << 63), (1 << 64) - 1)  # what msgpack carries


def TestOneInput(data: bytes) -> None:
    request = _decoded(data, p.decode_request, REQUESTS)
    if request is not None:
        if isinstance(request, p.Batch):
            assert all(type(op) in SINGLE_REQUESTS for op in request.ops), request
        _check_fields(request)
        _check_canonical(request, p.decode_request)
    reply = _decoded(data, p.decode_reply, REPLIES)
    if reply is not None:
        if isinstance(reply, p.BatchReply):
            assert all(type(r) in SINGLE_REPLIES for r in reply.replies), reply
        _check_fields(reply)
        _check_canonical(reply, p.decode_reply)


def _decoded(frame: bytes, decode, types: tuple[type, ...]):
    try:
        message = decode(frame)
    except msgspec.DecodeError:  # ValidationError included: what both peers expect
        return None
    assert type(message) in types, type(message)
    # The frame is an array whose first item is the type's tag (items past the type's fields
    # are skipped unread: a newer peer's trailing fields).
    items = msgspec.msgpack.decode(frame, type=list[msgspec.Raw])
    assert msgspec.msgpack.decode(items[0]) == p.wire_tag(type(message)), (items, message)
    return message


def _check_canonical(message: msgspec.Struct, decode) -> None:
    again = p.encode(message)
    second = decode(again)
    assert type(second) is type(message)
    assert p.encode(second) == again, (message, second)  # bytes: NaN floats compare too


def _check_fields(message) -> None:
    """Walk a decoded message: ints in msgpack's range, key blobs split as the core splits
    them, nested messages and stats structs checked the same way."""
    if isinstance(message, (list, tuple)):
        for item in message:
            _check_fields(item)
        return
    if isinstance(message, dict):
        for key, value in message.items():
            assert isinstance(key, str), key
            _check_fields(value)
        return
    if isinstance(message, bool) or message is None or isinstance(message, (str, float)):
        return
    if isinstance(message, int):
        assert _INT64[0] <= message <= _INT64[1], message
        return
    if isinstance(message, bytes):
        return
    assert isinstance(message, msgspec.Struct), type(message)
    for name in message.__struct_fields__:
        value = getattr(message, name)
        if name in ("keys", "parent") and isinstance(value, bytes):
            _check_keys(value)
        _check_fields(value)


def _check_keys(blob: bytes) -> None:
    try:
        keys = p.split_keys(blob)
    except ValueError:
        assert len(blob) % p.KEY_BYTES, len(blob)
        return
    assert all(len(k) == p.KEY_BYTES for k in keys) and b"".join(keys) == blob


if __name__ == "__main__":
    fuzz(TestOneInput)
