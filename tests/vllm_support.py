"""Helpers for tests and benchmarks that run real vLLM engines against a kvdepot server.

Three things live here, so the tests, the benchmark and the lead's conftest can share them:

- ``write_tiny_llama``: a tiny Llama checkpoint with *seeded random* weights, written with
  transformers. vLLM's ``load_format="dummy"`` weights are so small that every next-token
  distribution is nearly uniform, so wrong KV would change nothing visible; with normal
  weights (std 0.1, embeddings std 1) every prompt token moves the log-probabilities.
- ``run_engine``: runs one vLLM engine in a *fresh* Python process (this file is the script)
  and returns, per prompt, the greedy tokens, their log-probabilities and num_cached_tokens.
  A fresh process is what a second vLLM instance on the node is: it shares nothing with the
  first but the kvdepot server. Rounds and marker files let a test act between rounds or
  while a round runs (kill or restart the server).
- ``KVDepotServer``: starts and stops a kvdepot server process on a free port with its own
  shared-memory segment.

Nothing is downloaded: the checkpoint is written locally, the tokenizer is never loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# The tiny model: 4 query heads, 2 KV heads of 64 dims, 2 layers. Big enough that every token
# of a 1000-token prompt changes the outputs, small enough that a CPU prefill takes ~0.1 s.
TINY_LLAMA = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def write_tiny_llama(path: str | os.PathLike, seed: int = 0, **overrides: Any) -> str:
    """Write a seeded random Llama checkpoint (config.json + model.safetensors) into ``path``.

    Same seed, same bytes: engines in different processes load identical weights. Returns the
    folder. Skips the write when a checkpoint with the same seed and config is already there.
    """
    path = Path(path)
    cfg = dict(TINY_LLAMA, **overrides)
    stamp = json.dumps({"seed": seed, **cfg}, sort_keys=True)
    marker = path / "kvdepot_tiny_llama.json"
    if marker.exists() and marker.read_text() == stamp:
        return str(path)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**cfg, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    marker.write_text(stamp)
    return str(path)


def random_prompt(n: int, seed: int, vocab: int = TINY_LLAMA["vocab_size"]) -> list[int]:
    """``n`` token ids, reproducible from ``seed``; ids 0..9 are left out (special tokens)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def kvdepot_transfer_config(port: int | None, **extra: Any) -> dict[str, Any]:
    """The kv_transfer_config a user passes to vLLM, pointing at a server on ``port``."""
    cfg: dict[str, Any] = {
        "kv_connector": "KVDepotConnector",
        "kv_connector_module_path": "kvdepot.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {},
    }
    if port is not None:
        cfg["kv_connector_extra_config"].update({"kvdepot.host": "127.0.0.1", "kvdepot.port": port})
    cfg["kv_connector_extra_config"].update(extra)
    return cfg


# --- comparing outputs ----------------------------------------------------------------------
#
# A hit computes only the prompt's tail; on the CPU build that alone moves log-probs by ~2e-4
# against a full prefill, and batching moves them by ~0.03. So an output is compared with a
# reference of the same shape (the same cached length, the same computed tail, the same batch)
# bit for bit, and only where shapes must differ, within a tolerance derived from a noise floor
# the test measured. Wrong KV moves log-probs by ~1: tolerances stay far below that.

MAX_TOLERANCE = 0.2  # a tolerance this wide could hide wrong KV: the test is broken


