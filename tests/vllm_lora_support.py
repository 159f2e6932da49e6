"""LoRA for the real-vLLM tests: seeded random adapters, and an engine run whose rounds name one.

- ``write_lora_adapter``: a PEFT-format adapter (adapter_config.json + adapter_model.safetensors)
  for the tiny Llama of ``vllm_support``, with seeded random A and B matrices on q_proj and
  v_proj of every layer: large enough that two adapters give different tokens.
- ``run_lora_engine``: like ``vllm_support.run_engine`` (one engine in a fresh process, this file
  the script), with LoRA enabled; a round's ``"lora": [name, id, path]`` sends its prompts with
  that ``LoRARequest`` (none: the base model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_support as vs  # noqa: E402

LORA_RANK = 8
TARGETS = {"q_proj": 4 * 64, "v_proj": 2 * 64}  # output features in the tiny Llama


def write_lora_adapter(path: str | os.PathLike, seed: int, rank: int = LORA_RANK) -> str:
    """Write a seeded random LoRA adapter for ``vs.TINY_LLAMA`` into ``path``; same seed, same
    bytes. Returns the folder."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hidden = vs.TINY_LLAMA["hidden_size"]
    tensors = {}
    for layer in range(vs.TINY_LLAMA["num_hidden_layers"]):
        for module, out_features in TARGETS.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(TARGETS),
    }
    (path / "adapter_config.json").write_text(json.dumps(config, sort_keys=True))
    return str(path)


def run_lora_engine(
    model: str,
    rounds: list[dict[str, Any]],
    *,
    kv_transfer_config: dict[str, Any] | None = None,
    max_lora_rank: int = LORA_RANK,
    timeout: float = 300,
) -> dict[str, Any]:
    """Run a LoRA-enabled engine in a new process; rounds and result as ``vs.run_engine``'s,
    plus a round's optional ``"lora": [name, int id, path]``."""
    workdir = tempfile.mkdtemp(prefix="kvdepot-lora-engine-")
    spec = {
        "model": model,
        "rounds": rounds,
        "kv_transfer_config": kv_transfer_config,
        "max_lora_rank": max_lora_rank,
        "result": os.path.join(workdir, "result.json"),
    }
    spec_path = os.path.join(workdir, "spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONPATH": str(vs.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    with open(os.path.join(workdir, "engine.log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), spec_path],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(vs.REPO_ROOT),
        )
    proc.kvdepot_workdir = workdir  # type: ignore[attr-defined]
    proc.kvdepot_result = spec["result"]  # type: ignore[attr-defined]
    return vs.wait_engine(proc, timeout)


def _engine_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig
    from vllm.lora.request import LoRARequest

    kwargs: dict[str, Any] = dict(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=4096,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
        enable_lora=True,
        max_lora_rank=spec["max_lora_rank"],
        max_loras=1,
    )
    if spec.get("kv_transfer_config"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    llm = LLM(**kwargs)
    result: dict[str, Any] = {"rounds": []}
    for rnd in spec["rounds"]:
        params = SamplingParams(temperature=0.0, max_tokens=rnd.get("max_tokens", 8), logprobs=1,
                                detokenize=False, ignore_eos=True)
        lora = LoRARequest(*rnd["lora"]) if rnd.get("lora") else None
        prompts = [TokensPrompt(prompt_token_ids=p) for p in rnd["prompts"]]
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        outputs = []
        for out in outs:
            comp = out.outputs[0]
            outputs.append(
                {
                    "tokens": list(comp.token_ids),
                    "logprobs": [float(s[t].logprob) for t, s in zip(comp.token_ids, comp.logprobs)],
                    "num_cached_tokens": out.num_cached_tokens,
                }
            )
        result["rounds"].append({"outputs": outputs})
    Path(spec["result"]).write_text(json.dumps(result))
    # As vs._engine_main: shut the engine down so the connector finishes its stores, then exit.
    t = threading.Thread(target=vs._shutdown_engine, args=(llm,), daemon=True)
    t.start()
    t.join(30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _engine_main(sys.argv[1])
