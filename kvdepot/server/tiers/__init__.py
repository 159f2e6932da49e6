"""Storage tiers below the arena: the protocol every tier implements (base.py) and the
local disk tier (disk.py, its file format in chunkfile.py)."""

from kvdepot.server.tiers.base import StoredChunk, Tier, TierError, TierIO, TierSpec

__all__ = ["StoredChunk", "Tier", "TierError", "TierIO", "TierSpec"]
