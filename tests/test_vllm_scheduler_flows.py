"""Request flows through vLLM's real Scheduler and the connector's real worker half.

Every test drives one or two engines of tests/scheduler_harness.py (vLLM 0.32's v1 Scheduler,
the KVDepotConnector's two halves, CPU KV tensors of 16-token blocks, a model stand-in whose
KV is a hash of the whole prefix) against a real kvdepot server with 64-token chunks. Any
wrong KV byte of a computed position fails the step that would read it; every output is
checked against the stand-in's reference; every get_num_new_matched_tokens that vLLM makes
is asked a second time and must answer the same; every scenario ends with vLLM's no-leak
conditions (no request, every block free), a server holding no lease and no open
reservation once the engine idles, and a new request's lookup answered the same twice.
Slow copies are a gate on the worker's copier (``gate``); server outages are a SIGKILL or a
SIGSTOP of the real server process.

The faults of issue 10 are named ``test_faultN_...``.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
import scheduler_harness as sh  # noqa: E402

MODES = ["sync", "async"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return sh.write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def server(tmp_path):
    srv = sh.DepotServer(tmp_path).start()
    yield srv
    srv.close()


@pytest.fixture
def engines(model_dir, server):
    made = []

    def make(**kwargs) -> sh.Harness:
        h = sh.Harness(model_dir, server, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def gate(engines):
    # Set up after (torn down before) the engines: no copy is held while they shut down.
    g = sh.CopyGate()
    yield g
    g.close()


def wait_for(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def assert_output(h: sh.Harness, req_id: str, tokens, max_tokens: int) -> None:
    assert h.finished.get(req_id) == "length", (req_id, h.finished)
    assert h.outputs[req_id] == sh.reference_output(tokens, max_tokens), req_id


def finish_clean(h: sh.Harness, tokens=None, hits: int | None = None) -> None:
    """The end of a scenario: vLLM holds no request and no block, the server no lease and no
    reservation (without any further step); then a new request for ``tokens`` is asked about
    twice, with equal answers (``hits`` tokens offered, when given), and leaves nothing held."""
    h.check_clean()
    if tokens is not None:
        offered = h.probe(tokens)
        assert hits is None or offered == hits, (offered, hits)
        h.check_clean()


def serve_another(h: sh.Harness) -> None:
    """The engine goes on serving (steps go on, as they would with other requests)."""
    p = sh.prompt(20, seed=10)
    h.add("another", p, 8)
    h.run_until_finished("another")
    assert_output(h, "another", p, 8)


P150 = sh.prompt(150, seed=1)  # 2 whole chunks and 22 tokens
PA = sh.prompt(136, seed=2)  # the request that gets preempted: 2 whole chunks
PB = sh.prompt(100, seed=3)  # the higher-priority request that preempts it


def preempting_engine(engines, **kwargs) -> sh.Harness:
    """12 usable blocks; A (136 tokens) takes 9; B is admitted with a 48-token first chunk and
    preempts A (lower priority) when its second chunk needs A's blocks."""
    kwargs.setdefault("load_mode", "async")
    return engines(policy="priority", num_blocks=13, long_prefill_token_threshold=48, **kwargs)


def preempt_a(h: sh.Harness, server) -> None:
    """A prefills and stores its 2 chunks, B arrives and preempts it."""
    h.add("A", PA, 20, priority=1)
    h.step()
    wait_for(lambda: server.stored_chunks(h.spec, PA) == 2, "A's chunks on the server")
    h.add("B", PB, 2, priority=0)
    h.run(until=lambda: "A" in h.preempted)
    assert "A" in h.preempted, h.describe()


def stored_prompt_engine(engines, server, **kwargs) -> sh.Harness:
    """An engine that has computed and stored P150's 2 chunks, all its requests done."""
    h = engines(**kwargs)
    h.add("first", P150, 1)
    h.run_until_finished("first")
    h.check_clean()
    wait_for(lambda: server.stored_chunks(h.spec, P150) == 2, "the prompt's chunks on the server")
    return h


