"""The engine processes of bench/vllm_multi_round.py and bench/vllm_miss_decode.py.

bench/vllm_multi_round.py: one vLLM engine, one system, its rounds.
Run by the driver as ``python bench/multi_round_engine.py SPEC.json`` with
VLLM_ENABLE_V1_MULTIPROCESSING=0, so that the scheduler, the worker and the connector all run
in this process (the per-round connector figures and the trace wrap them here). The spec names
the mode, the system's engine arguments and the workload; the results file is rewritten after
each round (or timed prompt), so an engine stopped early leaves what it measured.

bench/vllm_miss_decode.py: ``python bench/multi_round_engine.py serve SPEC.json FD`` (same
variable), one engine that takes commands (``serve_main``) while another runs beside it.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path


def tokens(n: int, seed: int, vocab: tuple[int, int]) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*vocab) for _ in range(n)]


def conversation_prompt(w: dict, user: int, rnd: int) -> list[int]:
    """User ``user``'s prompt in round ``rnd`` (0-based): context, earlier turns, question."""
    vocab = tuple(w["vocab"])
    out = tokens(w["context"], 1_000_000 + user, vocab)
    for r in range(rnd + 1):
        out += tokens(w["turn"], 2_000_000 + user * 1000 + r, vocab)  # question of round r
        if r < rnd:
            out += tokens(w["turn"], 3_000_000 + user * 1000 + r, vocab)  # its answer
    return out


class ConnectorTally:
    """Per round: the tokens the connector gave vLLM (the sum of update_state_after_alloc's
    num_external_tokens) and every number in its statistics (get_kv_connector_stats' data,
    summed; lists of numbers as [sum] and [n]), for any connector: instance-level wraps of
    the scheduler's connector and the worker's."""

    def __init__(self, llm) -> None:
        self.external_tokens = 0
        self.stats: dict[str, float] = {}
        self._conns = []
        sched_conn = getattr(llm.llm_engine.engine_core.engine_core.scheduler, "connector", None)
        if sched_conn is not None:
            alloc = sched_conn.update_state_after_alloc

            def update_state_after_alloc(request, blocks, num_external_tokens, *a, **k):
                self.external_tokens += int(num_external_tokens or 0)
                return alloc(request, blocks, num_external_tokens, *a, **k)

            sched_conn.update_state_after_alloc = update_state_after_alloc
            self._conns.append(sched_conn)
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group, has_kv_transfer_group

        if has_kv_transfer_group():
            self._conns.append(get_kv_transfer_group())  # the worker's (in this process)
        for conn in self._conns:
            take = conn.get_kv_connector_stats

            def get_kv_connector_stats(_take=take):
                stats = _take()
                if stats is not None:
                    _add_numbers(self.stats, getattr(stats, "data", None))
                return stats

            conn.get_kv_connector_stats = get_kv_connector_stats

    def take(self) -> dict:
        for conn in self._conns:  # what vLLM has not taken yet
            conn.get_kv_connector_stats()
        out = {"external_tokens": self.external_tokens, "connector_stats": self.stats}
        self.external_tokens, self.stats = 0, {}
        return out


def _add_numbers(into: dict, data, key: str = "") -> None:
    if isinstance(data, bool) or data is None:
        return
    if isinstance(data, (int, float)):
        into[key] = into.get(key, 0) + data
    elif isinstance(data, dict):
        for k, v in data.items():
            _add_numbers(into, v, f"{key}/{k}" if key else str(k))
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, (int, float)) for x in data):
        into[key + "[sum]"] = into.get(key + "[sum]", 0) + sum(data)
        into[key + "[n]"] = into.get(key + "[n]", 0) + len(data)


def _reset_prefix_cache(llm) -> bool:
    for _ in range(100):  # a connector may hold finished requests' blocks a little longer
        if llm.reset_prefix_cache():
            return True
        time.sleep(0.1)
    return False


