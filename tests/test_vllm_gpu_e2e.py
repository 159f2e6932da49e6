"""Real vLLM on a CUDA GPU with the kvdepot connector: loaded KV is bit-identical.

Runs on the GPU machine (vLLM's CUDA build); skipped elsewhere. A seeded random checkpoint
(vllm_support.write_tiny_llama), so that wrong KV would move the log-probabilities.

The comparison that leaves no tolerance: a prompt of whole chunks plus one token. Engine A
computes it, then serves it again from vLLM's own GPU prefix cache (the whole chunks cached,
one token computed). Engine B, a fresh process, loads the same whole chunks from kvdepot and
computes the same one token. Same cached length, same batch shape, same kernels: if the bytes
that came back through the arena are the bytes engine A computed, B's tokens and
log-probabilities equal A's second run exactly.
"""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU and vLLM's CUDA build", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import vllm_support as vs  # noqa: E402

pytestmark = pytest.mark.vllm

CHUNK = 256
WHOLE = 8 * CHUNK


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Deeper than the CPU tests' model: more layers whose KV must all come back right.
    return vs.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gpu"), seed=0,
                               num_hidden_layers=8)


PROMPTS = [vs.random_prompt(WHOLE + 1, seed=11 + i) for i in range(3)]
ROUNDS = [{"prompts": [p], "max_tokens": 16} for p in PROMPTS]


@pytest.fixture(scope="module")
def stored(model):
    """A server holding the prompts' KV, and engine A's outputs when vLLM's own GPU prefix
    cache served them (the whole chunks cached, one token computed)."""
    with vs.KVDepotServer(cpu_buffer_gb=1.0) as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        first = vs.run_engine(model, ROUNDS + ROUNDS, kv_transfer_config=cfg,
                              kv_cache_memory_bytes=256 << 20)
        outs = [r["outputs"][0] for r in first["rounds"]]
        computed, gpu_hits = outs[:3], outs[3:]
        assert all(o["num_cached_tokens"] == 0 for o in computed)
        assert all(o["num_cached_tokens"] == WHOLE for o in gpu_hits)
        assert srv.stats().stored_chunks == 3 * WHOLE // CHUNK
        yield srv, gpu_hits


# "auto" loads synchronously in an idle engine (the copy stream-ordered before the forward);
# "async" is the path of a busy engine (the request waits in WAITING_FOR_REMOTE_KVS).
@pytest.mark.parametrize("load_mode", ["auto", "async"])
def test_second_process_on_gpu_gets_bit_identical_kv(model, stored, load_mode):
    # Three prompts, one generate call each: the transfer engine's later calls take the native
    # kernel launch (its first call per staging buffer goes through Triton's launcher).
    srv, gpu_hits = stored
    before = srv.stats()
    cfg = vs.kvdepot_transfer_config(srv.port, **{"kvdepot.load_mode": load_mode})
    second = vs.run_engine(model, ROUNDS, kv_transfer_config=cfg,
                           kv_cache_memory_bytes=256 << 20)
    for rnd, gpu_hit in zip(second["rounds"], gpu_hits):
        loaded = rnd["outputs"][0]
        assert loaded["num_cached_tokens"] == WHOLE
        assert loaded["tokens"] == gpu_hit["tokens"]
        assert loaded["logprobs"] == gpu_hit["logprobs"]
    stats = srv.stats()
    assert stats.retrieved_chunks - before.retrieved_chunks == 3 * WHOLE // CHUNK
    assert stats.leases_held == 0


def test_cuda_graphs_are_captured_while_the_connector_registers(model):
    """vLLM's default mode captures CUDA graphs at start, in the global capture mode: any
    other thread's allocation, host registration or module load then kills the engine. The
    server is up before the engines start, so the connector's I/O thread registers, pins the
    arena and compiles its kernels while vLLM captures. Both engines must start, and engine B
    (graphs on) must load engine A's chunks bit-identically to A's own GPU prefix-cache hit."""
    graphs = {"enforce_eager": False}
    with vs.KVDepotServer(cpu_buffer_gb=1.0) as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        a = vs.run_engine(model, ROUNDS[:1] * 2, kv_transfer_config=cfg,
                          kv_cache_memory_bytes=256 << 20, engine_args=graphs)
        computed, gpu_hit = (r["outputs"][0] for r in a["rounds"])
        assert computed["num_cached_tokens"] == 0 and gpu_hit["num_cached_tokens"] == WHOLE
        b = vs.run_engine(model, ROUNDS[:1], kv_transfer_config=cfg,
                          kv_cache_memory_bytes=256 << 20, engine_args=graphs)
        loaded = b["rounds"][0]["outputs"][0]
        assert loaded["num_cached_tokens"] == WHOLE
        assert loaded["tokens"] == gpu_hit["tokens"]
        assert loaded["logprobs"] == gpu_hit["logprobs"]