# --- the general matrix ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_store_then_a_fresh_engine_loads(engines, server, mode):
    """Store, finish; a fresh engine loads whole chunks (and a chunk after its own prefix-cache
    hit) with exactly the bytes the first computed."""
    q = P150[:64] + sh.prompt(100, seed=4)
    first = engines(load_mode=mode, prefix_caching=True)
    first.add("p", P150, 4)
    first.add("q", q, 4)
    first.run_until_finished("p", "q")
    first.check_clean()
    assert server.stored_chunks(first.spec, P150) == 2 and server.stored_chunks(first.spec, q) == 2

    second = engines(load_mode=mode, prefix_caching=True)
    second.add("p", P150, 4)
    second.run_until_finished("p")
    second.add("q", q, 4)  # chunk 0 from its own prefix cache, chunk 1 from the server
    second.run_until_finished("q")
    assert second.external == {"p": [128], "q": [64]}
    for r, t in (("p", P150), ("q", q)):
        assert_output(second, r, t, 4)
    finish_clean(second, P150, 128)


@pytest.mark.parametrize("end", ["length", "abort", "error"])
def test_request_ends_while_its_store_copies(engines, server, gate, end):
    """A request finishes (or is aborted, or fails) while its store is still copying: its
    blocks stay with it until the copy is done, the store lands, and a later request loads
    those exact bytes."""
    h = engines()
    gate.hold("store")
    h.add("p", P150, 1 if end == "length" else 8)
    h.step()
    gate.wait_held("store")
    if end != "length":
        h.abort("p", error=end == "error")
    assert "p" in h.finished
    for _ in range(3):
        h.step()
    assert "p" in h.scheduler.requests, "the blocks were freed while a store was reading them"
    gate.release("store")
    h.check_clean()
    assert server.stored_chunks(h.spec, P150) == 2
    h.add("again", P150, 4)
    h.run_until_finished("again")
    assert h.external["again"] == [128]
    assert_output(h, "again", P150, 4)
    finish_clean(h, P150, 128)


@pytest.mark.parametrize("mode", MODES)
def test_abort_while_its_load_runs(engines, server, gate, mode):
    """A request is aborted while its load from the server is in flight (asynchronous: in
    WAITING_FOR_REMOTE_KVS; synchronous: the abort arrives during its first step)."""
    h = stored_prompt_engine(engines, server, load_mode=mode)
    if mode == "async":
        gate.hold("load")
        h.add("second", P150, 4)
        h.run(until=lambda: h.status("second") == "WAITING_FOR_REMOTE_KVS")
        gate.wait_held("load")
        h.abort("second")
        h.step()
        h.step()
        freed_while_loading = "second" not in h.scheduler.requests
        gate.release("load")
        h.check_clean()  # the engine idles: the load's lease is given back all the same
        serve_another(h)
        assert not freed_while_loading, "blocks went back to vLLM while a load was writing them"
    else:
        h.add("second", P150, 4)
        h.step(after_forward=lambda: h.abort("second"))
        assert h.external.get("second") == [128]
    h.check_clean()
    h.add("third", P150, 4)
    h.run_until_finished("third")
    assert h.external["third"] == [128]
    assert_output(h, "third", P150, 4)
    finish_clean(h, P150, 128)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
@pytest.mark.parametrize("mode", MODES)
def test_preempted_request_resumes_from_the_server(engines, server, mode, prefix_caching):
    """Store, preemption, resume with a load (the whole prefix from the server, or the chunk
    after what vLLM's own prefix cache kept), finish: right bytes, right output."""
    h = preempting_engine(engines, load_mode=mode, prefix_caching=prefix_caching)
    preempt_a(h, server)
    h.run_until_finished("A", "B")
    assert h.external.get("A"), "A resumed without loading from the server"
    assert_output(h, "A", PA, 20)
    assert_output(h, "B", PB, 2)
    finish_clean(h, PA, 128)


@pytest.mark.parametrize("mode", MODES)
def test_abort_in_the_step_that_resumes_it(engines, server, mode):
    """Preempted, then aborted in the very step whose schedule starts its resume load."""
    h = preempting_engine(engines, load_mode=mode)
    preempt_a(h, server)
    h.run_until_finished("B")
    assert "A" not in h.external
    h.run(until=lambda: "A" in h.finished, after_forward=lambda: "A" in h.external and h.abort("A"))
    assert h.finished["A"] == "FINISHED_ABORTED" and h.external["A"] == [128]
    finish_clean(h, PA, 128)


def test_abort_while_preempted(engines, server):
    """Preempted (its blocks gone, its stores done), then aborted before it resumes."""
    h = preempting_engine(engines)
    preempt_a(h, server)
    h.abort("A")
    h.run_until_finished("B")
    assert_output(h, "B", PB, 2)
    finish_clean(h, PA, 128)


