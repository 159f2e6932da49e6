"""What the connector counts, by name. An engine adapter reports them through its engine's
statistics (vLLM: kvdepot.integrations.vllm.stats)."""

from __future__ import annotations

COUNTERS = {
    # scheduler side
    "lookups": "Lookups sent to the kvdepot server",
    "lookup_errors": "Lookups that failed (server away or restarted); treated as misses",
    "queried_tokens": "Prompt tokens in whole chunks that were looked up",
    "hit_tokens": "Tokens the engine chose to load from kvdepot",
    # worker side
    "loaded_chunks": "Chunks loaded from kvdepot (per rank)",
    "loaded_bytes": "Bytes loaded from kvdepot (per rank)",
    "load_failed_blocks": "Blocks whose load failed and were recomputed",
    "stored_chunks": "Chunks written to kvdepot (per rank)",
    "stored_bytes": "Bytes written to kvdepot (per rank)",
    "store_skipped_chunks": "Chunks not written: already present, busy, or no space",
    "store_errors": "Store batches that failed (server away or restarted)",
    # both
    "hook_us": "Microseconds the connector's hooks ran on the engine's scheduler and worker threads",
}


def empty_counters() -> dict[str, int]:
    return {k: 0 for k in COUNTERS}


def take_counters(counters: dict[str, int]) -> dict[str, int]:
    """What ``counters`` counted so far; they start again from zero. Reset in place: the parts
    of one half (its lookup book, its transfer paths) all count into the same dict."""
    out = dict(counters)
    counters.update(empty_counters())
    return out
