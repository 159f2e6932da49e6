"""Time to first token with real vLLM on a GPU: recompute, vLLM's own caches, and kvdepot.

Runs on the GPU machine (vLLM 0.26 from ../shared/tools/vllm-gpu, Qwen3-14B-shaped config,
dummy weights: fine for timing). In one run, for each prompt length:
- recompute: a fresh prompt in a warm engine;
- GPU prefix-cache hit: the same prompt again in that engine;
- kvdepot hit: the same prompt in a *second engine process* that never saw it, loading the
  chunks the first engine stored in the kvdepot server (both processes exit in between); with
  the connector's default load_mode "auto" an idle engine loads synchronously (the copy is
  stream-ordered before the request's forward); mode kvdepot-load-async forces the
  asynchronous path a busy engine takes (the request waits a step for the copy);
- kvdepot disk hit (mode kvdepot-disk, last): the server runs with a disk tier on the local
  disk (write-through); after the other modes it is stopped (SIGTERM) and restarted on the
  same directory with an empty buffer, the page cache is dropped, and a fresh engine's prompts
  come from disk (the server reads the chunk files into its buffer while the connector
  answers vLLM "ask again"). The disk's floor: the prompt's bytes over the raw O_DIRECT read
  rate of chunk-sized files on the same filesystem, measured at the start of the run;
- OffloadingConnector hit: vLLM's own CPU offloading, same prompt after a prefix-cache reset;
- the pinned-copy ceiling: bytes of the prompt's KV over the measured host->GPU pinned rate.
Each TTFT is the wall time of generate(max_tokens=1), median of --repeat runs on distinct
prompts of the same length. The JSON is rewritten after each engine (a run cut short keeps
what it measured).

    source .vllmslim/carry/setup.sh && python3 bench/vllm_gpu_ttft.py --out $OUT/vllm_gpu_ttft.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

QWEN3_14B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 5120,
    "intermediate_size": 17408,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
KV_BYTES_PER_TOKEN = 2 * 40 * 8 * 128 * 2  # K and V, layers, kv heads, head dim, bf16


def prompt(length: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed * 1_000_003 + length)
    return [rng.randrange(1000, 150000) for _ in range(length)]


# --- one engine process ------------------------------------------------------------------------


def engine_main(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(
        model=args.model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        enforce_eager=True,
        gpu_memory_utilization=args.gpu_util,
        max_model_len=args.max_len,
        dtype="bfloat16",
        seed=0,
        max_num_batched_tokens=args.max_batched,
    )
    if args.mode.startswith("kvdepot"):
        kw["kv_transfer_config"] = {
            "kv_connector": "KVDepotConnector",
            "kv_connector_module_path": "kvdepot.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"kvdepot.host": "127.0.0.1", "kvdepot.port": args.port},
        }
        if args.mode == "kvdepot-load-async":  # the load path a busy engine takes
            kw["kv_transfer_config"]["kv_connector_extra_config"]["kvdepot.load_mode"] = "async"
            args.mode = "kvdepot-load"
        if args.mode == "kvdepot-disk":  # ask again until the whole prompt is up from disk
            kw["kv_transfer_config"]["kv_connector_extra_config"]["kvdepot.pending_wait_ms"] = args.pending_wait_ms
    elif args.mode == "offload":
        kw["kv_transfer_config"] = {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": args.offload_bytes},
        }
    trace: list[tuple[float, str, float]] = []
    if args.mode == "kvdepot-load-trace":
        args.mode, args.trace = "kvdepot-load", True
    if args.mode == "kvdepot-load-logonly":
        import logging

        args.mode = "kvdepot-load"
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("TRACE log %(relativeCreated)d %(message)s"))
        logging.getLogger("vllm.kvdepot").addHandler(handler)
        logging.getLogger("vllm.kvdepot").setLevel(logging.DEBUG)
    if args.trace and args.mode.startswith("kvdepot"):
        _trace_connector(trace)
    llm = LLM(**kw)
    sp = SamplingParams(max_tokens=1, temperature=0, detokenize=False)

    def ttft(tokens: list[int]) -> tuple[float, int]:
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], sp, use_tqdm=False)
        return time.perf_counter() - t, int(out[0].num_cached_tokens or 0)

    # Warm up kernels and the connector on prompts nobody measures.
    for length in args.lengths:
        ttft(prompt(length, seed=900))
    results: dict[str, list] = {}
    for length in args.lengths:
        for r in range(args.repeat):
            tokens = prompt(length, seed=r)
            if args.mode == "kvdepot-store":
                results.setdefault(f"recompute_{length}", []).append(ttft(tokens))
                results.setdefault(f"gpu_prefix_hit_{length}", []).append(ttft(tokens))
            elif args.mode == "kvdepot-load":
                trace.clear()
                t0 = time.perf_counter()
                results.setdefault(f"kvdepot_hit_{length}", []).append(ttft(tokens))
                if args.trace:
                    print(f"TRACE {length} tokens, repeat {r}:", flush=True)
                    for t, name, dur in trace:
                        print(f"TRACE   +{(t - t0) * 1e3:7.2f} ms  {name:<32} {dur * 1e3:7.2f} ms", flush=True)
            elif args.mode == "kvdepot-disk":
                results.setdefault(f"kvdepot_disk_hit_{length}", []).append(ttft(tokens))
            elif args.mode == "offload":
                ttft(tokens)
                for _ in range(50):  # the connector may still hold blocks of the last request
                    if llm.reset_prefix_cache():
                        break
                    time.sleep(0.1)
                results.setdefault(f"offload_hit_{length}", []).append(ttft(tokens))
            elif args.mode == "nocache":
                results.setdefault(f"recompute_noconnector_{length}", []).append(ttft(tokens))
    if args.mode == "kvdepot-store":
        time.sleep(args.settle)  # stores are asynchronous: let the last ones commit
    print("RESULT " + json.dumps(results), flush=True)
    del llm


def _trace_connector(trace: list) -> None:
    """Wrap the connector's hooks to record when vLLM calls them and how long each takes."""
    import logging

    from kvdepot.integrations.vllm import KVDepotConnector

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("TRACE log %(relativeCreated)d %(message)s"))
    kv_log = logging.getLogger("vllm.kvdepot")
    kv_log.addHandler(handler)
    kv_log.setLevel(logging.DEBUG)
    for name in ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                 "start_load_kv", "wait_for_save", "get_finished", "request_finished"):
        original = getattr(KVDepotConnector, name)

        def wrapped(self, *a, __original=original, __name=name, **k):
            t = time.perf_counter()
            out = __original(self, *a, **k)
            summary = __name
            if __name in ("get_num_new_matched_tokens", "get_finished"):
                summary += f" -> {out if not isinstance(out, tuple) else tuple(x if not isinstance(x, set) else len(x) for x in out)}"
            trace.append((t, summary[:60], time.perf_counter() - t))
            return out

        setattr(KVDepotConnector, name, wrapped)


