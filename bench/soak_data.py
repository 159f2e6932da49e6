"""What the soak's synthetic clients store and check: their namespaces, their prompts (trees
of shared prefixes) and the bytes of every chunk.

A chunk's bytes are a function of its key and rank only (a PRNG seeded from a BLAKE2b of
both), so any process can tell, byte for byte, whether a slot holds what its key names, and
two clients that store the same chunk write the same bytes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from kvdepot.protocol import KVGeometry

CHUNK_TOKENS = 256  # the server's --chunk-size in the soak


def small_geometry(layers: int = 2, heads: int = 2, head_dim: int = 16, block: int = 16) -> KVGeometry:
    """A bf16 layer-major geometry; its slot is ``layers x 2 x block x heads x 2 x head_dim``
    bytes per block: 64 KiB per 256-token chunk with the defaults."""
    piece = block * heads * 2 * head_dim * 2  # bf16, K and V side by side
    return KVGeometry(
        num_layers=layers, num_kv_heads=heads, head_size_k=head_dim, head_size_v=head_dim,
        dtype="bfloat16", block_size=block, num_planes=layers, piece_bytes=piece,
        layout=f"layer_major:{layers}x{piece}:soak",
    )


@dataclass(frozen=True)
class SyntheticNamespace:
    """One namespace the synthetic clients use: (model, geometry, TP degree, salt)."""

    model: str
    geometry: KVGeometry
    world_size: int
    salt: str

    @property
    def label(self) -> str:
        salt = f"+salt:{self.salt}" if self.salt else ""
        return f"{self.model}/tp{self.world_size}{salt}"


# TP 1, TP 2 (one process writes both ranks, in a random order, so a kill between them leaves
# chunks that only one rank has), and the first model again under a tenant salt (keys that
# never meet the unsalted ones). The vLLM engine's namespace (256 KiB slots) is the fourth.
NAMESPACES = (
    SyntheticNamespace("soak-synthetic", small_geometry(), 1, ""),
    SyntheticNamespace("soak-synthetic-tp", small_geometry(), 2, ""),
    SyntheticNamespace("soak-synthetic", small_geometry(), 1, "tenant-b"),
)


class PromptTree:
    """Prompts of whole chunks that share prefixes: ``roots`` heads of 2 chunks, each with
    ``branches`` continuations of 1-3 chunks, each with ``leaves`` tails of 0-3 chunks.
    Prompts are drawn with Zipf-like weights (a few hot, many cold), the same in every
    process for the same ``seed``."""

    def __init__(self, seed: int, roots: int = 6, branches: int = 6, leaves: int = 3):
        rng = random.Random(seed)

        def tokens(n_chunks: int) -> list[int]:
            return [rng.randrange(10, 1 << 20) for _ in range(n_chunks * CHUNK_TOKENS)]

        self.prompts: list[list[int]] = []
        for _ in range(roots):
            root = tokens(2)
            for _ in range(branches):
                branch = root + tokens(rng.randint(1, 3))
                for _ in range(leaves):
                    self.prompts.append(branch + tokens(rng.randint(0, 3)))
        order = list(range(len(self.prompts)))
        rng.shuffle(order)  # which prompts are hot: not always the first root's
        self._weights = [0.0] * len(order)
        for rank, i in enumerate(order):
            self._weights[i] = 1.0 / (rank + 1) ** 0.8

    def pick(self, rng: random.Random) -> list[int]:
        return rng.choices(self.prompts, weights=self._weights)[0]


def chunk_bytes(key: bytes, rank: int, nbytes: int) -> np.ndarray:
    """The ``nbytes`` bytes rank ``rank``'s slot of chunk ``key`` must hold (uint8)."""
    seed = hashlib.blake2b(key + rank.to_bytes(2, "little"), digest_size=8).digest()
    return np.frombuffer(np.random.default_rng(int.from_bytes(seed, "little")).bytes(nbytes),
                         dtype=np.uint8)


def first_difference(got: np.ndarray, want: np.ndarray) -> int:
    """Index of the first byte that differs; -1 when equal."""
    diff = np.flatnonzero(got != want)
    return int(diff[0]) if diff.size else -1
