"""What the soak checks at the end: the vLLM engine's outputs against the reference engine's,
the synthetic clients' counters, the server's memory over time, and the server after every
client is gone (no lease or reservation left, its books consistent, every chunk it serves
byte-exact: ``audit``)."""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import vllm_support as vs  # noqa: E402
from soak_data import NAMESPACES, PromptTree, chunk_bytes, first_difference  # noqa: E402

MAX_LISTED = 20  # mismatches listed in the report; all are counted


# --- the vLLM engine's outputs --------------------------------------------------------------


def tolerance(reference: dict[str, Any]) -> float:
    """The log-prob tolerance for outputs whose computation shape no reference has: 4x the
    largest gap between the reference's shapes of one batch (full prefill, every whole chunk
    cached, the system prompts cached), at least 0.01 (batch-shape noise on the CPU build)."""
    pairs = [(b["full"][i], b[shape][i]) for b in reference["batches"]
             for shape in ("hit", "partial") for i in range(len(b["full"]))]
    return vs.noise_floor(pairs, minimum=0.01)


def close_enough(got: dict[str, Any], want: dict[str, Any], tol: float) -> bool:
    """vllm_support.assert_close_output as a predicate."""
    try:
        vs.assert_close_output(got, want, tol)
        return True
    except AssertionError:
        return False