def test_server_killed_while_a_store_copies(engines, server, gate):
    """The server dies mid-store: the request still finishes right, nothing leaks, and once a
    new server boots on the same port the engine stores and loads again."""
    h = engines(extra={"timeout_ms": 300})
    gate.hold("store")
    h.add("p", P150, 3)
    h.step()
    gate.wait_held("store")
    server.kill()
    gate.release("store")
    h.run_until_finished("p")
    assert_output(h, "p", P150, 3)
    server.restart()
    h.check_clean()
    # The connector notices the new boot on its next calls (what it sends meanwhile is lost):
    # within a few seconds the same prompt must be served from the cache again.
    q, deadline, attempt = sh.prompt(140, seed=5), time.monotonic() + 10, 0
    while True:
        attempt += 1
        h.add(f"q{attempt}", q, 2)
        h.run_until_finished(f"q{attempt}")
        assert_output(h, f"q{attempt}", q, 2)
        h.check_clean()
        if h.external.get(f"q{attempt}") == [128]:
            break
        assert time.monotonic() < deadline, "the cache served no hit in 10 s after the restart"
        time.sleep(0.2)
    finish_clean(h, q, 128)


@pytest.mark.parametrize("mode", MODES)
def test_server_killed_while_a_load_runs(engines, server, gate, mode):
    """The server dies between the lookup and the copy: the request loads the chunks (they
    stay readable in the mapped segment) or recomputes them; never a wrong byte."""
    h = stored_prompt_engine(engines, server, load_mode=mode, extra={"timeout_ms": 300})
    h.add("second", P150, 4)
    if mode == "async":
        gate.hold("load")
        h.run(until=lambda: h.status("second") == "WAITING_FOR_REMOTE_KVS")
        gate.wait_held("load")
        server.kill()
        gate.release("load")
    else:
        h.step(after_schedule=lambda: "second" in h.external and server.kill())
    h.run_until_finished("second")
    assert_output(h, "second", P150, 4)
    server.restart()
    finish_clean(h, P150, 0)


# --- the faults of issue 10 --------------------------------------------------------------------


def test_fault1_abort_while_the_resume_load_runs_after_preemption(engines, server, gate):
    """Fault 1: A stores its 2 chunks, is preempted (priority scheduling), resumes with an
    asynchronous load from the server (WAITING_FOR_REMOTE_KVS) and is aborted while that load
    runs. A's blocks must stay with it until the load is done, and vLLM must free A exactly
    once (at 423e966 the worker reports A both as finished sending and as finished
    receiving: vLLM frees it twice and its scheduler fails ``assert req_id in
    self.requests``, which kills the EngineCore), with no block or lease left behind."""
    h = preempting_engine(engines, load_mode="async")
    preempt_a(h, server)
    h.run_until_finished("B")
    gate.hold("load")
    h.run(until=lambda: h.status("A") == "WAITING_FOR_REMOTE_KVS")
    gate.wait_held("load")
    assert h.external.get("A") == [128]
    h.abort("A")
    h.step()  # the abort reaches the worker while A's load is still copying
    h.step()
    freed_while_loading = "A" not in h.scheduler.requests
    gate.release("load")
    serve_another(h)
    assert not freed_while_loading, "A's blocks went back to vLLM while its load was writing them"
    finish_clean(h, PA, 128)


@pytest.mark.parametrize("mode", MODES)
def test_fault2_store_given_up_at_preemption_never_commits_reused_blocks(engines, server, gate, mode):
    """Fault 2: A's store is still copying when preemption handling gives up waiting for it
    (kvdepot.preempt_wait_ms, 300 ms here); B takes A's blocks and writes them. The store must
    never commit B's bytes under A's keys: resumed, A loads correct KV or recomputes (the
    stand-in checks every byte), and so does a fresh engine."""
    h = preempting_engine(engines, load_mode=mode, extra={"preempt_wait_ms": 300})
    gate.hold("store")
    h.add("A", PA, 20, priority=1)
    h.step()
    gate.wait_held("store")
    h.add("B", PB, 2, priority=0)
    gate.release_after("store", 9.0)  # a connector that keeps waiting gets its copy done
    held = []

    def preemption_step_done():
        # B's forward has written into A's old blocks: let the held copy go on, reading them.
        if "A" in h.preempted and not held:
            held.append(gate.held["store"])
            gate.release("store")

    h.run(until=lambda: "A" in h.preempted, after_forward=preemption_step_done)
    assert held == [1], "A's store was not copying when A was preempted"
    h.run_until_finished("A", "B")
    assert_output(h, "A", PA, 20)
    assert_output(h, "B", PB, 2)
    finish_clean(h, PA)
    fresh = engines(load_mode=mode)
    fresh.add("A", PA, 20)
    fresh.run_until_finished("A")
    assert_output(fresh, "A", PA, 20)
    finish_clean(fresh)


