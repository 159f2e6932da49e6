"""Multi-round conversations with vLLM's GPU KV cache full, and partial prefix hits (issue 13).

Real vLLM, one engine process per system, one at a time. On the GPU machine: vLLM 0.26 from
../shared/tools/vllm-gpu, a Qwen3-14B-shaped config with dummy weights (fine for timing). On
the CPU build: ``--model tiny``, a seeded random tiny Llama, to run it end to end. The JSON is
rewritten after each engine (and each engine rewrites its own after each round), so a run cut
short keeps what it measured.

Mode multi-round: U users, each a fixed random context of C tokens. In round r (1..R) user
u's prompt is that context, the question and answer of every earlier round and the question of
round r; questions and answers are fixed random T-token turns, never model output, so every
system gets the same prompts. A round's U prompts go in one generate call with max_tokens 1
(the answers are given: generating them would only add decode time). vLLM's GPU KV cache is
G GiB (kv_cache_memory_bytes). Systems:
- gpu-all: no connector, a GPU cache that holds everything (nothing is evicted): the round's
  compute with every earlier token already on the GPU;
- nocache: no connector (vLLM's own prefix cache on) in G GiB: what the evictions cost;
- offload: vLLM's OffloadingConnector, its CPU cache sized for the whole working set;
- kvdepot: the kvdepot connector and a fresh kvdepot server whose buffer holds the working set.
Per round: the generate call's wall time, prompt tokens, num_cached_tokens (vLLM's cache and
the connector's), the tokens the connector gave vLLM (update_state_after_alloc), the connector's
own statistics, and with --trace (kvdepot) a per-step trace (bench/multi_round_trace.py). The
floor of a round: the bytes it loaded (connector tokens x KV bytes per token) over the host->GPU
rate measured at the start (pinned memory; host memcpy on a CPU build), plus gpu-all's time for
the same round. Each engine first warms up on prompts outside the conversations, once loaded
through its connector (after a prefix-cache reset), so that no JIT compile lands in a round.

Mode partial-hit: P-token prompts whose first H tokens are cached, medians of --repeat,
each timed alone (generate, max_tokens 1) after --pause seconds of quiet:
- gpu: no connector: vLLM's own GPU prefix-cache hit (the H-token prefix ran just before in the
  same engine), and recompute (a fresh prompt);
- offload: the prefix ran, vLLM's prefix cache was reset: H tokens come from its CPU cache;
- kvdepot-store, then kvdepot: one engine stores the prefixes, a fresh engine process loads them.

    source .vllmslim/carry/setup.sh && python3 bench/vllm_multi_round.py --out $OUT/mr.json
    .venv/bin/python bench/vllm_multi_round.py --model tiny --users 3 --context 512 --turn 32 \\
        --rounds 3 --gpu-kv-gib 0.001 --out /tmp/mr/mr.json       # CPU build, all systems
"""

from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "bench" / "multi_round_engine.py"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from vllm_gpu_ttft import KV_BYTES_PER_TOKEN, QWEN3_14B, pinned_h2d_gbps  # noqa: E402

MODES = {"multi-round": ("gpu-all", "offload", "kvdepot", "nocache"),  # default order: the most needed first
         "partial-hit": ("gpu", "offload", "kvdepot-store", "kvdepot")}
MARGIN = 1.15  # CPU caches and the gpu-all GPU cache: the working set plus this share
WARMUP_TOKENS = 1024  # per user, capped at the context length
OFFLOAD_SHM = "/dev/shm/vllm_offload_*.mmap"  # vLLM 0.26's OffloadingConnector CPU cache