# --- the driver --------------------------------------------------------------------------------


def pinned_h2d_gbps(nbytes: int) -> float:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t)
    del host, dev
    torch.cuda.empty_cache()
    return nbytes / statistics.median(samples) / 1e9


def run_engine(mode: str, args: argparse.Namespace, log_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "engine", "--mode", mode, "--model-dir", args.model_dir,
           "--port", str(args.port), "--repeat", str(args.repeat), "--gpu-util", str(args.gpu_util),
           "--max-len", str(args.max_len), "--max-batched", str(args.max_batched),
           "--pending-wait-ms", str(args.pending_wait_ms),
           "--lengths", *map(str, args.lengths)] + (["--trace"] if args.trace else [])
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    started = time.monotonic()
    log_path = log_dir / f"engine-{mode}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, timeout=args.engine_timeout)
    print(f"  engine {mode}: exit {proc.returncode} in {time.monotonic() - started:.0f} s", flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("TRACE"):
            print(line, flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = log_path.read_text()[-3000:]
    raise RuntimeError(f"engine {mode} gave no result (exit {proc.returncode}):\n{tail}")


CHUNK_TOKENS = 256
# The server's default prefill speed for its "load from disk or recompute" choice
# (kvdepot.server.prefetching.PrefetchSettings); this run overrides it to measure the disk path.
DEFAULT_RECOMPUTE_TOKENS_PER_S = 10_000.0


def server_flags(args: argparse.Namespace, disk_dir: str | None) -> list[str]:
    flags = ["--lease-ttl", "120"]
    if disk_dir:
        flags += [
            "--disk-path", disk_dir, "--disk-size", f"{args.disk_size:g}",
            "--disk-write-policy", "write-through",
            "--disk-queue-depth", "1024",  # a 32k prompt commits 128 chunks at once: write all
            "--max-workers", str(args.disk_workers),
            "--prefetch-deadline-ms", "120000",  # a slow disk is measured, not timed out
            "--recompute-tokens-per-s", f"{args.recompute_tokens_per_s:g}",
        ]
    return flags


@contextlib.contextmanager
def start_server(args: argparse.Namespace, log_path: Path, disk_dir: str | None):
    """A kvdepot server for the run, its buffer's pages touched; stopped (SIGTERM) at exit."""
    from server_process import ServerProcess

    log_path.unlink(missing_ok=True)  # ServerProcess appends, and waits for its start line
    with ServerProcess(buffer_gb=args.buffer_gb, log_path=log_path, extra=server_flags(args, disk_dir)) as srv:
        deadline = time.monotonic() + 120
        while "Arena ready" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        yield srv


def run_mode(mode: str, args: argparse.Namespace, log_dir: Path, raw: dict) -> None:
    try:
        got = run_engine(mode, args, log_dir)
        suffix = mode.split("kvdepot-load", 1)[1] if mode.startswith("kvdepot-load-") else ""
        raw.update({key + suffix: value for key, value in got.items()})
    except Exception as exc:  # noqa: BLE001 - report what ran
        print(f"  engine {mode} failed: {exc}", flush=True)


def build_report(args: argparse.Namespace, ceiling: float, raw: dict, disk: dict) -> dict:
    report: dict = {"pinned_h2d_gbps": ceiling, "lengths": args.lengths, "repeat": args.repeat,
                    "modes": args.modes, "raw": raw}
    if disk:
        report["disk"] = disk
    disk_gbps = disk.get("raw", {}).get("best_read_gbps")
    for length in args.lengths:
        row: dict = {}
        for key in ("recompute", "gpu_prefix_hit", "kvdepot_hit", "kvdepot_hit-async",
                    "kvdepot_hit-trace", "offload_hit", "kvdepot_disk_hit"):
            base, _, variant = key.partition("-")
            samples = raw.get(f"{base}_{length}" + (f"-{variant}" if variant else ""))
            if samples:
                row[key] = statistics.median(s[0] for s in samples) * 1e3
                row[key + "_cached"] = [s[1] for s in samples]
        kv_bytes = length * KV_BYTES_PER_TOKEN
        row["copy_floor_ms"] = kv_bytes / (ceiling * 1e9) * 1e3
        if "gpu_prefix_hit" in row:
            row["bound_ms"] = row["gpu_prefix_hit"] + row["copy_floor_ms"]
        if "kvdepot_hit" in row:
            if "bound_ms" in row:
                row["kvdepot_vs_bound"] = row["kvdepot_hit"] / row["bound_ms"]
            if "recompute" in row:
                row["recompute_vs_kvdepot"] = row["recompute"] / row["kvdepot_hit"]
            if "offload_hit" in row:
                row["offload_vs_kvdepot"] = row["offload_hit"] / row["kvdepot_hit"]
        if "recompute" in row:
            row["recompute_tokens_per_s"] = length / (row["recompute"] / 1e3)
        if "kvdepot_disk_hit" in row:
            # What the server reads: the prompt's whole chunks (payload bytes).
            read_bytes = -(-length // CHUNK_TOKENS) * CHUNK_TOKENS * KV_BYTES_PER_TOKEN
            want = max(row.get("kvdepot_hit_cached", [length - 1]))
            row["disk_hit_tokens_ok"] = all(c == want for c in row["kvdepot_disk_hit_cached"])
            if disk_gbps:
                row["disk_read_floor_ms"] = read_bytes / (disk_gbps * 1e9) * 1e3
                row["disk_vs_read_floor"] = row["kvdepot_disk_hit"] / row["disk_read_floor_ms"]
            for other in ("recompute", "kvdepot_hit"):
                if other in row:
                    row[f"disk_vs_{other}"] = row["kvdepot_disk_hit"] / row[other]
        report[str(length)] = row
    if disk:
        # The server's own choice with its default prefill speed: load a chunk from disk only
        # when its bytes over the tier's read speed take less than recomputing its tokens.
        chunk = CHUNK_TOKENS * KV_BYTES_PER_TOKEN
        disk["default_policy_loads_above_gbps"] = chunk * DEFAULT_RECOMPUTE_TOKENS_PER_S / CHUNK_TOKENS / 1e9
    return report


def print_table(report: dict) -> None:
    print(f"\n{'tokens':>7} {'what':<36}{'TTFT ms':>9}{'cached':>8}")
    for length in report["lengths"]:
        row = report[str(length)]
        for key in ("recompute", "gpu_prefix_hit", "kvdepot_hit", "kvdepot_hit-async",
                    "kvdepot_hit-trace", "offload_hit", "kvdepot_disk_hit"):
            if key in row:
                print(f"{length:>7} {key:<36}{row[key]:9.1f}{row[key + '_cached'][0]:8d}")
        if "bound_ms" in row:
            print(f"{length:>7} {'bound: GPU hit + bytes/pinned rate':<36}{row['bound_ms']:9.1f}")
        if "disk_read_floor_ms" in row:
            print(f"{length:>7} {'disk floor: bytes/raw O_DIRECT rate':<36}{row['disk_read_floor_ms']:9.1f}")
    for length in report["lengths"]:
        row = report[str(length)]
        if "kvdepot_vs_bound" in row:
            print(f"{length}: kvdepot hit / bound = {row['kvdepot_vs_bound']:.2f} (target <= 1.1); "
                  f"recompute / kvdepot = {row.get('recompute_vs_kvdepot', float('nan')):.1f}x; "
                  f"OffloadingConnector / kvdepot = {row.get('offload_vs_kvdepot', float('nan')):.2f}x")
        if "kvdepot_disk_hit" in row:
            print(f"{length}: disk hit / disk floor = {row.get('disk_vs_read_floor', float('nan')):.2f}; "
                  f"disk hit / recompute = {row.get('disk_vs_recompute', float('nan')):.2f}; "
                  f"disk hit / buffer hit = {row.get('disk_vs_kvdepot_hit', float('nan')):.1f}; "
                  f"hit tokens as the buffer hit's: {row['disk_hit_tokens_ok']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", nargs="?", default="driver", choices=["driver", "engine"])
    ap.add_argument("--mode", default="")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--port", type=int, default=5555)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-util", type=float, default=0.6)
    ap.add_argument("--max-len", type=int, default=34816)
    ap.add_argument("--max-batched", type=int, default=34816)
    ap.add_argument("--offload-bytes", type=int, default=24 << 30)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--engine-timeout", type=float, default=400)
    ap.add_argument("--buffer-gb", type=float, default=60)  # holds every prompt of a run: no eviction
    ap.add_argument("--modes", nargs="+", default=["kvdepot-store", "kvdepot-load", "offload"])
    ap.add_argument("--trace", action="store_true", help="print when the connector's hooks run")
    disk = ap.add_argument_group("mode kvdepot-disk")
    disk.add_argument("--disk-size", type=float, default=32.0, help="GB of the disk tier")
    disk.add_argument("--disk-dirs", nargs="+", default=["/var/tmp", "/tmp", str(REPO.parent), "/root"],
                      help="where the disk tier may go: the first on a disk (not tmpfs) with room")
    disk.add_argument("--disk-workers", type=int, default=4, help="the server's --max-workers")
    disk.add_argument("--raw-files", type=int, default=48, help="chunk-sized files of the raw baseline")
    disk.add_argument("--recompute-tokens-per-s", type=float, default=1.0,
                      help="the server's setting: low, so that it always loads from disk")
    disk.add_argument("--pending-wait-ms", type=float, default=120_000.0,
                      help="how long the connector asks again for chunks coming up from disk")
    ap.add_argument("--out", default=str(REPO / "bench/results/vllm_gpu_ttft.json"))
    args = ap.parse_args()
    if args.role == "engine":
        engine_main(args)
        return
    if "kvdepot-disk" in args.modes[:-1]:
        ap.error("kvdepot-disk runs last (it restarts the server)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent
    model_dir = Path(tempfile.mkdtemp(prefix="qwen3-14b-shape-"))
    (model_dir / "config.json").write_text(json.dumps(QWEN3_14B))
    args.model_dir = str(model_dir)
    ceiling = pinned_h2d_gbps(max(args.lengths) * KV_BYTES_PER_TOKEN)
    print(f"pinned host->GPU: {ceiling:.1f} GB/s", flush=True)

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    raw: dict[str, list] = {}
    disk_info: dict = {}

    def save() -> None:
        out.write_text(json.dumps(build_report(args, ceiling, raw, disk_info), indent=2))

    if args.modes[-1] == "kvdepot-disk":
        from ttft_disk import run_disk_modes

        run_disk_modes(args, log_dir, raw, disk_info, save, start_server, run_mode,
                       CHUNK_TOKENS * KV_BYTES_PER_TOKEN)
    else:
        with start_server(args, log_dir / "kvdepot-server.log", None) as srv:
            args.port = srv.port
            for mode in args.modes:
                run_mode(mode, args, log_dir, raw)
                save()
    save()
    print_table(build_report(args, ceiling, raw, disk_info))


if __name__ == "__main__":
    main()
