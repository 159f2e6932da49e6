"""Storage tiers below the arena: the protocol every tier implements (base.py)."""

from kvdepot.server.tiers.base import StoredChunk, Tier, TierError, TierSpec

__all__ = ["StoredChunk", "Tier", "TierError", "TierSpec"]
