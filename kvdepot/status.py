"""`kvdepot status`: what a running server holds and did, read from its /stats endpoint.

A person at a terminal gets a small table; a script passes --json and gets the server's own
JSON back. Only the standard library is used, so the command works from a bare shell in the
server's container (no torch, no ZMQ, no session with the server: a probe must not count as an
engine).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

DEFAULT_URL = "http://localhost:8555"
TIMEOUT_S = 5.0


def stats_url(url: str) -> str:
    """Accept "host:port", "http://host:port", with or without a trailing /stats."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/stats") else url + "/stats"


class StatusError(Exception):
    """The server could not be asked, or answered something that is not its stats."""


def fetch_stats(url: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    target = stats_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{target} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach {target}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise StatusError(f"cannot reach {target}: {exc}") from exc
    try:
        stats = json.loads(body)
    except ValueError as exc:
        raise StatusError(f"{target} did not answer JSON (is that a kvdepot HTTP port?)") from exc
    if not isinstance(stats, dict) or "boot_id" not in stats:
        raise StatusError(f"{target} did not answer kvdepot stats")
    return stats


# --- formatting ------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    # Decimal units, as --cpu-buffer-size and the server's own log lines count them.
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s"


def percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def status_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows; every figure of /stats appears in one of them."""
    get = s.get
    looked_up = get("hit_chunks", 0) + get("miss_chunks", 0)
    errors = {code: n for code, n in (get("errors") or {}).items() if n}
    return [
        ("server", f"kvdepot {get('version', '?')}, boot {get('boot_id', '?')}"),
        ("state", "ready" if get("ready") else "NOT READY (arena still being prepared)"),
        ("uptime", human_duration(get("uptime_s", 0))),
        (
            "buffer",
            f"{human_bytes(get('used_bytes', 0))} used of {human_bytes(get('arena_bytes', 0))} "
            f"({percent(get('used_bytes', 0), get('arena_bytes', 0))}), "
            f"{human_bytes(get('free_bytes', 0))} free",
        ),
        ("chunks", f"{get('chunks', 0):,} of {get('chunk_tokens', 0)} tokens"),
        ("namespaces", f"{get('namespaces', 0):,}"),
        ("engines", f"{get('engines_connected', 0):,} connected"),
        ("leases held", f"{get('leases_held', 0):,}"),
        ("reservations", f"{get('reservations_open', 0):,} open"),
        ("lookups", f"{get('lookups', 0):,}, hit ratio {percent(get('hit_chunks', 0), looked_up)}"),
        ("  hits", f"{get('hit_chunks', 0):,} chunks, {get('hit_tokens', 0):,} tokens"),
        ("  misses", f"{get('miss_chunks', 0):,} chunks, {get('miss_tokens', 0):,} tokens"),
        (
            "stored",
            f"{get('stored_chunks', 0):,} chunks, {get('stored_tokens', 0):,} tokens, "
            f"{human_bytes(get('stored_bytes', 0))}",
        ),
        (
            "retrieved",
            f"{get('retrieved_chunks', 0):,} chunks, {get('retrieved_tokens', 0):,} tokens, "
            f"{human_bytes(get('retrieved_bytes', 0))}",
        ),
        ("evicted", f"{get('evicted_chunks', 0):,} chunks"),
        (
            "expired",
            f"{get('expired_leases', 0):,} leases, {get('expired_reservations', 0):,} reservations",
        ),
        ("errors", ", ".join(f"{code} {n:,}" for code, n in sorted(errors.items())) or "none"),
        *(row for tenant in get("tenants") or () for row in tenant_rows(tenant)),
        *(row for tier in get("tiers") or () for row in tier_rows(tier)),
    ]


def tenant_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    """A tenant's rows (a server with --tenants): its own buffer, chunks, engines, quotas."""
    get = t.get
    quotas = [f"{name} {human_bytes(get(key, 0))}" for name, key in
              (("disk", "disk_quota_bytes"), ("remote", "remote_quota_bytes")) if get(key)]
    return [
        (f"tenant {get('name', '?')}",
         f"{human_bytes(get('used_bytes', 0))} used of its {human_bytes(get('arena_bytes', 0))} "
         f"buffer, {get('chunks', 0):,} chunks, {get('engines_connected', 0):,} engines"),
        ("  activity",
         f"{get('hit_chunks', 0):,} hits, {get('miss_chunks', 0):,} misses, stored "
         f"{human_bytes(get('stored_bytes', 0))}, {get('evicted_chunks', 0):,} evicted, "
         f"{get('leases_held', 0):,} leases, {get('reservations_open', 0):,} reservations"),
        ("  quotas", ", ".join(quotas) or "buffer only"),
    ]


def tier_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of one storage tier below the buffer (a local disk, a remote store)."""
    get = t.get
    settings = get("settings") or {}
    if "urls" in settings:
        return remote_tier_rows(t)
    policy = [settings.get("write_policy", "?")]
    if settings.get("admit_hits", "0") != "0":
        policy.append(f"admitted after {settings['admit_hits']} hits")
    policy.append(f"O_DIRECT {settings.get('direct_io', '?')}")
    waiting = get("waiting_files", 0)
    return [
        (f"{get('name', 'tier')} tier", f"{settings.get('path', '?')}, " + ", ".join(policy)),
        (
            "  used",
            f"{human_bytes(get('used_bytes', 0))} of {human_bytes(get('capacity_bytes', 0))} "
            f"({percent(get('used_bytes', 0), get('capacity_bytes', 0))}), "
            f"{get('files', 0):,} files"
            + (f" ({waiting:,} waiting for their namespace)" if waiting else ""),
        ),
        (
            "  queue",
            f"{get('copies_in_flight', 0):,} of {get('queue_depth', 0):,} copies in flight, "
            f"{get('dropped_writes', 0):,} writes dropped (queue full), "
            f"{get('not_admitted', 0):,} not admitted",
        ),
        ("  written", f"{get('writes', 0):,} files, {human_bytes(get('written_bytes', 0))}"),
        (
            "  read",
            f"{get('reads', 0):,} files, {human_bytes(get('read_bytes', 0))}, "
            f"expected {human_bytes(get('read_bytes_per_s', 0))}/s",
        ),
        (
            "  prefetch",
            f"{get('prefetch_started', 0):,} chunks started, {get('prefetch_landed', 0):,} "
            f"landed, {get('prefetch_timeouts', 0):,} past their deadline, "
            f"{get('prefetch_skipped', 0):,} skipped (recompute is faster)",
        ),
        (
            "  bad files",
            f"{get('checksum_failures', 0):,} checksum failures, {get('bad_files', 0):,} "
            f"unreadable, {get('temp_files_removed', 0):,} temporary removed (all deleted)",
        ),
        (
            "  I/O errors",
            f"{get('read_errors', 0):,} reads, {get('write_errors', 0):,} writes"
            + (f"; last: {get('last_error')}" if get("last_error") else ""),
        ),
    ]


def remote_tier_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of a remote tier (a Redis/Valkey Cluster shared by the nodes)."""
    get = t.get
    settings = get("settings") or {}
    nodes = get("nodes") or []
    up = sum(1 for n in nodes if n.get("connected"))
    rows = [
        (
            f"{get('name', 'remote')} tier",
            f"{settings.get('urls', '?')}, {settings.get('write_policy', '?')}, TTL "
            f"{settings.get('ttl_s', '?')} s, TLS {settings.get('tls', '?')}, user "
            f"{settings.get('user', '?')}, key prefix {settings.get('key_prefix', '?')}",
        ),
        ("  nodes", f"{up} of {len(nodes)} connected" if nodes else "none known (not connected)"),
    ]
    for n in nodes:
        rows.append((
            f"    {n.get('address', '?')}",
            f"{n.get('role', '?')}, {'up' if n.get('connected') else 'DOWN'}, "
            f"sent {human_bytes(n.get('bytes_sent', 0))}, received "
            f"{human_bytes(n.get('bytes_received', 0))}, {n.get('calls', 0):,} calls, "
            f"{n.get('errors', 0):,} errors"
            + (f" (last: {n['last_error']})" if n.get("last_error") else ""),
        ))
    rows += [
        (
            "  lookups",
            f"{get('probes', 0):,} probes, {get('probe_found', 0):,} chunks found, "
            f"{get('probe_errors', 0):,} failed",
        ),
        (
            "  queue",
            f"{get('copies_in_flight', 0):,} of {get('queue_depth', 0):,} copies in flight, "
            f"{get('dropped_writes', 0):,} writes dropped (queue full)",
        ),
        (
            "  written",
            f"{get('writes', 0):,} chunk ranks, {human_bytes(get('written_bytes', 0))}; "
            f"{get('already_stored', 0):,} found stored already (TTL renewed)",
        ),
        (
            "  read",
            f"{get('reads', 0):,} chunk ranks, {human_bytes(get('read_bytes', 0))}, "
            f"expected {human_bytes(get('read_bytes_per_s', 0))}/s",
        ),
        (
            "  prefetch",
            f"{get('prefetch_started', 0):,} chunks started, {get('prefetch_landed', 0):,} "
            f"landed, {get('prefetch_timeouts', 0):,} past their deadline, "
            f"{get('prefetch_skipped', 0):,} skipped (recompute is faster)",
        ),
        (
            "  errors",
            f"{get('checksum_failures', 0):,} checksum failures, {get('bad_files', 0):,} bad "
            f"manifests (deleted), {get('read_errors', 0):,} reads failed or gone, "
            f"{get('write_errors', 0):,} writes failed"
            + (f"; last: {get('last_error')}" if get("last_error") else ""),
        ),
    ]
    return rows


def format_table(stats: dict[str, Any], url: str) -> str:
    rows = status_rows(stats)
    width = max(len(label) for label, _ in rows)
    lines = [f"kvdepot status of {stats_url(url).removesuffix('/stats')}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def run_status(url: str = DEFAULT_URL, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the server's stats; 0 on success, 1 (with a one-line error on stderr) otherwise."""
    out = out or sys.stdout
    try:
        stats = fetch_stats(url)
    except StatusError as exc:
        print(f"kvdepot status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        out.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    else:
        out.write(format_table(stats, url) + "\n")
    return 0