def host_copy_gbps(nbytes: int) -> float:
    """The CPU build's stand-in for the pinned rate: one large host memcpy."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - t)
    return nbytes / statistics.median(samples) / 1e9


def kv_config(system: str, args, port: int | None, working_bytes: int) -> dict | None:
    if system in ("gpu-all", "nocache", "gpu"):
        return None
    if system == "offload":
        return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"cpu_bytes_to_use": args.offload_bytes or int(working_bytes * MARGIN)}}
    return {"kv_connector": "KVDepotConnector", "kv_connector_module_path": "kvdepot.integrations.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {"kvdepot.host": "127.0.0.1", "kvdepot.port": port}}


def run_engine(system: str, spec: dict, args, prefix: Path, into: dict) -> None:
    """Run one engine process; its results (what it wrote, even when stopped early) go to
    ``into[system]``. Files: ``prefix``-``system``.log, .spec.json, .result.json."""
    result_path = Path(f"{prefix}-{system}.result.json")
    result_path.unlink(missing_ok=True)
    spec = dict(spec, system=system, result=str(result_path),
                trace=args.trace and system == "kvdepot" and args.mode == "multi-round")
    spec_path = Path(f"{prefix}-{system}.spec.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=f"{REPO}:{REPO / 'bench'}:{os.environ.get('PYTHONPATH', '')}")
    log_path = Path(f"{prefix}-{system}.log")
    started = time.monotonic()
    shm_before = set(glob.glob(OFFLOAD_SHM))
    rc: object = "stopped"
    try:
        with open(log_path, "w") as log:
            # subprocess.run kills the engine on any exception here (a timeout, SIGTERM).
            rc = subprocess.run([sys.executable, str(ENGINE), str(spec_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, timeout=args.engine_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        print(f"  engine {system}: exit {rc} in {time.monotonic() - started:.0f} s", flush=True)
        res = json.loads(result_path.read_text()) if result_path.exists() else {"rounds": [], "samples": {}}
        if rc != 0:
            res["error"] = f"exit {rc}: " + log_path.read_text(errors="replace")[-1500:]
        # The OffloadingConnector's CPU cache is a /dev/shm file its shutdown removes; an engine
        # killed or slow to shut down leaves it there, and the next engine or server would find
        # /dev/shm full.
        for path in set(glob.glob(OFFLOAD_SHM)) - shm_before:
            os.unlink(path)
            res.setdefault("removed_after_exit", []).append(path)
        into[system] = res


class Server:
    """A fresh kvdepot server (its buffer's pages touched before any engine maps it)."""

    def __init__(self, buffer_gb: float, log_path: Path):
        from server_process import ServerProcess

        log_path.unlink(missing_ok=True)  # ServerProcess appends, and waits for its start line
        self.proc = ServerProcess(buffer_gb=buffer_gb, log_path=log_path, extra=["--lease-ttl", "120"]).start(60)
        try:
            deadline = time.monotonic() + 300
            while "Arena ready" not in self.proc.log() and time.monotonic() < deadline:
                time.sleep(0.5)
        except BaseException:  # SIGTERM while waiting: no server left behind
            self.stop()
            raise
        if "Arena ready" not in self.proc.log():
            print(f"  server: its buffer is still being touched after 300 s (see {log_path})", flush=True)

    def stop(self) -> None:
        self.proc.__exit__(None, None, None)


def summarize(report: dict) -> dict:
    res, rate, kv = report["systems"], report["copy_gbps"], report["kv_bytes_per_token"]
    out: dict = {}
    if report["mode"] == "partial-hit":
        samples = {k: v for r in res.values() for k, v in r.get("samples", {}).items()}
        out["ttft_ms"] = {k: statistics.median(s[0] for s in v) * 1e3 for k, v in samples.items()}
        out["cached_tokens"] = {k: [s[1] for s in v] for k, v in samples.items()}
        base = out["ttft_ms"].get("gpu_prefix_hit")
        out["vs_gpu_prefix_hit"] = {k: v / base for k, v in out["ttft_ms"].items()} if base else {}
        out["copy_floor_ms"] = report["params"]["cached"] * kv / (rate * 1e9) * 1e3
        return out
    want = report["params"]["rounds"]
    gpu_all = res.get("gpu-all", {}).get("rounds", [])
    for name, r in res.items():
        rounds = r.get("rounds", [])
        later = rounds[1:]
        s = {"round_s": [x["wall_s"] for x in rounds], "complete": len(rounds) == want,
             "after_first_s": sum(x["wall_s"] for x in later),
             "cached_tokens_after_first": sum(x["cached_tokens"] for x in later),
             "external_tokens_after_first": sum(x["external_tokens"] for x in later),
             "loaded_gb_after_first": sum(x["external_tokens"] for x in later) * kv / 1e9}
        if name in ("offload", "kvdepot") and len(gpu_all) == want and s["complete"]:
            s["floor_s"] = sum(g["wall_s"] + x["external_tokens"] * kv / (rate * 1e9)
                               for g, x in zip(gpu_all[1:], later))
            s["vs_floor"] = s["after_first_s"] / s["floor_s"]
        out[name] = s
    off = out.get("offload")
    for s in out.values():
        if off and off["complete"] and s["complete"] and off["after_first_s"] > 0:
            s["vs_offload"] = s["after_first_s"] / off["after_first_s"]
    return out


def print_table(report: dict) -> None:
    summ = report["summary"]
    if report["mode"] == "partial-hit":
        p = report["params"]
        print(f"\npartial hit: {p['total']}-token prompts, first {p['cached']} cached, medians of {p['repeat']}")
        print(f"{'what':<16}{'TTFT ms':>9}{'/ GPU hit':>10}  cached tokens")
        for key, ms in summ["ttft_ms"].items():
            ratio = summ["vs_gpu_prefix_hit"].get(key)
            print(f"{key:<16}{ms:9.1f}{format(ratio, '10.3f') if ratio else '':>10}  {summ['cached_tokens'][key]}")
        print(f"copy of the cached part at {report['copy_gbps']:.1f} GB/s: {summ['copy_floor_ms']:.1f} ms")
        for name, r in report["systems"].items():
            if r.get("error"):
                print(f"{name}: failed ({r['error'].split(':', 1)[0]})")
        return

    def f(v, spec: str) -> str:
        return format(v, spec) if v is not None else format("-", ">" + spec.rstrip("dfs").split(".")[0])

    print(f"\n{'system':<9}{'round 1 s':>10}{'rounds 2+ s':>12}{'per round (2+)':>24}{'cached 2+':>11}"
          f"{'loaded GB':>10}{'floor s':>9}{'/offload':>9}{'/floor':>8}{'KV tokens':>10}{'start s':>8}")
    for name, s in summ.items():
        r = report["systems"][name]
        error = r.get("error")
        err = f" (failed: {error.split(':', 1)[0]})" if error else ""
        rounds = s["round_s"]
        print(f"{name:<9}{f(rounds[0] if rounds else None, '10.2f')}{f(s['after_first_s'], '12.2f')}"
              f"{' '.join(f'{x:.2f}' for x in rounds[1:]):>24}{s['cached_tokens_after_first']:>11}"
              f"{s['loaded_gb_after_first']:10.2f}{f(s.get('floor_s'), '9.2f')}{f(s.get('vs_offload'), '9.2f')}"
              f"{f(s.get('vs_floor'), '8.2f')}{f(r.get('kv_cache_tokens'), '10d')}{f(r.get('startup_s'), '8.0f')}{err}")
    later = report["systems"].get("kvdepot", {}).get("rounds", [])[1:]
    if later and not all(x["external_tokens"] > 0 for x in later):
        print("WARNING: kvdepot loaded nothing in some round after the first")
    for name, r in report["systems"].items():
        for x in r.get("rounds", []):
            t = x.get("trace", {}).get("summary")
            if t:
                print(f"trace {name} round {x['round']}: " + ", ".join(
                    f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()))


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="multi-round")
    ap.add_argument("--systems", nargs="+", help="in run order; default: every system of the mode")
    ap.add_argument("--model", choices=["qwen3-14b", "tiny"], default="qwen3-14b",
                    help="qwen3-14b: its shape, dummy weights (GPU); tiny: a seeded random tiny Llama (CPU build)")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--context", type=int, default=16384, help="tokens of each user's context")
    ap.add_argument("--turn", type=int, default=128, help="tokens of each question and each answer")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--gpu-kv-gib", type=float, default=12.0, help="vLLM's KV cache, GiB (kv_cache_memory_bytes)")
    ap.add_argument("--max-tokens", type=int, default=1, help="tokens generated per prompt")
    ap.add_argument("--max-batched", type=int, default=16384, help="vLLM's max_num_batched_tokens")
    ap.add_argument("--trace", action="store_true", help="per-step trace of the kvdepot engine (multi-round)")
    ap.add_argument("--repeat", type=int, default=3, help="(partial-hit) prompts per median")
    ap.add_argument("--partial-tokens", type=int, default=32768, help="(partial-hit) prompt length")
    ap.add_argument("--cached-tokens", type=int, default=16384, help="(partial-hit) cached prefix length")
    ap.add_argument("--pause", type=float, default=1.0, help="(partial-hit) quiet seconds before each timed prompt")
    ap.add_argument("--settle", type=float, default=3.0, help="(partial-hit) seconds for the last stores")
    ap.add_argument("--buffer-gb", type=float, help=f"kvdepot buffer, GB (default: the working set x {MARGIN})")
    ap.add_argument("--offload-bytes", type=int, help="OffloadingConnector cpu_bytes_to_use (default: same)")
    ap.add_argument("--engine-timeout", type=float, default=420.0, help="seconds per engine process")
    ap.add_argument("--out", default=str(REPO / "bench/results/vllm_multi_round.json"))
    args = ap.parse_args()
    systems = args.systems or list(MODES[args.mode])
    bad = [s for s in systems if s not in MODES[args.mode]]
    if bad:
        ap.error(f"--systems {bad}: mode {args.mode} has {list(MODES[args.mode])}")
    if min(args.users, args.context, args.turn, args.max_tokens, args.max_batched, args.repeat) < 1:
        ap.error("--users, --context, --turn, --max-tokens, --max-batched and --repeat must be >= 1")
    if args.rounds < 2 or args.gpu_kv_gib <= 0:
        ap.error("--rounds must be >= 2 (the measure is rounds 2..R) and --gpu-kv-gib > 0")
    if not 0 < args.cached_tokens < args.partial_tokens:
        ap.error("--cached-tokens must be between 0 and --partial-tokens")
    if args.mode == "partial-hit" and "kvdepot" in systems and "kvdepot-store" not in systems[:systems.index("kvdepot")]:
        ap.error("partial-hit: kvdepot loads what kvdepot-store stored: run kvdepot-store before it")

    signal.signal(signal.SIGTERM, _stop)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Engine and server logs, specs and results beside the JSON, in a folder of their own (the
    # GPU suite sends back only the top folder's JSON files, and every log in one archive).
    log_dir = out.parent / f"{out.stem}-logs"
    log_dir.mkdir(exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="kvdepot-mr-model-"))
    atexit.register(shutil.rmtree, model_dir, True)
    if args.model == "tiny":
        import vllm_support as vs

        vs.write_tiny_llama(model_dir, seed=0)
        t = vs.TINY_LLAMA
        kv_per_token = 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * t["head_dim"] * 2
        vocab, load_format = (10, t["vocab_size"]), "auto"
    else:
        (model_dir / "config.json").write_text(json.dumps(QWEN3_14B))
        kv_per_token, vocab, load_format = KV_BYTES_PER_TOKEN, (1000, 150000), "dummy"

    chunk = 256  # the server's default chunk: stores round to whole chunks
    if args.mode == "multi-round":
        longest = args.context + (2 * args.rounds - 1) * args.turn
        warmup = min(args.context, WARMUP_TOKENS)
        workload = dict(users=args.users, context=args.context, turn=args.turn, rounds=args.rounds,
                        warmup=warmup, vocab=vocab)
        working_tokens = args.users * (longest + warmup + 16 + 2 * chunk)
    else:
        longest = args.partial_tokens
        workload = dict(total=args.partial_tokens, cached=args.cached_tokens, repeat=args.repeat,
                        pause=args.pause, settle=args.settle, vocab=vocab)
        working_tokens = (args.repeat + 1) * args.partial_tokens  # what one engine stores
    working_bytes = working_tokens * kv_per_token
    max_model_len = -(-(longest + args.max_tokens + 16) // chunk) * chunk
    buffer_gb = args.buffer_gb or max(working_bytes * MARGIN / 1e9, 0.05)
    g_bytes = int(args.gpu_kv_gib * (1 << 30))

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    probe = min(max(longest * kv_per_token, 64 << 20), 4 << 30)
    rate = pinned_h2d_gbps(probe) if cuda else host_copy_gbps(probe)
    print(f"{'pinned host->GPU' if cuda else 'host memcpy (no GPU)'}: {rate:.1f} GB/s; working set "
          f"{working_bytes / 1e9:.2f} GB; kvdepot buffer {buffer_gb:.2f} GB", flush=True)
    report: dict = {"mode": args.mode, "model": args.model, "params": dict(vars(args), **workload),
                    "systems_order": systems, "kv_bytes_per_token": kv_per_token, "copy_gbps": rate,
                    "copy_kind": "pinned host->GPU" if cuda else "host memcpy (CPU build)",
                    "working_set_bytes": working_bytes, "buffer_gb": buffer_gb, "systems": {}}

    def save() -> None:
        report["summary"] = summarize(report)
        out.write_text(json.dumps(report, indent=1))

    base = dict(mode=args.mode, model_dir=str(model_dir), load_format=load_format, max_model_len=max_model_len,
                max_batched=args.max_batched, max_tokens=args.max_tokens, workload=workload)
    server = None
    try:
        for system in systems:
            kvd = system.startswith("kvdepot")
            # multi-round: a fresh server per engine (round 1 stores into an empty one);
            # partial-hit: kvdepot-store's chunks must outlive it, for kvdepot.
            if server is not None and (not kvd or args.mode == "multi-round"):
                server.stop()
                server = None
            if kvd and server is None:
                server = Server(buffer_gb, log_dir / f"server-{system}.log")
            port = server.proc.port if server is not None else None
            kv_bytes = max(g_bytes, int(working_bytes * MARGIN)) if system == "gpu-all" else g_bytes
            spec = dict(base, kv_cache_bytes=kv_bytes, kv_transfer_config=kv_config(system, args, port, working_bytes))
            run_engine(system, spec, args, log_dir / "engine", report["systems"])
            save()
    finally:  # also on SIGTERM (a stage's time limit): no engine or server is left behind
        if server is not None:
            server.stop()
        save()
    print_table(report)


if __name__ == "__main__":
    main()
