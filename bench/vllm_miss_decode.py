"""What the kvdepot connector costs when it cannot help: misses, and a busy engine's decode (issue 13).

Real vLLM, two engine processes alive at once on the same device, the same configuration but
for the connector: ``none`` (no connector) and ``kvdepot`` (the connector, a kvdepot server of
its own). They take turns on the same prompts (fresh random tokens: a miss everywhere, and
vLLM's own prefix cache never hits), the order alternating from one pair to the next, so that
both sides of a ratio see the same machine; before each kvdepot turn the server is emptied
(POST /admin/clear), and after it the turn waits until the connector's stores are over, so
that they never run into the other engine's turn. Cases:
- ``ttft``: one prompt of L tokens, generate(max_tokens=1): the connector looks up, misses,
  computes, and stores the prompt (asynchronously, after the step);
- ``batch``: B prompts of L tokens in one generate(max_tokens=1): prompt tokens per second;
  the kvdepot side also reports how long its stores went on after generate returned;
- ``decode``: a busy engine: C requests at a time, N in all, each a P-token prompt and a
  seeded random number of generated tokens (ignore_eos); a new request arrives whenever one
  finishes, so new prompts are computed and stored while the others decode. Output tokens
  per second over the whole run, and the engine's step cadence (interval between
  schedule() calls) in steps that only decode, with and without stores in flight.
Every figure is a ratio against ``none`` in the same run: ratio of medians and the median of
the paired ratios. On the GPU machine: vLLM 0.26 from ../shared/tools/vllm-gpu, a
Qwen3-14B-shaped config with dummy (random) weights; ``--model tiny`` (a seeded random tiny
Llama) runs it end to end on the CPU build. The JSON is rewritten after each pair. The engine
processes run bench/multi_round_engine.py's serve_main.

    source .vllmslim/carry/setup.sh && python3 bench/vllm_miss_decode.py --cases ttft batch --out $OUT/m.json
    .venv/bin/python bench/vllm_miss_decode.py --model tiny --ttft-lengths 512 --batch-prompts 3 \\
        --batch-len 512 --decode-concurrency 4 --decode-requests 8 --decode-prompt 256 \\
        --decode-tokens 8 24 --kv-gib 0.01 --max-batched 2048 --out /tmp/md/md.json     # CPU build
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "bench" / "multi_round_engine.py"  # serve_main
SYSTEMS = ("none", "kvdepot")
CASES = ("ttft", "batch", "decode")


# --- the driver -----------------------------------------------------------------------------


class Engine:
    """An engine process (multi_round_engine.serve_main) and its command pipe."""

    def __init__(self, system: str, spec: dict, log_dir: Path):
        self.system = system
        spec_path = log_dir / f"engine-{system}.spec.json"
        spec_path.write_text(json.dumps(spec))
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   PYTHONPATH=f"{REPO}:{REPO / 'bench'}:{os.environ.get('PYTHONPATH', '')}")
        self.log_path = log_dir / f"engine-{system}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ENGINE), "serve", str(spec_path), str(write_fd)],
                                         stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         text=True, pass_fds=(write_fd,))
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")

    def reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.replies], [], [], timeout)
        line = self.replies.readline() if ready else ""
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"engine {self.system}: no reply (exit {self.proc.poll()}):\n{tail}")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"engine {self.system}: {res['error']}")
        return res

    def call(self, cmd: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply(timeout)

    def close(self, graceful: bool) -> None:
        """graceful: let the engine finish its stores and shut down; else kill it at once."""
        try:
            if graceful and self.proc.poll() is None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def http(url: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def paired(pairs: list[dict], key, higher_is_better: bool) -> dict:
    """Medians of each side of ``key`` over the pairs, and kvdepot / none (both as measured:
    times or rates), the ratio of medians and the median of the paired ratios."""
    both = [(key(p["none"]), key(p["kvdepot"])) for p in pairs]
    both = [(x, y) for x, y in both if x and y]  # (a decode run with no decode-only step has none)
    if not both:
        return {}
    a, b = [x for x, _ in both], [y for _, y in both]
    ratios = [y / x for x, y in both]
    return {"none": statistics.median(a), "kvdepot": statistics.median(b),
            "ratio_of_medians": statistics.median(b) / statistics.median(a),
            "median_paired_ratio": statistics.median(ratios), "paired_ratios": ratios,
            "kvdepot_vs_none": "higher is better" if higher_is_better else "lower is better"}


def summarize(report: dict) -> dict:
    out: dict = {}
    for name, pairs in report["pairs"].items():
        if not pairs:
            continue
        if name.startswith("ttft"):
            out[name] = {"ttft_s": paired(pairs, lambda r: r["wall_s"], False)}
        elif name == "batch":
            out[name] = {"prompt_tokens_per_s": paired(pairs, lambda r: r["prompt_tokens"] / r["wall_s"], True),
                         "with_store_drain_tokens_per_s": paired(
                             pairs, lambda r: r["prompt_tokens"] / (r["wall_s"] + r["drain_s"]), True)}
        else:
            out[name] = {"output_tokens_per_s": paired(pairs, lambda r: r["output_tokens"] / r["wall_s"], True),
                         "decode_step_s": paired(pairs, lambda r: r["steps"]["decode_step_s_median"], False),
                         # Equal counts: both engines ran the same steps (no lookup made a request wait).
                         "steps_per_run": {s: [p[s]["steps"]["steps"] for p in pairs] for s in SYSTEMS},
                         "kvdepot_decode_steps_with_stores": [
                             f'{p["kvdepot"]["steps"]["decode_steps_with_stores"]}/{p["kvdepot"]["steps"]["decode_steps"]}'
                             for p in pairs],
                         "kvdepot_decode_step_s_with_stores": paired(
                             pairs, lambda r: r["steps"]["decode_step_s_median_with_stores"]
                             or r["steps"]["decode_step_s_median"], False)}
        ks = [p["kvdepot"] for p in pairs]
        c = out[name]
        c["kvdepot_hook_ms_per_run"] = statistics.median(k["connector_stats"].get("hook_us", 0) / 1e3 for k in ks)
        c["kvdepot_stored_gb_per_run"] = statistics.median(k["connector_stats"].get("stored_bytes", 0) / 1e9 for k in ks)
        c["kvdepot_store_drain_s"] = statistics.median(k["drain_s"] for k in ks)
        c["kvdepot_hit_tokens"] = sum(k["external_tokens"] for k in ks)
        c["cached_tokens"] = {s: sum(sum(p[s].get("cached", [])) for p in pairs) for s in SYSTEMS}
    if any(not p["kvdepot"]["connector_stats"].get("stored_bytes") for ps in report["pairs"].values() for p in ps):
        out["warning"] = "a kvdepot run stored nothing: its figures are not a miss's cost"
    if "decode" in out:
        out["target_decode_ge_0.97"] = out["decode"]["output_tokens_per_s"]["ratio_of_medians"] >= 0.97
    miss = [v["ttft_s"]["ratio_of_medians"] for k, v in out.items() if k.startswith("ttft")]
    if "batch" in out:
        miss.append(1 / out["batch"]["prompt_tokens_per_s"]["ratio_of_medians"])
    if miss:
        out["target_miss_lt_1.02"] = max(miss) < 1.02
    return out


def print_table(report: dict) -> None:
    s = report["summary"]
    print(f"\n{'case':<12}{'metric':<34}{'none':>11}{'kvdepot':>11}{'ratio':>8}{'paired':>8}  paired ratios")
    for name, case in s.items():
        if not isinstance(case, dict):
            continue
        for metric, v in case.items():
            if isinstance(v, dict) and "ratio_of_medians" in v:
                print(f"{name:<12}{metric:<34}{v['none']:11.4g}{v['kvdepot']:11.4g}{v['ratio_of_medians']:8.3f}"
                      f"{v['median_paired_ratio']:8.3f}  {' '.join(f'{r:.3f}' for r in v['paired_ratios'])}")
        print(f"{'':<12}kvdepot: hook {case['kvdepot_hook_ms_per_run']:.1f} ms/run, stored "
              f"{case['kvdepot_stored_gb_per_run']:.2f} GB/run, stores done {case['kvdepot_store_drain_s'] * 1e3:.0f} ms "
              f"after return, hit tokens {case['kvdepot_hit_tokens']}, cached {case['cached_tokens']}")
        if "steps_per_run" in case:
            print(f"{'':<12}steps per run {case['steps_per_run']}; kvdepot decode-only steps with stores in "
                  f"flight {case['kvdepot_decode_steps_with_stores']}")
    for k in ("target_miss_lt_1.02", "target_decode_ge_0.97", "warning"):
        if k in s:
            print(f"{k}: {s[k]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--model", choices=["qwen3-14b", "tiny"], default="qwen3-14b")
    ap.add_argument("--ttft-lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--ttft-repeat", type=int, default=5, help="pairs per length")
    ap.add_argument("--batch-prompts", type=int, default=16)
    ap.add_argument("--batch-len", type=int, default=16384)
    ap.add_argument("--batch-repeat", type=int, default=3)
    ap.add_argument("--decode-concurrency", type=int, default=48)
    ap.add_argument("--decode-requests", type=int, default=144)
    ap.add_argument("--decode-prompt", type=int, default=1024, help="prompt tokens per decode request")
    ap.add_argument("--decode-tokens", type=int, nargs=2, default=[128, 384], metavar=("MIN", "MAX"),
                    help="generated tokens per request: uniform in [MIN, MAX]")
    ap.add_argument("--decode-repeat", type=int, default=2)
    ap.add_argument("--kv-gib", type=float, default=20.0, help="each engine's KV cache, GiB")
    ap.add_argument("--gpu-util", type=float, default=0.35, help="each engine's gpu_memory_utilization")
    ap.add_argument("--max-batched", type=int, default=34816)
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="vLLM's CUDA graphs (default: eager); implies --late-server")
    ap.add_argument("--late-server", action="store_true",
                    help="start the kvdepot server once the engines are up: the connector registers and "
                         "prepares its copies on a thread, and CUDA calls there broke vLLM's graph capture")
    ap.add_argument("--buffer-gb", type=float, help="kvdepot buffer (default: the largest case's stores x 1.15)")
    ap.add_argument("--pause", type=float, default=0.3, help="quiet seconds before each turn")
    ap.add_argument("--engine-timeout", type=float, default=400.0, help="seconds for a start or one command")
    ap.add_argument("--out", default=str(REPO / "bench/results/vllm_miss_decode.json"))
    args = ap.parse_args()
    lo, hi = args.decode_tokens
    if min(args.ttft_repeat, args.batch_prompts, args.batch_len, args.batch_repeat, args.decode_concurrency,
           args.decode_requests, args.decode_prompt, args.decode_repeat, lo, min(args.ttft_lengths)) < 1 or hi < lo:
        ap.error("counts and lengths must be >= 1, and --decode-tokens MIN <= MAX")

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    from vllm_gpu_ttft import KV_BYTES_PER_TOKEN, QWEN3_14B

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / f"{out.stem}-logs"
    log_dir.mkdir(exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="kvdepot-md-model-"))
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
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    # (tokens of the longest prompt and sequence, tokens stored by one run) of each case asked for
    sizes = {"ttft": (max(args.ttft_lengths), max(args.ttft_lengths)),
             "batch": (args.batch_len, args.batch_prompts * args.batch_len),
             "decode": (args.decode_prompt + hi, args.decode_requests * args.decode_prompt)}
    longest = max(sizes[c][0] for c in args.cases)
    stored = max(sizes[c][1] for c in args.cases)
    buffer_gb = args.buffer_gb or max(stored * kv_per_token * 1.15 / 1e9, 0.05)
    base = dict(model_dir=str(model_dir), load_format=load_format, vocab=vocab, cuda_graphs=args.cuda_graphs,
                max_model_len=-(-(longest + 16) // 256) * 256, kv_cache_bytes=int(args.kv_gib * (1 << 30)),
                max_batched=args.max_batched, max_num_seqs=max(64, args.decode_concurrency),
                gpu_util=args.gpu_util if cuda else None)
    report: dict = {"model": args.model, "params": vars(args), "kv_bytes_per_token": kv_per_token,
                    "buffer_gb": buffer_gb, "device": "cuda" if cuda else "cpu", "engines": {}, "pairs": {}}

    def save() -> None:
        report["summary"] = summarize(report)
        out.write_text(json.dumps(report, indent=1))

    from server_process import ServerProcess

    server = ServerProcess(buffer_gb=buffer_gb, log_path=log_dir / "server.log",
                           extra=["--lease-ttl", "120", "--enable-admin-api"])
    (log_dir / "server.log").unlink(missing_ok=True)
    engines: dict[str, Engine] = {}
    completed = False
    late = args.late_server or args.cuda_graphs
    try:
        if not late:
            server.start(60)
        kv = {"kv_connector": "KVDepotConnector", "kv_connector_module_path": "kvdepot.integrations.vllm",
              "kv_role": "kv_both", "kv_connector_extra_config": {"kvdepot.host": "127.0.0.1",
                                                                   "kvdepot.port": server.port}}
        # The engines start side by side (half the start-up time); the connector's, once the
        # server's buffer is touched (it registers and pins the arena at start-up).
        engines["none"] = Engine("none", dict(base, kv_transfer_config=None), log_dir)
        deadline = time.monotonic() + 300
        while not late and "Arena ready" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        engines["kvdepot"] = Engine("kvdepot", dict(base, kv_transfer_config=kv), log_dir)
        for system, eng in engines.items():
            report["engines"][system] = eng.reply(args.engine_timeout)
        base_url = f"http://127.0.0.1:{server.http_port}"
        if late:  # the connector retries every retry_s: wait for its scheduler and worker
            server.start(60)
            while time.monotonic() < deadline and ("Arena ready" not in server.log()
                                                   or http(f"{base_url}/stats")["engines_connected"] < 2):
                time.sleep(0.5)
        print(f"engines up: {report['engines']}; buffer {buffer_gb:.1f} GB", flush=True)

        def turn(system: str, cmd: dict) -> dict:
            if system == "kvdepot":
                http(f"{base_url}/admin/clear", "POST")
            time.sleep(args.pause)
            return engines[system].call(cmd, args.engine_timeout)

        def pairs(name: str, cmds: list[dict], warm: dict) -> None:
            for system in SYSTEMS:  # kernels, the connector's paths, the arena's pinning
                turn(system, warm)
            report["pairs"][name] = []
            for i, cmd in enumerate(cmds):
                order = SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]
                report["pairs"][name].append({s: turn(s, cmd) for s in order} | {"first": order[0]})
                save()
            r = report["pairs"][name][-1]
            print(f"{name}: done ({len(cmds)} pairs; last: none {r['none']['wall_s']:.3f} s, "
                  f"kvdepot {r['kvdepot']['wall_s']:.3f} s)", flush=True)

        for case in args.cases:
            if case == "ttft":
                for length in args.ttft_lengths:
                    cmds = [{"op": "generate", "length": length, "seeds": [1000 * length + r]}
                            for r in range(args.ttft_repeat)]
                    pairs(f"ttft_{length}", cmds, {"op": "generate", "length": length, "seeds": [7]})
            elif case == "batch":
                b = args.batch_prompts
                cmds = [{"op": "generate", "length": args.batch_len, "seeds": [20_000 + r * b + i for i in range(b)]}
                        for r in range(args.batch_repeat)]
                # The warm-up's steps have the same shape (max_batched tokens) with fewer prompts.
                pairs("batch", cmds, {"op": "generate", "length": args.batch_len, "seeds": list(range(9, 9 + min(b, 4)))})
            else:
                d = dict(op="decode", concurrency=args.decode_concurrency, requests=args.decode_requests,
                         prompt=args.decode_prompt, tokens=[lo, hi])
                warm = dict(d, seed=1, requests=args.decode_concurrency, tokens=[2, 16])
                pairs("decode", [dict(d, seed=100 + r) for r in range(args.decode_repeat)], warm)
        report["server_stats"] = http(f"{base_url}/stats")
        completed = True
    finally:  # also on SIGTERM (a stage's time limit): no engine or server is left behind
        for eng in engines.values():
            eng.close(graceful=completed)
        server.__exit__(None, None, None)
        save()
    print_table(report)


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
