"""The soak's processes and what happens to them: each one started, SIGKILLed and restarted,
SIGSTOPped and SIGCONTed (``Child``); the chaos thread that picks when and whom (``Chaos``);
and the sampler that records the server's memory and /stats (``Sampler``)."""

from __future__ import annotations

import heapq
import itertools
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from soak_checks import http_stats

KINDS = ("server", "client", "engine")


class Child:
    """One role of the soak (the server, a client, an engine) across its incarnations: every
    start is a new process, numbered from 0, with its own log ``<name>-<n>.log``."""

    def __init__(self, name: str, kind: str, argv: Callable[[int], list[str]], log_dir: Path,
                 env: dict[str, str] | None = None, ready: Callable[["Child"], bool] | None = None):
        self.name, self.kind = name, kind
        self._argv, self._env, self._ready = argv, env, ready
        self.log_dir = log_dir
        self.incarnation = -1
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self.expected_exit = True  # nothing runs yet
        self.started_at = 0.0
        self.ready_at: float | None = None

    def log_path(self, incarnation: int | None = None) -> Path:
        return self.log_dir / f"{self.name}-{self.incarnation if incarnation is None else incarnation}.log"

    def start(self) -> None:
        self.incarnation += 1
        log = open(self.log_path(), "wb")
        self.proc = subprocess.Popen(self._argv(self.incarnation), stdout=log, stderr=subprocess.STDOUT,
                                     env=self._env, cwd=str(Path(__file__).resolve().parent.parent))
        log.close()
        self.stopped, self.expected_exit = False, False
        self.started_at, self.ready_at = time.monotonic(), None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        """Alive and done starting (``ready``: e.g. the engine wrote its marker)."""
        if self.ready_at is None and self.alive and (self._ready is None or self._ready(self)):
            self.ready_at = time.monotonic()
        return self.ready_at is not None and self.alive

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.proc.pid, sig)  # type: ignore[union-attr]

    def kill(self) -> None:
        self.expected_exit = True
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.stopped = False

    def sigstop(self) -> None:
        self.signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        self.signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float) -> str:
        """SIGTERM (after a SIGCONT if stopped) and wait; SIGKILL past ``timeout``. Says which."""
        self.expected_exit = True
        if not self.alive:
            return "gone"
        self.sigcont()
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)  # type: ignore[union-attr]
            return f"exit {self.proc.returncode}"  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()
            return "killed after SIGTERM timed out"

    def memory_mb(self) -> dict[str, float] | None:
        """VmRSS, RssAnon and RssShmem of the live process, in MiB."""
        if not self.alive:
            return None
        fields = {"VmRSS:": "rss_mb", "RssAnon:": "anon_mb", "RssShmem:": "shmem_mb"}
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:  # type: ignore[union-attr]
                for line in f:
                    parts = line.split()
                    if parts and parts[0] in fields:
                        out[fields[parts[0]]] = int(parts[1]) / 1024
        except OSError:
            return None
        return out if len(out) == 3 else None


@dataclass
class ChaosSettings:
    mean_interval_s: float = 5.0  # between two events (exponentially distributed)
    stop_s: tuple[float, float] = (0.1, 5.0)  # a SIGSTOP lasts this long, uniformly
    server_kill_until: float = 0.6  # fraction of the run after which the server is only stopped
    engine_min_uptime_s: float = 45.0  # an engine generates this long between two kills
    weights: tuple[float, float, float] = (1.0, 3.0, 1.0)  # server, client, engine
    seed: int = 0