def compare_engine_outputs(reference: dict[str, Any], lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge every prompt of every round against the reference engine's output of the same
    batch: its own hit when every whole chunk of every prompt was loaded, else its full
    prefill. Equal tokens and log-probs within ``tolerance`` (a greedy choice may differ only
    where the reference's was a near tie); wrong KV moves log-probs by ~1. Bit-equal outputs
    are counted, not required: KV loaded was computed in whatever batch and cached length the
    round that stored it had, and a lookup answered late (the server stopped or restarting)
    makes vLLM prefill a batch's prompts over several steps; both move the last bits."""
    tol = tolerance(reference)
    counts: Counter[str] = Counter()
    bad: list[dict[str, Any]] = []
    max_gap = 0.0
    for line in lines:
        ref = reference["batches"][line["batch"]]
        outs = line["outputs"]
        cached = [o["num_cached_tokens"] for o in outs]
        whole = [len(p) // 256 * 256 for p in ref["prompts"]]
        counts["rounds"] += 1
        counts["prompts"] += len(outs)
        counts["cached_tokens"] += sum(cached)
        counts["prompt_tokens"] += sum(len(p) for p in ref["prompts"])
        if all(c == 0 for c in cached):
            shape, want = "none_loaded", ref["full"]
        elif cached == whole:
            shape, want = "all_loaded", ref["hit"]
        else:
            shape, want = "some_loaded", ref["full"]
        counts[f"rounds_{shape}"] += 1
        for i, (got, ref_out) in enumerate(zip(outs, want)):
            same = got["tokens"] == ref_out["tokens"] and got["logprobs"] == ref_out["logprobs"]
            ok = same or close_enough(got, ref_out, tol)
            max_gap = max(max_gap, vs.logprob_gap(got, ref_out))
            counts[f"bit_equal_{shape}" if same else "within_tolerance" if ok else "mismatches"] += 1
            if not ok and len(bad) < MAX_LISTED:
                bad.append({"incarnation": line["incarnation"], "round": line["round"],
                            "batch": line["batch"], "prompt": i, "shape": shape, "cached": cached,
                            "gap": vs.logprob_gap(got, ref_out), "tokens": got["tokens"],
                            "want_tokens": ref_out["tokens"]})
    counts["bit_equal"] = sum(v for k, v in counts.items() if k.startswith("bit_equal_"))
    return {"tolerance": tol, "max_gap": max_gap, **dict(sorted(counts.items())),
            "mismatches": counts["mismatches"], "mismatch_examples": bad}


# --- the synthetic clients' counters --------------------------------------------------------


def client_totals(out_dir: Path) -> dict[str, Any]:
    """Every incarnation's last counters, summed; the mismatches each one wrote."""
    totals: Counter[str] = Counter()
    examples: dict[str, str] = {}
    incarnations = 0
    for path in sorted(out_dir.glob("stats-*.json")):
        stats = json.loads(path.read_text())
        totals.update(stats["counts"])
        for kind, message in stats.get("error_examples", {}).items():
            examples.setdefault(kind, message)
        incarnations += 1
    mismatch_file = out_dir / "mismatches.jsonl"
    mismatches = [json.loads(x) for x in mismatch_file.read_text().splitlines()] if mismatch_file.exists() else []
    errors = {k.split(":", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("error:")}
    slots = {k.split(":", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("slot:")}
    plain = {k: v for k, v in sorted(totals.items()) if ":" not in k}
    plain["mismatches"] = max(plain.get("mismatches", 0), len(mismatches))
    return {"incarnations_reporting": incarnations, **plain, "reserve_status": slots,
            "errors_by_kind": errors, "error_examples": examples, "mismatch_examples": mismatches[:MAX_LISTED]}


# --- memory ---------------------------------------------------------------------------------


def memory_trend(samples: list[dict[str, Any]], warmup_s: float, window_s: float) -> dict[str, Any]:
    """The server's resident memory in its longest-lived boot: the median of the first
    ``window_s`` after ``warmup_s`` against the median of its last ``window_s``. RSS counts
    the buffer's pages (shared memory, constant once touched); ``anon`` is the process's own."""
    by_boot: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_boot.setdefault(s["incarnation"], []).append(s)
    if not by_boot:
        return {"judged": False, "why": "no samples"}
    boot, boot_samples = max(by_boot.items(), key=lambda kv: kv[1][-1]["t"] - kv[1][0]["t"])
    t0, t_end = boot_samples[0]["t"], boot_samples[-1]["t"]
    first = [s for s in boot_samples if t0 + warmup_s <= s["t"] < t0 + warmup_s + window_s]
    last = [s for s in boot_samples if s["t"] >= t_end - window_s]
    out: dict[str, Any] = {"incarnation": boot, "lived_s": round(t_end - t0, 1),
                           "warmup_s": warmup_s, "window_s": window_s}
    if t_end - t0 < warmup_s + 2 * window_s or not first or not last:
        return {**out, "judged": False, "why": "the longest boot is shorter than warm-up + 2 windows"}
    for field in ("rss_mb", "anon_mb"):
        a = statistics.median(s[field] for s in first)
        b = statistics.median(s[field] for s in last)
        out[field] = {"first": round(a, 2), "last": round(b, 2), "growth": round(b - a, 2)}
    minutes: dict[int, list[float]] = {}
    for s in boot_samples:
        minutes.setdefault(int((s["t"] - t0) // 60), []).append(s["anon_mb"])
    out["anon_mb_median_per_minute"] = [round(statistics.median(v), 2) for _, v in sorted(minutes.items())]
    out["judged"] = True
    return out


def boot_summaries(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per server boot: how long it was sampled, its RSS and anon memory at start and peak."""
    by_boot: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_boot.setdefault(s["incarnation"], []).append(s)
    return [{"incarnation": k, "sampled_s": round(v[-1]["t"] - v[0]["t"], 1),
             "rss_mb_first": v[0]["rss_mb"], "rss_mb_max": max(s["rss_mb"] for s in v),
             "anon_mb_first": v[0]["anon_mb"], "anon_mb_max": max(s["anon_mb"] for s in v),
             "anon_mb_last": v[-1]["anon_mb"]} for k, v in sorted(by_boot.items())]


# --- the server at the end ------------------------------------------------------------------


def http_stats(http_port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/stats", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def wait_for_no_leases(http_port: int, timeout: float) -> dict[str, Any]:
    """Poll /stats until no engine, lease or reservation is left (or ``timeout``)."""
    start = time.monotonic()
    stats = None
    while time.monotonic() - start < timeout:
        stats = http_stats(http_port)
        if stats and not (stats["leases_held"] or stats["reservations_open"] or stats["engines_connected"]):
            break
        time.sleep(0.2)
    keys = ("leases_held", "reservations_open", "engines_connected")
    return {"seconds": round(time.monotonic() - start, 2),
            **({k: stats[k] for k in keys} if stats else {"stats": None})}


def books_consistent(stats: dict[str, Any]) -> list[str]:
    """What the server's /stats must satisfy once it is idle; the failures, if any."""
    bad = []
    if stats["used_bytes"] + stats["free_bytes"] != stats["arena_bytes"]:
        bad.append(f"used {stats['used_bytes']} + free {stats['free_bytes']} != arena {stats['arena_bytes']}")
    if stats["errors"].get("INTERNAL"):
        bad.append(f"{stats['errors']['INTERNAL']} INTERNAL errors")
    for tier in stats.get("tiers", []):
        if tier["used_bytes"] > tier["capacity_bytes"]:
            bad.append(f"tier {tier['name']} holds {tier['used_bytes']} > {tier['capacity_bytes']}")
        if tier["copies_in_flight"]:
            bad.append(f"tier {tier['name']}: {tier['copies_in_flight']} copies in flight when idle")
        if tier["checksum_failures"]:
            bad.append(f"tier {tier['name']}: {tier['checksum_failures']} checksum failures")
    return bad


def audit(port: int, tree_seed: int, pending_wait_s: float = 5.0) -> dict[str, Any]:
    """Every prompt of every synthetic namespace, looked up with a lease (waiting out chunks
    pending from disk): every rank's slot of every hit chunk must hold its key's bytes, and
    the hits must be prefix-closed per rank (an Acquire of each rank reaches at least as far).
    Returns counts; ``mismatches`` must be 0."""
    from kvdepot.client import KVDepotClient

    counts: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    client = KVDepotClient("127.0.0.1", port, engine_id="soak-audit", timeout_ms=5000, prefault=False)
    try:
        assert client.connect(), f"audit: no server: {client.last_error}"
        for i, n in enumerate(NAMESPACES):
            ns = client.register(n.model, n.geometry, n.world_size, n.salt)
            hit_keys: set[bytes] = set()
            for prompt in PromptTree(tree_seed + i).prompts:
                keys = client.chunk_keys(ns, prompt)
                result = client.lookup(ns, keys, lease_ms=30_000)
                deadline = time.monotonic() + pending_wait_s
                while result.pending and time.monotonic() < deadline:
                    time.sleep(0.02)
                    again = client.lookup(ns, keys, lease_ms=30_000)
                    if result.lease:
                        client.release([result.lease])
                    result = again
                counts["lookups"] += 1
                arena = client.arena(result.epoch)
                for rank in range(n.world_size):
                    for key, off in zip(keys, result.rank_offsets(rank)):
                        at = first_difference(arena.slot(off, ns.slot_bytes), chunk_bytes(key, rank, ns.slot_bytes))
                        counts["verified_slots"] += 1
                        if at >= 0:
                            counts["mismatches"] += 1
                            if len(examples) < MAX_LISTED:
                                examples.append({"namespace": n.label, "key": key.hex(), "rank": rank, "byte": at})
                    acquired = client.acquire(ns, rank, keys, lease_ms=30_000)
                    if len(acquired.offsets) < result.hit_chunks:
                        counts["acquire_shorter_than_lookup"] += 1
                    if acquired.lease:
                        client.release([acquired.lease])
                hit_keys.update(keys[: result.hit_chunks])
                if result.lease:
                    client.release([result.lease])
            counts[f"chunks:{n.label}"] = len(hit_keys)
    finally:
        client.close()
    return {**dict(counts), "mismatches": counts["mismatches"], "mismatch_examples": examples}


def server_log_findings(log_paths: list[Path]) -> dict[str, int]:
    """Lines of the server's logs (every boot) that name a bug or a repair."""
    patterns = {"traceback": "Traceback", "internal_error": "internal error", "error_lines": " ERROR ",
                "replaced_stale_segment": "Replaced a stale shared-memory segment"}
    found = Counter()
    for path in log_paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        for name, pattern in patterns.items():
            found[name] += text.count(pattern)
    return dict(found)


def engine_log_findings(log_paths: list[Path]) -> dict[str, int]:
    """The connector's warnings and errors in the engines' logs (every start), by message
    with its numbers blanked out, and the tracebacks (but for the one vLLM logs at every
    start without a tokenizer, counted apart)."""
    found: Counter[str] = Counter()
    for path in log_paths:
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if "Traceback" in line:
                known = any("Tokenizer not available when `skip_tokenizer_init=True`" in x for x in lines[i : i + 30])
                found["vLLM's tokenizer warm-up notice" if known else "Traceback"] += 1
            elif "kvdepot" in line and (" WARNING " in line or " ERROR " in line):
                level = "ERROR" if " ERROR " in line else "WARNING"
                message = re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:140]
                found[f"{level}: {message}"] += 1
    return dict(found.most_common())