def assert_same_output(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal tokens and bit-equal log-probs: for outputs of the same computation shape."""
    assert got["tokens"] == want["tokens"]
    assert got["logprobs"] == want["logprobs"]


def logprob_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest log-prob difference over the steps before the two outputs' tokens part."""
    gap = 0.0
    for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"]):
        gap = max(gap, abs(la - lb))
        if ta != tb:
            break
    return gap


def assert_close_output(got: dict[str, Any], want: dict[str, Any], tolerance: float) -> None:
    """Log-probs within ``tolerance`` of the reference, and the same tokens except where the
    reference's greedy choice was a near tie (runner-up within 2 x tolerance): there a
    different shape may legitimately pick the other token, and the rest cannot be compared."""
    assert 0 < tolerance <= MAX_TOLERANCE, f"tolerance {tolerance} cannot tell wrong KV"
    for i, (tg, tw) in enumerate(zip(got["tokens"], want["tokens"])):
        assert abs(got["logprobs"][i] - want["logprobs"][i]) <= tolerance, (i, got, want)
        if tg != tw:
            assert want["margins"][i] <= 2 * tolerance, (i, got, want)
            return
    assert len(got["tokens"]) == len(want["tokens"])


def noise_floor(pairs: list[tuple[dict[str, Any], dict[str, Any]]], minimum: float = 1e-3) -> float:
    """A tolerance from outputs that differ only in shape (e.g. full prefill vs prefix-cache
    hit, or one prompt alone vs in a batch): 4x the largest gap seen, at least ``minimum``."""
    return max(minimum, 4 * max(logprob_gap(a, b) for a, b in pairs))


# --- running one engine in a fresh process --------------------------------------------------


def run_engine(
    model: str,
    rounds: list[dict[str, Any]],
    *,
    kv_transfer_config: dict[str, Any] | None = None,
    enable_prefix_caching: bool = True,
    max_model_len: int = 4096,
    kv_cache_memory_bytes: int = 64 << 20,
    block_size: int | None = None,
    tensor_parallel_size: int = 1,
    engine_args: dict[str, Any] | None = None,
    metrics: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    background: bool = False,
    workdir: str | None = None,
) -> Any:
    """Run an engine in a new process; return its JSON result (or the Popen if ``background``).

    Each round is ``{"prompts": [[ids...], ...], "max_tokens": n, "wait_for": path?,
    "touch_before": path?, "touch_after": path?, "sleep_before": s?}``; the result is
    ``{"rounds": [{"outputs": [{"tokens", "logprobs", "margins", "num_cached_tokens"}], "seconds"}],
    "startup_s": ..}`` (margins: per generated token, its log-prob minus the runner-up's).
    """
    workdir = workdir or tempfile.mkdtemp(prefix="kvdepot-engine-")
    spec = {
        "model": model,
        "rounds": rounds,
        "kv_transfer_config": kv_transfer_config,
        "enable_prefix_caching": enable_prefix_caching,
        "max_model_len": max_model_len,
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
        "block_size": block_size,
        "tensor_parallel_size": tensor_parallel_size,
        "engine_args": engine_args or {},
        "metrics": metrics,
        "result": os.path.join(workdir, "result.json"),
    }
    spec_path = os.path.join(workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    full_env = dict(os.environ)
    full_env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if tensor_parallel_size == 1 else "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", ""),
        }
    )
    full_env.update(env or {})
    log = open(os.path.join(workdir, "engine.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), spec_path],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(REPO_ROOT),
    )
    proc.kvdepot_workdir = workdir  # type: ignore[attr-defined]
    proc.kvdepot_result = spec["result"]  # type: ignore[attr-defined]
    if background:
        return proc
    return wait_engine(proc, timeout)


def wait_engine(proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    """Wait for an engine started with ``background=True``; raise with its log on failure."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    log_path = os.path.join(proc.kvdepot_workdir, "engine.log")  # type: ignore[attr-defined]
    if rc != 0 or not os.path.exists(proc.kvdepot_result):  # type: ignore[attr-defined]
        tail = Path(log_path).read_text()[-6000:] if os.path.exists(log_path) else ""
        raise RuntimeError(f"engine exited with {rc}; log tail:\n{tail}")
    with open(proc.kvdepot_result) as f:  # type: ignore[attr-defined]
        result = json.load(f)
    result["log"] = log_path
    return result


def _wait_for_file(path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {path}")
        time.sleep(0.01)


def _generate_staggered(llm: Any, prompts: list, params: Any, stagger_s: float) -> list:
    """Submit one prompt every ``stagger_s`` seconds while the engine keeps stepping, so that
    lookups, loads and stores keep happening during the whole round (e.g. across a server
    kill). Returns the outputs in prompt order."""
    engine = llm.llm_engine
    ids = [f"stagger-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
    done: dict[str, Any] = {}
    next_at = time.monotonic()
    submitted = 0
    while len(done) < len(prompts):
        if submitted < len(prompts) and time.monotonic() >= next_at:
            engine.add_request(ids[submitted], prompts[submitted], params)
            submitted += 1
            next_at += stagger_s
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        else:
            time.sleep(0.005)
    return [done[i] for i in ids]


def _shutdown_engine(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort, the results are written
        print(f"engine shutdown failed: {exc!r}", file=sys.stderr)


def _engine_main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=spec["max_model_len"],
        kv_cache_memory_bytes=spec["kv_cache_memory_bytes"],
        enable_prefix_caching=spec["enable_prefix_caching"],
        seed=0,
        disable_log_stats=not spec.get("metrics", False),
    )
    if spec.get("block_size"):
        kwargs["block_size"] = spec["block_size"]
    if spec.get("tensor_parallel_size", 1) > 1:
        kwargs["tensor_parallel_size"] = spec["tensor_parallel_size"]
        kwargs["distributed_executor_backend"] = "mp"
    if spec.get("kv_transfer_config"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    kwargs.update(spec.get("engine_args") or {})  # e.g. max_num_batched_tokens
    llm = LLM(**kwargs)
    result: dict[str, Any] = {"startup_s": time.monotonic() - t0, "rounds": []}
    for rnd in spec["rounds"]:
        if rnd.get("wait_for"):
            _wait_for_file(rnd["wait_for"])
        if rnd.get("sleep_before"):
            time.sleep(rnd["sleep_before"])
        if rnd.get("touch_before"):
            Path(rnd["touch_before"]).touch()
        params = SamplingParams(
            temperature=0.0,
            max_tokens=rnd.get("max_tokens", 8),
            logprobs=2,  # the runner-up too: how close each greedy choice was (margins)
            detokenize=False,
            ignore_eos=True,
        )
        prompts = [TokensPrompt(prompt_token_ids=p) for p in rnd["prompts"]]
        start = time.monotonic()
        if rnd.get("stagger_s"):
            outs = _generate_staggered(llm, prompts, params, rnd["stagger_s"])
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.monotonic() - start
        outputs = []
        for out in outs:
            comp = out.outputs[0]
            logprobs = [float(step[tok].logprob) for tok, step in zip(comp.token_ids, comp.logprobs)]
            margins = [
                lp - max((float(o.logprob) for t, o in step.items() if t != tok), default=lp - 99.0)
                for tok, step, lp in zip(comp.token_ids, comp.logprobs, logprobs)
            ]
            outputs.append(
                {
                    "tokens": list(comp.token_ids),
                    "logprobs": logprobs,
                    "margins": margins,
                    "num_cached_tokens": out.num_cached_tokens,
                    "finish_reason": comp.finish_reason,
                }
            )
        result["rounds"].append({"outputs": outputs, "seconds": seconds})
        if rnd.get("touch_after"):
            Path(rnd["touch_after"]).touch()
    if spec.get("metrics"):
        # vLLM's own metrics: the connector's counters reach them through
        # get_kv_connector_stats (vllm:kvdepot_* counters, summed over the run).
        result["metrics"] = {
            m.name: getattr(m, "value", None)
            for m in llm.get_metrics()
            if "kvdepot" in m.name or "prefix_cache" in m.name or "external" in m.name
        }
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    # Shut the engine down as vLLM does at exit, so the connector can finish its stores in
    # flight (connector.shutdown), but do not wait for the rest of the teardown: exit.
    import threading

    t = threading.Thread(target=_shutdown_engine, args=(llm,), daemon=True)
    t.start()
    t.join(30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- a kvdepot server process ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KVDepotServer:
    """A kvdepot server in its own process, on a free port, with its own shm segment."""

    def __init__(self, cpu_buffer_gb: float = 0.5, port: int | None = None, log_dir: str | None = None,
                 extra_args: list[str] | None = None):
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])  # more `kvdepot serve` flags, e.g. a disk tier
        self.cpu_buffer_gb = cpu_buffer_gb
        self.shm_name = f"kvdepot-test-{uuid.uuid4().hex[:12]}"
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="kvdepot-server-")
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._client = None

    def start(self, timeout: float = 30) -> "KVDepotServer":
        self.starts += 1
        log = open(os.path.join(self.log_dir, f"server-{self.starts}.log"), "w")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "kvdepot.server",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--cpu-buffer-size", str(self.cpu_buffer_gb),
                "--shm-name", self.shm_name,
                "--http-port", "0",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        from kvdepot.client import KVDepotClient

        # One client for the server object's life (readiness and stats): connections that
        # come and go quickly are not what an engine does, and only add noise to the server.
        if self._client is None:
            self._client = KVDepotClient(host="127.0.0.1", port=self.port, engine_id="test-probe",
                                         timeout_ms=500)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            if self._client.connect():
                return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        p = os.path.join(self.log_dir, f"server-{self.starts}.log")
        return Path(p).read_text()[-3000:] if os.path.exists(p) else ""

    def kill(self) -> None:
        """SIGKILL: the crash case (no goodbye, the segment is left to the next boot)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # A killed server cannot unlink its segment; do it for it.
        for name in (self.shm_name, "/" + self.shm_name):
            path = os.path.join("/dev/shm", name.lstrip("/"))
            if os.path.exists(path):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def stats(self):
        from kvdepot.client import KVDepotError

        for _ in range(3):  # a restarted server is noticed once (ServerRestarted), then answers
            try:
                return self._client.stats()
            except KVDepotError:
                time.sleep(0.05)
        return self._client.stats()

    def __enter__(self) -> "KVDepotServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.close()


if __name__ == "__main__":
    _engine_main(sys.argv[1])