def engine_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    started = time.monotonic()
    result: dict = {"system": spec["system"], "rounds": [], "samples": {}}

    def save() -> None:
        Path(spec["result"] + ".tmp").write_text(json.dumps(result))
        os.replace(spec["result"] + ".tmp", spec["result"])

    tracer = None
    if spec["trace"]:
        from multi_round_trace import EngineTrace

        tracer = EngineTrace()
        tracer.install_connector()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model_dir"], load_format=spec["load_format"], skip_tokenizer_init=True,
              enforce_eager=True, dtype="bfloat16", seed=0, max_model_len=spec["max_model_len"],
              kv_cache_memory_bytes=spec["kv_cache_bytes"], enable_prefix_caching=True,
              max_num_batched_tokens=spec["max_batched"])
    if spec["kv_transfer_config"]:
        kw["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    llm = LLM(**kw)
    cache = llm.llm_engine.vllm_config.cache_config
    result["startup_s"] = time.monotonic() - started
    result["kv_cache_tokens"] = (cache.num_gpu_blocks or 0) * cache.block_size
    tally = ConnectorTally(llm)
    if tracer is not None:
        tracer.install_engine(llm)
    save()
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, detokenize=False, ignore_eos=True)

    def generate(prompts: list[list[int]]):
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        wall = time.perf_counter() - t
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        if generated != len(prompts) * spec["max_tokens"]:  # a request rejected or cut short
            raise RuntimeError(f"{generated} tokens generated for {len(prompts)} prompts")
        return wall, [int(o.num_cached_tokens or 0) for o in outs]

    w = spec["workload"]
    vocab = tuple(w["vocab"])
    if spec["mode"] == "multi-round":
        warm = [tokens(w["warmup"], 9_000_000 + u, vocab) for u in range(w["users"])]
        generate(warm)
        # False: the second pass hits vLLM's own cache, and the connector's load path is not warm.
        result["warmup_reset"] = _reset_prefix_cache(llm)
        generate([p + tokens(16, 9_100_000 + i, vocab) for i, p in enumerate(warm)])  # loads
        tally.take()
        if tracer is not None:
            tracer.take_round()  # the warm-up's records: dropped
        for rnd in range(w["rounds"]):
            prompts = [conversation_prompt(w, u, rnd) for u in range(w["users"])]
            if tracer is not None:
                tracer.begin_round()
            wall, cached = generate(prompts)
            rec = {"round": rnd + 1, "wall_s": wall, "prompt_tokens": sum(map(len, prompts)),
                   "cached_tokens": sum(cached), "cached_per_user": cached, **tally.take()}
            if tracer is not None:
                rec["trace"] = tracer.take_round()
            result["rounds"].append(rec)
            save()
    else:
        _partial_hit(spec["system"], w, vocab, llm, generate, result, save)
    result["engine_s"] = time.monotonic() - started
    save()
    _shut_down(llm)


