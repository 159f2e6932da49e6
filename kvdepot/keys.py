"""Chunk keys: a deterministic chained hash, equal in every process and on every machine.

key(0) = H(namespace_digest, tokens of chunk 0); key(i) = H(key(i-1), tokens of chunk i).
A key therefore names a chunk *and its whole prefix*. H is BLAKE2b with a 16-byte digest over
the tokens as little-endian uint32, so neither Python's hash() nor PYTHONHASHSEED plays a part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvdepot.protocol import KEY_BYTES, KVGeometry

_PERSON_NAMESPACE = b"kvdepot-ns-v1"
_PERSON_CHUNK = b"kvdepot-ck-v1"


def namespace_digest(model: str, geometry: KVGeometry, world_size: int, salt: str) -> bytes:
    """The root of every key chain of one model, KV geometry, TP degree and tenant salt, and
    the namespace's only lasting name: equal across processes, machines and server restarts,
    it names the namespace wherever it outlives one server boot (a tier's files, another
    node). The small id a server hands engines at Register is valid for that boot only.
    Every field that changes what a slot's bytes mean is in it; the chunk size is not, as it
    changes every key of the chain anyway."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=_PERSON_NAMESPACE.ljust(16, b"\0"))
    for part in (
        model,
        str(world_size),
        salt,
        str(geometry.num_layers),
        str(geometry.num_kv_heads),
        str(geometry.head_size_k),
        str(geometry.head_size_v),
        geometry.dtype,
        str(geometry.block_size),
        str(geometry.num_planes),
        str(geometry.piece_bytes),
        geometry.layout,
    ):
        encoded = part.encode()
        h.update(len(encoded).to_bytes(4, "little"))
        h.update(encoded)
    return h.digest()


def chunk_keys(root: bytes, tokens: Sequence[int] | np.ndarray, chunk_tokens: int) -> list[bytes]:
    """Keys of every *whole* chunk of ``tokens``; a trailing partial chunk has no key."""
    ids = np.asarray(tokens, dtype=np.uint32)
    n_chunks = len(ids) // chunk_tokens
    raw = ids[: n_chunks * chunk_tokens].astype("<u4", copy=False).tobytes()
    step = chunk_tokens * 4
    person = _PERSON_CHUNK.ljust(16, b"\0")
    keys: list[bytes] = []
    prev = root
    for i in range(n_chunks):
        prev = hashlib.blake2b(
            raw[i * step : (i + 1) * step], digest_size=KEY_BYTES, key=prev, person=person
        ).digest()
        keys.append(prev)
    return keys
