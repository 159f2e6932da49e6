"""The wire protocol between engines and the cache server.

Every frame is one msgpack-encoded, tagged msgspec struct. An engine's DEALER socket sends a
request; the server's ROUTER answers every request it can decode with exactly one reply carrying
the same ``req_id``: the typed reply, or an ``ErrorReply`` with a code and a message.

Chunk keys travel as one ``bytes`` blob of ``KEY_BYTES``-sized keys, in prefix order, so a
32k-token prompt (128 keys) costs one small frame and no per-key object.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec

PROTOCOL_VERSION = 1
KEY_BYTES = 16
MAX_FRAME_BYTES = 4 << 20
MAX_KEYS_PER_REQUEST = 65536
MAX_BATCH_OPS = 1024


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1  # undecodable bytes, unknown message type, wrong field types
    BAD_VERSION = 2  # protocol version the server does not speak
    NO_SESSION = 3  # request before Hello, or after the server restarted
    BAD_REQUEST = 4  # well-formed but invalid: bad key blob, rank out of range, ...
    UNKNOWN_NAMESPACE = 5
    GEOMETRY_MISMATCH = 6
    TOO_LARGE = 7  # frame, batch or key list over the limits
    NO_SPACE = 8  # nothing could be evicted to make room
    UNKNOWN_LEASE = 9
    UNKNOWN_RESERVATION = 10
    INTERNAL = 11  # a server bug; the server keeps serving
    # Raised by the client, never sent: the shared-memory segment it mapped is not the one of
    # the server boot it talks to (another server's, a stale one, or none), so it is not used.
    ARENA_MISMATCH = 12
    # The client's key may not do this: it belongs to no tenant (Hello), or its tenant may not
    # use that salt or model (Register). Nothing was changed.
    UNAUTHORIZED = 13


class SlotStatus(enum.IntEnum):
    """Per-key outcome of a Reserve, sent as plain ints in ``ReserveReply.status``."""

    RESERVED = 0  # write the slot at the returned offset, then commit
    PRESENT = 1  # already committed by this rank: nothing to write
    BUSY = 2  # another writer holds it: nothing to write
    NO_SPACE = 3  # not stored; every later key of the request is NO_SPACE too (no holes)
    # Not stored: the request's ``parent`` chunk is not in the cache, so nothing could reach
    # these chunks (a lookup walks a chain from its head). Every key of the request has it.
    NO_PARENT = 4


class KVGeometry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one tensor-parallel rank's share of one chunk looks like in a slot.

    ``layout`` names the engine's byte layout (see kvdepot.transfer.layout): engines only share
    chunks when every field here is equal, so bytes are never reinterpreted.
    """

    num_layers: int
    num_kv_heads: int
    head_size_k: int
    head_size_v: int  # 0 for MLA (latent cache, no separate V)
    dtype: str
    block_size: int  # engine tokens per block; divides the chunk size
    num_planes: int  # contiguous per-block pieces a block is made of, over all layers
    piece_bytes: int  # bytes of one plane of one block
    layout: str

    def slot_bytes(self, chunk_tokens: int) -> int:
        return self.num_planes * self.piece_bytes * (chunk_tokens // self.block_size)

    def describe(self) -> str:
        v = f"+{self.head_size_v}" if self.head_size_v else " (MLA)"
        return (
            f"{self.num_kv_heads} kv heads x {self.head_size_k}{v} head dims, {self.dtype}, "
            f"block {self.block_size}, layout {self.layout}"
        )


class Message(msgspec.Struct, array_like=True):
    """The base of every request and reply: a msgpack array whose first item is the message's
    wire tag. Each message names its tag explicitly (``class Lookup(Message, tag="Lookup")``),
    so renaming a class never changes the wire; a new message needs a new, unused tag."""


def wire_tag(message_type: type[Message]) -> str:
    """The tag a message type travels under (its name in metrics and logs too)."""
    return message_type.__struct_config__.tag  # type: ignore[return-value]


# --- requests -------------------------------------------------------------------------------


class Hello(Message, tag="Hello"):
    req_id: int
    protocol_version: int
    engine_id: str
    pid: int = 0


class Register(Message, tag="Register"):
    """Declare the KV geometry of a model served with ``world_size`` tensor-parallel ranks."""

    req_id: int
    model: str
    geometry: KVGeometry
    world_size: int = 1
    salt: str = ""


class Lookup(Message, tag="Lookup"):
    """How many leading chunks does every rank have? Optionally lease them for a later load."""

    req_id: int
    namespace: int
    keys: bytes
    lease_ms: int = 0  # 0: no lease


class Reserve(Message, tag="Reserve"):
    """Phase one of a store: slots for ``rank``'s shard of each chunk, not readable until Commit.

    ``keys`` are consecutive chunks of one chain; ``parent`` is the key of the chunk just before
    ``keys[0]`` (empty: ``keys[0]`` is the chain's head). The server keeps a chunk while any
    chunk after it in its chain stays, so what stays is reachable from the head, and stores
    nothing when ``parent`` is not in the cache (NO_PARENT).
    """

    req_id: int
    namespace: int
    rank: int
    keys: bytes
    ttl_ms: int = 0  # 0: the server's default
    # Trailing with a default: a Reserve from a client that predates it decodes as a head.
    parent: bytes = b""


class Commit(Message, tag="Commit"):
    req_id: int
    reservation: int


class Abort(Message, tag="Abort"):
    req_id: int
    reservation: int


class Acquire(Message, tag="Acquire"):
    """Lease ``rank``'s slots of the longest committed prefix of ``keys`` for reading."""

    req_id: int
    namespace: int
    rank: int
    keys: bytes
    lease_ms: int = 0  # 0: the server's default


class Release(Message, tag="Release"):
    """End leases. ``retrieved`` names those (each also in ``leases``) whose chunks the engine
    read, so the server counts and logs the retrieval; an Acquire lease counts either way."""

    req_id: int
    leases: list[int]
    # Trailing with a default: a Release from a client that predates it decodes with none.
    retrieved: list[int] = []


class Heartbeat(Message, tag="Heartbeat"):
    req_id: int


class GetStats(Message, tag="GetStats"):
    req_id: int


class Goodbye(Message, tag="Goodbye"):
    req_id: int


SingleRequest = Union[
    Hello, Register, Lookup, Reserve, Commit, Abort, Acquire, Release, Heartbeat, GetStats, Goodbye
]


class Batch(Message, tag="Batch"):
    """Several requests in one round trip; answered by one BatchReply in the same order."""

    req_id: int
    ops: list[SingleRequest]


Request = Union[SingleRequest, Batch]


# --- replies --------------------------------------------------------------------------------


class HelloReply(Message, tag="HelloReply"):
    req_id: int
    protocol_version: int
    boot_id: str
    server_version: str
    shm_name: str
    arena_bytes: int
    chunk_tokens: int
    heartbeat_ms: int
    session_timeout_ms: int
    # The segment ends with an identity block naming this boot (kvdepot.server.arena), which
    # an engine checks before using its mapping. Trailing with a default: False from a server
    # that predates it (nothing to check).
    arena_identity: bool = False


class RegisterReply(Message, tag="RegisterReply"):
    req_id: int
    namespace: int
    namespace_digest: bytes  # the first link of every key chain in this namespace
    slot_bytes: int
    chunk_tokens: int


class LookupReply(Message, tag="LookupReply"):
    req_id: int
    hit_chunks: int
    lease: int = 0
    # Only with a lease (so the slots cannot move before the load): the arena byte offset of
    # every rank's slot of every hit chunk, rank-major, ``offsets[r * hit_chunks + i]`` for
    # rank r and chunk i, so workers load without an Acquire. Empty otherwise. Trailing with a
    # default: a reply from a server that predates it decodes with none.
    offsets: list[int] = []
    # Chunks right after the hits that a lower tier (disk) is loading into the buffer for
    # this lookup: ask again and they are hits once they landed, or count as misses once
    # the server's prefetch deadline passed (then this is 0). The lease covers them too.
    # Trailing with a default: 0 from a server that predates it.
    pending: int = 0


class ReserveReply(Message, tag="ReserveReply"):
    req_id: int
    reservation: int  # 0 when nothing was reserved
    status: list[int]  # SlotStatus per key
    offsets: list[int]  # arena byte offset per key; -1 where there is nothing to write


class CommitReply(Message, tag="CommitReply"):
    req_id: int
    committed: int


class AcquireReply(Message, tag="AcquireReply"):
    req_id: int
    lease: int
    offsets: list[int]  # one per leading chunk this rank has; may be shorter than the keys


class OkReply(Message, tag="OkReply"):
    req_id: int


class StatsReply(Message, tag="StatsReply"):
    req_id: int
    stats: "ServerStats"


class ErrorReply(Message, tag="ErrorReply"):
    req_id: int
    code: int
    message: str


class BatchReply(Message, tag="BatchReply"):
    req_id: int
    replies: list[
        Union[
            HelloReply,
            RegisterReply,
            LookupReply,
            ReserveReply,
            CommitReply,
            AcquireReply,
            OkReply,
            "StatsReply",
            ErrorReply,
        ]
    ]


class TierNode(msgspec.Struct):
    """One server behind a tier (a node of a Redis/Valkey Cluster), for status."""

    address: str  # host:port
    role: str  # "master", "replica", "server" (not a cluster)
    connected: bool  # a connection is open, or the node is not in backoff
    bytes_sent: int
    bytes_received: int
    calls: int  # pipelines run on it
    errors: int
    last_error: str


class TierStats(msgspec.Struct):
    """One storage tier below the buffer (a local disk, a remote store): its settings and
    what it did."""

    name: str  # "disk"
    settings: dict[str, str]  # flags and policies: path, write policy, admission, O_DIRECT...
    capacity_bytes: int  # --disk-size: the tier never holds more (headers and padding count)
    used_bytes: int  # on the medium now, temporary files of writes in flight included
    files: int  # chunk files (one per chunk and rank)
    waiting_files: int  # found at start, waiting for an engine to register their namespace
    copies_in_flight: int  # writes and loads started, not finished
    queue_depth: int  # copies that may be in flight at once; more are not started
    writes: int  # chunk files written
    written_bytes: int  # payload bytes
    reads: int  # chunk files read back into the buffer, verified
    read_bytes: int
    checksum_failures: int  # payload CRC32C mismatches on read: a miss, the file deleted
    bad_files: int  # short, unknown format version, bad header: deleted (at start or on read)
    temp_files_removed: int  # left by a write a crash interrupted; removed at start
    write_errors: int  # writes that failed (disk full, I/O error, over the cap)
    read_errors: int  # reads that failed other than by a checksum (missing file, I/O error)
    dropped_writes: int  # wanted but never started: the tier's queue was full
    not_admitted: int  # left the buffer unwritten: fewer hits than --disk-admit-hits
    prefetch_started: int  # chunks a leased lookup started loading into the buffer
    prefetch_landed: int  # of those, loaded and verified
    prefetch_timeouts: int  # still loading at their deadline: the lookup counted them missed
    prefetch_skipped: int  # not started: loading was expected to be slower than recomputing
    read_bytes_per_s: float  # the load speed the tier expects (measured on its reads)
    last_error: str  # the latest I/O error, "" when none
    # A shared tier (a remote store): lookups that asked it for chunks the index did not
    # know, the chunks it answered it holds, and its servers.
    probes: int = 0
    probe_found: int = 0
    probe_errors: int = 0
    already_stored: int = 0  # writes that found the chunk there (another node's): TTL renewed
    nodes: list[TierNode] = msgspec.field(default_factory=list)


class TenantStats(msgspec.Struct):
    """One tenant's partition (a server with a tenant file): its own arena, chunks and
    sessions, and its quotas (bytes; 0: that tier is not used for it)."""

    name: str
    arena_bytes: int  # its buffer quota: the size of its own segment
    used_bytes: int
    chunks: int
    namespaces: int
    engines_connected: int
    leases_held: int
    reservations_open: int
    hit_chunks: int
    miss_chunks: int
    stored_bytes: int
    evicted_chunks: int
    disk_quota_bytes: int
    remote_quota_bytes: int


class ServerStats(msgspec.Struct):
    """A consistent snapshot of what the server holds and did, for clients, /stats and status."""

    version: str
    boot_id: str
    uptime_s: float
    ready: bool
    arena_bytes: int
    used_bytes: int
    free_bytes: int
    chunk_tokens: int
    chunks: int
    namespaces: int
    engines_connected: int
    leases_held: int
    reservations_open: int
    lookups: int
    hit_chunks: int
    miss_chunks: int
    hit_tokens: int
    miss_tokens: int
    stored_chunks: int
    stored_tokens: int
    stored_bytes: int
    retrieved_chunks: int
    retrieved_tokens: int
    retrieved_bytes: int
    evicted_chunks: int
    expired_leases: int
    expired_reservations: int
    errors: dict[str, int]
    # Trailing with a default: stats from a server that predates tiers decode with none.
    tiers: list[TierStats] = []
    # Per tenant (with a tenant file); the figures above are their sums.
    tenants: list[TenantStats] = []


Reply = Union[
    HelloReply,
    RegisterReply,
    LookupReply,
    ReserveReply,
    CommitReply,
    AcquireReply,
    OkReply,
    StatsReply,
    ErrorReply,
    BatchReply,
]

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_request(frame: bytes) -> Request:
    """Raises msgspec.DecodeError / ValidationError on anything that is not a valid request."""
    return _request_decoder.decode(frame)


def decode_reply(frame: bytes) -> Reply:
    return _reply_decoder.decode(frame)


def split_keys(blob: bytes) -> list[bytes]:
    if len(blob) % KEY_BYTES:
        raise ValueError(f"key blob of {len(blob)} bytes is not a multiple of {KEY_BYTES}")
    return [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