def _shut_down(llm) -> None:
    """Shut down as vLLM does at exit, so that the connector can finish its stores in flight."""
    t = threading.Thread(target=llm.llm_engine.engine_core.shutdown, daemon=True)
    t.start()
    t.join(30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _partial_hit(system: str, w: dict, vocab, llm, generate, result: dict, save) -> None:
    cached_len, total = w["cached"], w["total"]

    def prefix(i: int) -> list[int]:
        return tokens(cached_len, 5_000_000 + i, vocab)

    def full(i: int) -> list[int]:
        return prefix(i) + tokens(total - cached_len, 6_000_000 + i, vocab)

    def timed(key: str, i: int, prompt: list[int]) -> None:
        time.sleep(w["pause"])  # stores of the previous prompt are done
        wall, cached = generate([prompt])
        if i >= 0:  # i = -1: the warm-up
            result["samples"].setdefault(key, []).append([wall, cached[0]])
            save()

    for i in range(-1, w["repeat"]):
        if system == "gpu":
            generate([prefix(i)])
            timed("gpu_prefix_hit", i, full(i))
        elif system == "offload":
            generate([prefix(i)])
            time.sleep(w["pause"])
            if not _reset_prefix_cache(llm):
                result["error"] = "reset_prefix_cache stayed False: the hit would be vLLM's own"
            timed("offload_hit", i, full(i))
        elif system == "kvdepot-store":
            generate([prefix(i)])
        elif system == "kvdepot":
            timed("kvdepot_hit", i, full(i))
    if system == "gpu":
        for i in range(-1, w["repeat"]):
            timed("recompute", i, tokens(total, 7_000_000 + i, vocab))
    if system == "kvdepot-store":
        time.sleep(w["settle"])  # stores are asynchronous: let the last ones commit


def serve_main(spec_path: str, reply_fd: int) -> None:
    """bench/vllm_miss_decode.py's engine: commands (JSON lines) on stdin, one JSON reply per
    command on ``reply_fd``: ready (after start-up), then generate (a timed generate call) or
    decode (a busy engine's closed loop), until quit."""
    spec = json.loads(Path(spec_path).read_text())
    reply = os.fdopen(reply_fd, "w", buffering=1)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    kw = dict(model=spec["model_dir"], load_format=spec["load_format"], skip_tokenizer_init=True,
              enforce_eager=not spec["cuda_graphs"], dtype="bfloat16", seed=0,
              max_model_len=spec["max_model_len"], kv_cache_memory_bytes=spec["kv_cache_bytes"],
              enable_prefix_caching=True, max_num_batched_tokens=spec["max_batched"],
              max_num_seqs=spec["max_num_seqs"])
    if spec["gpu_util"]:
        kw["gpu_memory_utilization"] = spec["gpu_util"]
    if spec["kv_transfer_config"]:
        kw["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    started = time.monotonic()
    llm = LLM(**kw)
    vocab = tuple(spec["vocab"])
    tally = ConnectorTally(llm)
    transfers = None
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group, has_kv_transfer_group

    if has_kv_transfer_group():
        worker = getattr(get_kv_transfer_group(), "_worker", None)
        transfers = getattr(worker, "transfers", None)

    def stores_in_flight() -> bool:  # a dict's truth under the GIL: no lock on the step's path
        return transfers is not None and bool(transfers._store_pending)

    def drain() -> float:
        """Seconds until the connector's stores are over (0 without a connector)."""
        t = time.perf_counter()
        while stores_in_flight():
            time.sleep(0.001)
        return time.perf_counter() - t

    core = llm.llm_engine.engine_core.engine_core
    steps: list[tuple[float, int, int, bool]] = []  # time, scheduled tokens, requests, stores in flight
    schedule = core.scheduler.schedule

    def timed_schedule(*a, **k):
        out = schedule(*a, **k)
        steps.append((time.perf_counter(), out.total_num_scheduled_tokens, len(out.num_scheduled_tokens),
                      stores_in_flight()))
        return out

    core.scheduler.schedule = timed_schedule
    info = {"startup_s": time.monotonic() - started,
            "async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling),
            "kv_cache_tokens": (llm.llm_engine.vllm_config.cache_config.num_gpu_blocks or 0)
            * llm.llm_engine.vllm_config.cache_config.block_size}
    reply.write(json.dumps({"ready": True, **info}) + "\n")

    def generate(cmd: dict) -> dict:
        prompts = [TokensPrompt(prompt_token_ids=tokens(cmd["length"], s, vocab)) for s in cmd["seeds"]]
        sp = SamplingParams(max_tokens=1, temperature=0, detokenize=False, ignore_eos=True)
        tally.take()
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        return {"wall_s": wall, "drain_s": drain(), "cached": [int(o.num_cached_tokens or 0) for o in outs],
                "prompt_tokens": cmd["length"] * len(prompts), **tally.take()}

    def decode(cmd: dict) -> dict:
        rng = random.Random(cmd["seed"])
        n, c = cmd["requests"], cmd["concurrency"]
        lens = [rng.randint(*cmd["tokens"]) for _ in range(n)]
        prompts = [tokens(cmd["prompt"], cmd["seed"] * 100_003 + i, vocab) for i in range(n)]
        engine = llm.llm_engine
        running: set[str] = set()
        admitted = generated = 0
        tally.take()
        steps.clear()
        t0 = time.perf_counter()
        while admitted < n or running:
            while len(running) < c and admitted < n:  # arrivals: whenever a request finishes
                rid = f"d{cmd['seed']}-{admitted}"
                engine.add_request(rid, TokensPrompt(prompt_token_ids=prompts[admitted]),
                                   SamplingParams(max_tokens=lens[admitted], temperature=0, detokenize=False,
                                                  ignore_eos=True, output_kind=RequestOutputKind.DELTA))
                running.add(rid)
                admitted += 1
            for out in engine.step():
                generated += len(out.outputs[0].token_ids)
                if out.finished:
                    running.discard(out.request_id)
        wall = time.perf_counter() - t0
        if generated != sum(lens):
            raise RuntimeError(f"{generated} tokens generated, {sum(lens)} asked for")
        return {"wall_s": wall, "drain_s": drain(), "output_tokens": generated, "steps": step_summary(steps),
                **tally.take()}

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            res = generate(cmd) if cmd["op"] == "generate" else decode(cmd)
        except Exception as exc:  # noqa: BLE001 - the driver records it and stops
            res = {"error": repr(exc)}
        reply.write(json.dumps(res) + "\n")
    reply.close()
    _shut_down(llm)


def step_summary(steps: list[tuple[float, int, int, bool]]) -> dict:
    """The cadence of schedule() calls: an interval belongs to the step scheduled at its start.
    A decode-only step schedules one token per request."""
    decode = [(b[0] - a[0], a[3]) for a, b in zip(steps, steps[1:]) if a[1] == a[2] and a[1] > 0]
    with_stores = [d for d, s in decode if s]
    without = [d for d, s in decode if not s]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"steps": len(steps), "decode_steps": len(decode), "decode_steps_with_stores": len(with_stores),
            "decode_step_s_median": med([d for d, _ in decode]), "decode_step_s_sum": sum(d for d, _ in decode),
            "decode_step_s_median_with_stores": med(with_stores), "decode_step_s_median_no_stores": med(without)}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve_main(sys.argv[2], int(sys.argv[3]))
    else:
        engine_main(sys.argv[1])
