"""kvdepot: one KV-cache server per node, shared by every inference engine on it."""

__version__ = "0.1.0"