class Chaos(threading.Thread):
    """SIGKILLs and SIGSTOPs random processes at random times; restarts the killed ones (the
    server on the same port, segment name and disk directory) and SIGCONTs the stopped ones.
    The first events are every (kind, signal) pair once, in random order, so a short run
    covers them all. A process that exits without being killed is an ``unexpected`` exit:
    recorded with its log tail, and restarted."""

    def __init__(self, children: dict[str, list[Child]], settings: ChaosSettings, duration_s: float,
                 start_server: Callable[[], None]):
        super().__init__(name="soak-chaos", daemon=True)
        self.children, self.settings, self.duration_s = children, settings, duration_s
        self._start_server = start_server
        self.rng = random.Random(settings.seed)
        self.events: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.unexpected: list[dict[str, Any]] = []
        self._actions: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._pending_restart: set[str] = set()
        self._halt = threading.Event()
        self._lock = threading.Lock()  # the sampler reads ``stopped`` and ``alive`` meanwhile
        self.t0 = time.monotonic()
        kinds = [k for k in KINDS if children.get(k)]
        self._deck = [(k, s) for k in kinds for s in ("kill", "stop")]
        self.rng.shuffle(self._deck)

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._actions, (time.monotonic() + delay, next(self._seq), action))

    def run(self) -> None:
        next_event = time.monotonic() + self.rng.expovariate(1 / self.settings.mean_interval_s)
        while not self._halt.is_set():
            now = time.monotonic()
            while self._actions and self._actions[0][0] <= now:
                with self._lock:
                    heapq.heappop(self._actions)[2]()
            with self._lock:
                self._restart_crashed()
                if now >= next_event and self._event(now - self.t0):
                    next_event = now + self.rng.expovariate(1 / self.settings.mean_interval_s)
            self._halt.wait(0.05)

    def _eligible(self, kind: str, sig: str, elapsed: float) -> list[Child]:
        out = []
        for c in self.children.get(kind, []):
            if c.stopped or c.name in self._pending_restart or not c.is_ready():
                continue
            if sig == "kill" and kind == "engine" and \
                    time.monotonic() - c.ready_at < self.settings.engine_min_uptime_s:  # type: ignore[operator]
                continue
            if sig == "kill" and kind == "server" and elapsed > self.settings.server_kill_until * self.duration_s:
                continue
            out.append(c)
        return out

    def _event(self, elapsed: float) -> bool:
        """One event now, if any target is eligible; False to try again shortly."""
        choice = None
        for i, (kind, sig) in enumerate(self._deck):
            if self._eligible(kind, sig, elapsed):
                choice = self._deck.pop(i)
                break
        if choice is None:
            if self._deck and elapsed < 0.5 * self.duration_s:
                return False  # the first events cover every pair: wait for their targets
            kinds = [k for k in KINDS if self.children.get(k)]
            weights = [self.settings.weights[KINDS.index(k)] for k in kinds]
            choice = (self.rng.choices(kinds, weights)[0], self.rng.choice(("kill", "stop")))
        kind, sig = choice
        targets = self._eligible(kind, sig, elapsed)
        if not targets:
            return False
        target = self.rng.choice(targets)
        event = {"t": round(elapsed, 2), "kind": kind, "signal": sig, "target": target.name,
                 "incarnation": target.incarnation}
        if sig == "stop":
            duration = self.rng.uniform(*self.settings.stop_s)
            target.sigstop()
            inc = target.incarnation
            self._later(duration, lambda: target.sigcont() if target.incarnation == inc else None)
            event["stopped_s"] = round(duration, 2)
        else:
            target.kill()
            down = self.rng.uniform(0.2, 3.0) if kind == "server" else self.rng.uniform(0.1, 2.0)
            self._pending_restart.add(target.name)
            self._later(down, lambda: self._restart(target))
            event["down_s"] = round(down, 2)
        self.events.append(event)
        self.counts[f"{kind}:{sig}"] += 1
        return True

    def _restart(self, child: Child) -> None:
        self._pending_restart.discard(child.name)
        if child.kind == "server":
            self._start_server()
        else:
            child.start()

    def _restart_crashed(self) -> None:
        for child in itertools.chain.from_iterable(self.children.values()):
            if child.proc is None or child.alive or child.expected_exit or child.name in self._pending_restart:
                continue
            tail = child.log_path().read_text(errors="replace")[-3000:]
            self.unexpected.append({"t": round(time.monotonic() - self.t0, 2), "target": child.name,
                                    "incarnation": child.incarnation, "returncode": child.proc.returncode,
                                    "log_tail": tail})
            child.expected_exit = True
            self._restart(child)

    def halt(self) -> None:
        """No more events, restarts or SIGCONTs."""
        self._halt.set()
        if self.is_alive():
            self.join()

    def finish(self) -> None:
        """Stop the chaos: every stopped process continues, the server runs (restarted if it
        was down); killed clients and engines stay down (the run is over)."""
        self.halt()
        with self._lock:
            for child in itertools.chain.from_iterable(self.children.values()):
                if child.stopped:
                    child.sigcont()
            server = self.children["server"][0]
            if not server.alive:
                self._start_server()
            self._pending_restart.clear()


class Sampler(threading.Thread):
    """Every ``every_s``: the server's memory (and every other live process's, kept as a
    maximum per kind) and, unless it is stopped, its /stats (the last of each boot is kept:
    its counters, summed over boots, lose at most ``every_s`` before each kill)."""

    def __init__(self, children: dict[str, list[Child]], http_port: int, every_s: float = 2.0):
        super().__init__(name="soak-sampler", daemon=True)
        self.children, self.http_port, self.every_s = children, http_port, every_s
        self.server_memory: list[dict[str, Any]] = []
        self.max_rss_mb: Counter[str] = Counter()
        self.last_stats: dict[str, dict[str, Any]] = {}  # by boot id
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        server = self.children["server"][0]
        inc, stopped = server.incarnation, server.stopped
        mem = server.memory_mb()
        if mem is not None:
            self.server_memory.append({"t": round(time.monotonic() - self.t0, 2), "incarnation": inc,
                                       **{k: round(v, 2) for k, v in mem.items()}})
        for kind in ("client", "engine"):
            for child in self.children.get(kind, []):
                m = child.memory_mb()
                if m is not None:
                    self.max_rss_mb[kind] = max(self.max_rss_mb[kind], round(m["rss_mb"], 1))
        if not stopped and server.alive:
            stats = http_stats(self.http_port, timeout=1.0)
            if stats is not None:
                self.last_stats[stats["boot_id"]] = stats

    def finish(self) -> None:
        self._halt.set()
        self.join()
        self.sample()
