"""A real kvdepot server in a subprocess, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `python -m kvdepot.server` and waits for its start line."""

    def __init__(
        self,
        *,
        buffer_gb: float = 0.05,
        chunk_size: int = 256,
        port: int | None = None,
        http_port: int | None = None,
        shm_name: str | None = None,
        extra: list[str] | None = None,
        log_path: Path | None = None,
    ):
        self.port = port or free_port()
        self.http_port = http_port if http_port is not None else free_port()
        self.shm_name = shm_name or f"kvdepot-test-{uuid.uuid4().hex[:10]}"
        self.args = [
            sys.executable, "-m", "kvdepot.server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--http-port", str(self.http_port),
            "--cpu-buffer-size", str(buffer_gb),
            "--chunk-size", str(chunk_size),
            "--shm-name", self.shm_name,
            *(extra or []),
        ]
        self.log_path = log_path or Path(f"/tmp/{self.shm_name}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            if "cache server is running" in self.log():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(f"/dev/shm/{self.shm_name}")
        except FileNotFoundError:
            pass
