"""Eviction policies by name (``--eviction-policy``). A new policy is one module here that
implements ``EvictionPolicy`` (base.py), and one line in ``POLICY_CLASSES``; the core never
changes."""

from __future__ import annotations

from collections.abc import Callable

from kvdepot.server.policies.base import EvictionPolicy
from kvdepot.server.policies.lru import LRUPolicy
from kvdepot.server.policies.s3fifo import S3FIFOPolicy

POLICY_CLASSES: dict[str, Callable[[], EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    S3FIFOPolicy.name: S3FIFOPolicy,
}
DEFAULT_POLICY = LRUPolicy.name


def policy_factory(name: str) -> Callable[[], EvictionPolicy]:
    """The policy class of that name; ValueError names the known ones."""
    try:
        return POLICY_CLASSES[name]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICY_CLASSES))}"
        ) from None


__all__ = [
    "DEFAULT_POLICY", "POLICY_CLASSES", "EvictionPolicy", "LRUPolicy", "S3FIFOPolicy", "policy_factory",
]
