"""Storage tiers below the arena: the protocol every tier implements (base.py), the local disk
tier (disk.py, its file format in chunkfile.py) and the remote tier shared by many nodes on a
Redis/Valkey Cluster (remote.py, its layout in manifest.py, its RESP client in resp/)."""

from kvdepot.server.tiers.base import StoredChunk, Tier, TierError, TierIO, TierSpec

__all__ = ["StoredChunk", "Tier", "TierError", "TierIO", "TierSpec"]
