"""Real vLLM (CPU build): chunks are shared by weights, never by a model's or an adapter's name.

Issue 10, fault 5: a checkpoint replaced in its folder (same path, config, header, sizes and
name) must not load the old weights' KV; a byte-identical copy elsewhere, and copies the user
declares identical (``kvdepot.model_identity``), must. Fault 6: a different LoRA adapter under
the same ``LoRARequest("a", 1, ...)`` label must not load the first adapter's KV; the same
adapter's bytes under any label and path must.

Every engine is a fresh process. A miss (0 hit tokens) is a full prefill and is compared with
the full prefill of an engine without the connector; a hit of the 4 whole chunks of a
1100-token prompt computes the same 76-token tail as vLLM's own prefix-cache hit of that
prompt, and is compared with that. Both exactly: tokens and log-probabilities.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

sys.path.insert(0, os.path.dirname(__file__))
import vllm_lora_support as vls  # noqa: E402
import vllm_support as vs  # noqa: E402

PROMPT = vs.random_prompt(1100, seed=61)  # 4 whole chunks of 256 + 76 tokens (< one 128-block)
HIT = 1024
MAX_TOKENS = 8


def only(result, i=0):
    return result["rounds"][i]["outputs"][0]


def assert_same(out, ref):
    assert out["tokens"] == ref["tokens"]
    assert out["logprobs"] == ref["logprobs"]


def assert_clean(srv):
    stats = srv.stats()
    assert stats.leases_held == 0 and stats.reservations_open == 0


def reshard(src, dst) -> str:
    """The same weights saved again in 1 MB shards with an index: other files, equal tensors."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst, max_shard_size="1MB")
    return str(dst)


def test_checkpoint_replaced_in_place_misses_and_identical_copies_hit(tmp_path):
    ft = str(tmp_path / "served" / "ft")
    vs.write_tiny_llama(ft, seed=1)
    rnd = [{"prompts": [PROMPT], "max_tokens": MAX_TOKENS}]
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        a = only(vs.run_engine(ft, rnd, kv_transfer_config=cfg))
        assert a["num_cached_tokens"] == 0
        assert srv.stats().chunks == 4  # engine A stored every whole chunk of the prompt

        # The rolling update: another fine-tune written over the first, in the same folder.
        weights = os.path.join(ft, "model.safetensors")
        size, config = os.path.getsize(weights), open(os.path.join(ft, "config.json")).read()
        vs.write_tiny_llama(ft, seed=2)
        assert os.path.getsize(weights) == size
        assert open(os.path.join(ft, "config.json")).read() == config

        ref = vs.run_engine(ft, rnd + rnd)  # no connector: a full prefill, then vLLM's own hit
        full, own_hit = only(ref, 0), only(ref, 1)
        assert full["num_cached_tokens"] == 0 and own_hit["num_cached_tokens"] == HIT

        b = only(vs.run_engine(ft, rnd, kv_transfer_config=cfg))
        assert b["num_cached_tokens"] == 0  # before the fix: 1024, the old weights' KV
        assert_same(b, full)

        # A byte-identical copy on another path (new inodes and mtimes) hits B's chunks.
        copy = str(shutil.copytree(ft, tmp_path / "node-2" / "ft-copy"))
        c = only(vs.run_engine(copy, rnd, kv_transfer_config=cfg))
        assert c["num_cached_tokens"] == HIT
        assert_same(c, own_hit)

        # The same weights in other files: shared only when the user says so.
        resharded = reshard(ft, tmp_path / "resharded")
        given = vs.kvdepot_transfer_config(srv.port, **{"kvdepot.model_identity": "tiny-ft-2"})
        d = only(vs.run_engine(ft, rnd, kv_transfer_config=given))
        assert d["num_cached_tokens"] == 0  # its own namespace: nothing stored under it yet
        assert_same(d, full)
        e = only(vs.run_engine(resharded, rnd, kv_transfer_config=given))
        assert e["num_cached_tokens"] == HIT
        assert_same(e, own_hit)
        assert_clean(srv)


def test_other_adapter_under_the_same_label_misses_same_adapter_elsewhere_hits(tmp_path):
    base = vs.write_tiny_llama(tmp_path / "base", seed=0)
    path_a = vls.write_lora_adapter(tmp_path / "adapter-a", seed=1)
    path_b = vls.write_lora_adapter(tmp_path / "adapter-b", seed=2)
    copy_a = str(shutil.copytree(path_a, tmp_path / "node-2" / "adapter-a"))

    def rnd(lora):
        return {"prompts": [PROMPT], "max_tokens": MAX_TOKENS, "lora": lora}

    # Without the connector: B's and A's full prefills, then vLLM's own hit of A.
    a = ["a", 1, path_a]
    ref = vls.run_lora_engine(base, [rnd(["b", 2, path_b]), rnd(a), rnd(a)])
    full_b, full_a, own_hit_a = only(ref, 0), only(ref, 1), only(ref, 2)
    assert full_a["num_cached_tokens"] == 0 and own_hit_a["num_cached_tokens"] == HIT
    assert full_a["tokens"] != full_b["tokens"]  # the adapters matter

    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        one = only(vls.run_lora_engine(base, [rnd(a)], kv_transfer_config=cfg))
        assert one["num_cached_tokens"] == 0
        assert_same(one, full_a)
        assert srv.stats().chunks == 4

        # Engine 2 serves adapter B under engine 1's label ("a", 1).
        two = only(vls.run_lora_engine(base, [rnd(["a", 1, path_b])], kv_transfer_config=cfg))
        assert two["num_cached_tokens"] == 0  # before the fix: 1024, adapter A's KV
        assert_same(two, full_b)

        # Adapter A's bytes under another label, id and path: A's chunks.
        three = only(vls.run_lora_engine(base, [rnd(["tenant-x", 5, copy_a])], kv_transfer_config=cfg))
        assert three["num_cached_tokens"] == HIT
        assert_same(three, own_hit_a)
        assert_clean(srv)