def test_fault3_first_request_of_a_new_engine_is_stored_without_later_steps(engines, server):
    """Fault 3 (in-process half): an engine serves one request right after it started (as
    ``LLM(...)`` then ``generate``), then sits idle: nobody steps it any more. The chunks it
    computed must reach the server anyway: stores are issued in the step that computed them."""
    h = engines(wait_ready=False)
    p = sh.prompt(200, seed=6)  # 3 whole chunks
    h.add("only", p, 1)
    while h.scheduler.has_unfinished_requests():  # what LLM.generate steps in-process
        h.step()
    assert_output(h, "only", p, 1)
    wait_for(lambda: server.stored_chunks(h.spec, p) == 3, "the request's 3 chunks on the server")
    finish_clean(h, p, 192)


def test_fault3_chunks_stored_by_the_step_that_computed_them(engines, server):
    """Fault 3: after the one step that prefilled a request, with no further step, its whole
    chunks reach the server."""
    h = engines()
    p = sh.prompt(200, seed=7)
    h.add("r", p, 30)
    h.step()
    wait_for(lambda: server.stored_chunks(h.spec, p) == 3, "the request's 3 chunks on the server")
    h.run_until_finished("r")
    finish_clean(h, p, 192)


def test_fault4_lease_of_a_lookup_answered_after_its_request_was_aborted(engines, server):
    """Fault 4: a request is aborted while its lookup is in flight (the server paused); the
    reply that comes later carries a lease, which must be released, not held for lease_ms."""
    h = stored_prompt_engine(engines, server)
    server.pause()
    try:
        h.add("second", P150, 4)
        h.step()
        assert h.status("second") == "WAITING", "the lookup was answered although the server is paused"
        h.abort("second")
        h.run()
    finally:
        server.resume()
    h.check_clean(grace_s=5.0)
    finish_clean(h, P150, 128)


def test_fault4_lease_of_a_lookup_answered_after_its_deadline(engines, server):
    """Fault 4: a lookup misses its deadline (server paused), the request is recomputed and
    finishes; the late reply's lease (and any late reservation) must be released."""
    h = stored_prompt_engine(engines, server, extra={"timeout_ms": 300})
    server.pause()
    try:
        h.add("second", P150, 2)
        h.run_until_finished("second", timeout=10)
        assert "second" not in h.external
        h.run()
        time.sleep(0.5)  # past the worker's deadline for a store it may have sent
    finally:
        server.resume()
    assert_output(h, "second", P150, 2)
    h.check_clean(grace_s=5.0)
    finish_clean(h, P150, 128)


@pytest.mark.parametrize("mode", MODES)
def test_fault7_store_dropped_at_preemption_is_planned_again(engines, server, gate, mode):
    """Fault 7 (connector half): chunked prefill, stores queued behind a slow one when the
    request is preempted; the queued ones are dropped. When the request resumes they must be
    planned again, so that its prefix has no hole: afterwards every whole chunk is a hit."""
    h = engines(policy="priority", num_blocks=21, max_num_batched_tokens=96,
                long_prefill_token_threshold=64, load_mode=mode)
    p = sh.prompt(264, seed=8)  # 4 whole chunks
    gate.hold("store")
    h.add("A", p, 4, priority=1)
    h.step()
    gate.wait_held("store")
    h.add("B", sh.prompt(96, seed=9), 2, priority=0)
    h.run(until=lambda: "A" in h.preempted,
          after_schedule=lambda: "A" in h.preempted and gate.release_after("store", 0.3))
    h.run_until_finished("A", "B")
    assert_output(h, "A", p, 4)
    h.check_clean()
    assert server.stored_chunks(h.spec, p) == 4
    finish_clean(h, p, 256)
