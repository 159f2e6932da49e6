"""Run a vLLM engine the way a user's offline script does, in every process layout.

``run_script`` starts a fresh Python process (this file is the script) that builds
``LLM(...)``, generates its rounds and then simply ends: no explicit shutdown, no helper that
waits for the engine, no ``os._exit``. Whatever vLLM and the connector do when a script's
interpreter exits is what happens, as for a user. The layout is chosen with
``multiprocessing`` (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING: 1, its default, runs the EngineCore
in its own process; 0 runs it in this one) and ``tensor_parallel_size``.

``idle_until``: after its outputs the script keeps the engine up and idle (no request, no
step) until that file exists, so a test can watch what the server receives from an engine
that has nothing more to do.

The result JSON has, per round, per prompt: ``tokens``, ``logprobs`` (of the greedy tokens),
``margins`` (each greedy token's log-prob minus the runner-up's), ``num_cached_tokens``.
tests/vllm_support.py runs engines for the other tests; this runner differs only in how the
script ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(__file__))
import vllm_support as vs  # noqa: E402


def run_script(
    model: str,
    rounds: list[list[list[int]]],
    *,
    kv_transfer_config: dict[str, Any] | None = None,
    multiprocessing: bool = True,
    tensor_parallel_size: int = 1,
    max_tokens: int | list[int] = 8,
    idle_until: str | None = None,
    env: dict[str, str] | None = None,
    background: bool = False,
    timeout: float = 300,
) -> Any:
    """Run a script with one LLM; each round is one ``generate`` call of its prompts (token
    ids), greedy, ``max_tokens`` per request (or a list: per round). Returns the result (see
    the module doc), or the Popen with ``background``; raises RuntimeError with the log's tail
    when the script fails or outlives ``timeout`` s."""
    workdir = tempfile.mkdtemp(prefix="kvdepot-script-")
    spec = {
        "model": model,
        "rounds": rounds,
        "kv_transfer_config": kv_transfer_config,
        "tensor_parallel_size": tensor_parallel_size,
        "max_tokens": max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(rounds),
        "idle_until": idle_until,
        "outputs_done": os.path.join(workdir, "outputs_done"),
        "result": os.path.join(workdir, "result.json"),
    }
    spec_path = os.path.join(workdir, "spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    full_env = dict(os.environ)
    full_env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(vs.REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", ""),
    })
    full_env.update(env or {})
    log_path = os.path.join(workdir, "engine.log")
    with open(log_path, "w") as log:
        argv = [sys.executable, str(Path(__file__).resolve()), spec_path]
        proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=str(vs.REPO_ROOT))
    proc.kvdepot_spec = spec  # type: ignore[attr-defined]
    proc.kvdepot_log = log_path  # type: ignore[attr-defined]
    if background:
        return proc
    return wait_script(proc, timeout)


def wait_outputs(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until a background script has its outputs (it may still be running); raises
    RuntimeError with the log's tail if it ends without them or takes over ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(proc.kvdepot_spec["outputs_done"]):  # type: ignore[attr-defined]
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log = Path(proc.kvdepot_log).read_text(errors="replace")  # type: ignore[attr-defined]
            raise RuntimeError(f"script has no outputs (exit status {proc.returncode}); "
                               f"log tail:\n{log[-6000:]}")
        time.sleep(0.05)


def wait_script(proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    """Wait for the script to end; its result with ``seconds_to_exit`` (from its outputs to
    its end, seen from here) and ``log`` (the log's path)."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = f"killed after {timeout} s"
    ended = time.time()
    spec = proc.kvdepot_spec  # type: ignore[attr-defined]
    log = Path(proc.kvdepot_log).read_text(errors="replace")  # type: ignore[attr-defined]
    if rc != 0 or not os.path.exists(spec["result"]):
        raise RuntimeError(f"script exited with {rc}; log tail:\n{log[-6000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result["seconds_to_exit"] = ended - os.path.getmtime(spec["outputs_done"])
    result["log"] = proc.kvdepot_log  # type: ignore[attr-defined]
    return result


_SESSION_END = re.compile(
    r"Engine (\S+) (said goodbye|disconnected|sent nothing for [^:]*|re-introduced itself): ")


def ended_sessions(server_log: str) -> dict[str, str]:
    """Engine sessions a kvdepot server's log shows ended, and how: ``said goodbye`` is a
    graceful shutdown; ``disconnected`` (the connection dropped) or ``sent nothing for N s``
    means the engine left without it."""
    return {m.group(1): m.group(2) for m in _SESSION_END.finditer(server_log)}


def wait_sessions_ended(read_log: Callable[[], str], engine_ids: set[str],
                        timeout: float = 5) -> dict[str, str]:
    """How each of ``engine_ids`` ended, waiting up to ``timeout`` s for the server to log it
    (missing: still connected)."""
    deadline = time.monotonic() + timeout
    while True:
        ended = ended_sessions(read_log())
        if engine_ids <= set(ended) or time.monotonic() > deadline:
            return {e: ended.get(e, "still connected") for e in engine_ids}
        time.sleep(0.1)


def connected_engines(server_log: str) -> set[str]:
    """Engine ids of every session the server's log shows connected (the tests' own probe
    client left out)."""
    return set(re.findall(r"Engine (\S+) connected", server_log)) - {"test-probe"}


def _script(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(
        model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
        max_model_len=4096, kv_cache_memory_bytes=64 << 20, seed=0,
    )
    if spec["tensor_parallel_size"] > 1:
        kwargs.update(tensor_parallel_size=spec["tensor_parallel_size"],
                      distributed_executor_backend="mp")
    if spec["kv_transfer_config"]:
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    llm = LLM(**kwargs)
    rounds = []
    for prompts, max_tokens in zip(spec["rounds"], spec["max_tokens"]):
        # logprobs=2: the runner-up too, for the margin of each greedy choice.
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2,
                                detokenize=False, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rounds.append([_output(o) for o in outs])
    Path(spec["result"]).write_text(json.dumps({"rounds": rounds}))
    Path(spec["outputs_done"]).touch()
    while spec["idle_until"] and not os.path.exists(spec["idle_until"]):
        time.sleep(0.05)
    # The script ends here, as a user's does.


def _output(out: Any) -> dict[str, Any]:
    comp = out.outputs[0]
    logprobs, margins = [], []
    for tok, step in zip(comp.token_ids, comp.logprobs):
        lp = float(step[tok].logprob)
        logprobs.append(lp)
        runner_up = max((float(o.logprob) for t, o in step.items() if t != tok), default=lp - 99.0)
        margins.append(lp - runner_up)
    return {"tokens": list(comp.token_ids), "logprobs": logprobs, "margins": margins,
            "num_cached_tokens": out.num_cached_tokens}


if __name__ == "__main__":
    _script(sys.argv[1])
