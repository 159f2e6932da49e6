"""What of a vLLM request its chunk keys depend on, and which requests can be cached at all.

KV depends on more than the tokens: on the LoRA adapter that computed it, and vLLM's
per-request ``cache_salt`` isolates tenants. Both go into the root of the request's key chain.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from kvdepot.integrations.vllm.identity import adapter_identity


def request_root(ns_digest: bytes, request: Any) -> bytes:
    """The first link of a request's key chain.

    KV also depends on the LoRA adapter, and vLLM's per-request ``cache_salt`` isolates
    tenants; both are folded into the root so such requests never share chunks with others.
    The adapter is named by its weights (identity.adapter_identity), never by its per-engine
    name and id: another engine may serve other weights under the same label.
    """
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        adapter = adapter_identity(lora)
        if adapter is None:
            # cacheable identified it a moment ago and it is gone now: a root that nothing
            # else reaches, so the request shares nothing.
            adapter = "unidentified:" + os.urandom(16).hex()
        parts.append(f"adapter:{adapter}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt:{salt}")
    if not parts:
        return ns_digest
    h = hashlib.blake2b(digest_size=len(ns_digest), key=ns_digest, person=b"kvdepot-rq-v1".ljust(16, b"\0"))
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def cacheable(request: Any) -> bool:
    """Whether the request's KV depends only on what its keys cover."""
    if getattr(request, "prompt_token_ids", None) is None:
        return False  # prompt embeddings: no tokens to key on
    if getattr(request, "mm_features", None) or getattr(request, "mm_positions", None):
        return False  # KV depends on the images too, which the keys do not cover
    lora = getattr(request, "lora_request", None)
    if lora is not None and adapter_identity(lora) is None:
        return False  # KV depends on the adapter's weights, which cannot be identified
    return True
