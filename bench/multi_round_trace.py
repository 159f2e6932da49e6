"""Per-step trace of a vLLM engine with the kvdepot connector (bench/vllm_multi_round.py --trace).

Installed in the engine's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0: scheduler, worker and
the connector's I/O thread are all in it) by wrapping functions, never by editing kvdepot or
vLLM. What one round records (times in ms from the round's start, host clock):

- ``steps``: one per scheduler step: when ``schedule()`` started and how long it took, the
  tokens and requests it scheduled, how many requests were running, waiting, and waiting for
  their loads (WAITING_FOR_REMOTE_KVS) after it; the host time of ``execute_model`` and
  ``update_from_output`` for that step's output; and the time each connector hook took within
  the step (``hooks``: name -> [calls, ms]), with the lookups vLLM was told to ask again
  (``ask_again``) and the tokens the connector offered (``offered_tokens``).
- ``loads``: every load the workers ran, with the step it started in and whether it was
  synchronous: ``engine`` (enqueued on the engine thread: issue start and duration, the GPU
  end from a CUDA event that waits for the copy, within ~0.1 ms, and when the worker first
  saw it done) or ``io`` (the I/O thread: queued, start, end), chunks, bytes.
- ``stores``: every store job: queued, start, end on the I/O thread (reserve, copy, commit),
  chunks and bytes asked for (chunks the server already had are skipped, but counted here).
- ``summary``: totals and the union of the loads' and stores' busy intervals.

A load or store is reported in the round it ended in (a store of round 1 that ends in round 2
has negative times there). Hooks called with no step started yet in the round count under
``outside_steps``. Anything this kvdepot or vLLM no longer has is listed in ``missing`` and
not traced.
"""

from __future__ import annotations

import time
from typing import Any, Callable

SCHEDULER_HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                   "update_connector_output", "request_finished")
WORKER_HOOKS = ("handle_preemptions", "start_load_kv", "wait_for_save", "get_finished")
# Record fields that are points in time (the rest are durations): reported from the round's start.
TIME_POINTS = {"t_ms", "update_at_ms", "queued_ms", "start_ms", "end_ms", "issue_ms", "seen_done_ms", "gpu_end_ms"}


class EngineTrace:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self._t0 = time.perf_counter()  # one clock for the engine's life: jobs span rounds
        self._round_ms = 0.0
        self._steps: list[dict] = []
        self._by_output: dict[int, dict] = {}  # id(scheduler_output) -> step record
        self._outside: dict[str, list] = {}
        self._loads: list[dict] = []
        self._stores: list[dict] = []
        self._engine_loads: dict[int, dict] = {}  # id(InFlightLoad) -> its record
        self._gpu_ends: list[tuple[dict, Any]] = []  # (record, CUDA event after the copy)
        self._gpu_ref: tuple[Any, float] | None = None  # (event, host time it completed)
        self._trace_stream = None

    # --- installation ----------------------------------------------------------------------

    def _now(self) -> float:
        return (time.perf_counter() - self._t0) * 1e3

    def _wrap(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            self.missing.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}")
            return
        setattr(owner, name, make(original))

    def install_connector(self) -> None:
        """Class-level wraps; call before the engine is built."""
        import importlib

        from kvdepot.integrations.vllm import KVDepotConnector

        for name in SCHEDULER_HOOKS + WORKER_HOOKS:
            self._wrap(KVDepotConnector, name, lambda orig, n=name: self._timed_hook(orig, n))
        wraps = [("kvdepot.connector.jobs", "Job", "__init__", self._stamp_job),
                 ("kvdepot.connector.jobs", "ServerJobs", "load", lambda orig: self._io_job(orig, "_loads")),
                 ("kvdepot.connector.jobs", "ServerJobs", "store", lambda orig: self._io_job(orig, "_stores")),
                 ("kvdepot.connector.engine_loads", "EngineThreadLoads", "start", self._engine_load_start),
                 ("kvdepot.connector.engine_loads", "EngineThreadLoads", "reap", self._engine_load_reap)]
        for module, cls, name, make in wraps:
            try:
                owner = getattr(importlib.import_module(module), cls)
            except (ImportError, AttributeError):
                self.missing.append(f"{module}.{cls}")
                continue
            self._wrap(owner, name, make)

    def install_engine(self, llm: Any) -> None:
        """Instance-level wraps of the in-process engine core's scheduler and executor."""
        core = llm.llm_engine.engine_core.engine_core
        self._wrap(core.scheduler, "schedule", self._schedule)
        self._wrap(core.scheduler, "update_from_output", self._update_from_output)
        self._wrap(core.model_executor, "execute_model", self._execute_model)
        self._scheduler = core.scheduler

    # --- rounds ----------------------------------------------------------------------------

    def begin_round(self) -> None:
        # Loads and stores that ended since the last round's records count in this round.
        self._steps, self._by_output, self._outside = [], {}, {}
        self._round_ms = self._now()

    def take_round(self) -> dict:
        """The round's records (call once the round's requests are all finished)."""
        self._resolve_gpu_ends()
        # Loads still in flight now are left without an end (their records are reported now).
        self._gpu_ends, self._engine_loads = [], {}
        for rec in self._steps + self._loads + self._stores:
            for key in TIME_POINTS.intersection(rec):
                if rec[key] is not None:
                    rec[key] -= self._round_ms
        out = {"steps": self._steps, "loads": self._loads, "stores": self._stores,
               "outside_steps": self._outside, "summary": summarize(self._steps, self._loads, self._stores)}
        self._steps, self._loads, self._stores = [], [], []
        if self.missing:
            out["missing"] = self.missing
        return out

    # --- the scheduler and executor --------------------------------------------------------

    def _schedule(self, orig: Callable) -> Callable:
        def schedule(*a, **k):
            rec: dict[str, Any] = {"t_ms": self._now(), "hooks": {}}
            self._steps.append(rec)
            out = orig(*a, **k)
            rec["schedule_ms"] = self._now() - rec["t_ms"]
            rec["tokens"] = int(getattr(out, "total_num_scheduled_tokens", 0))
            rec["reqs"] = len(getattr(out, "num_scheduled_tokens", {}) or {})
            sched = self._scheduler
            waiting = [r for q in (getattr(sched, "waiting", ()), getattr(sched, "skipped_waiting", ()))
                       for r in q]
            rec["running"] = len(sched.running)
            rec["waiting"] = len(waiting)
            rec["waiting_for_loads"] = sum(1 for r in waiting if _status(r) == "WAITING_FOR_REMOTE_KVS")
            self._by_output[id(out)] = rec
            return out

        return schedule

    def _execute_model(self, orig: Callable) -> Callable:
        def execute_model(scheduler_output, *a, **k):
            t = self._now()
            try:
                return orig(scheduler_output, *a, **k)
            finally:
                rec = self._by_output.get(id(scheduler_output))
                if rec is not None:
                    rec["execute_ms"] = self._now() - t

        return execute_model

    def _update_from_output(self, orig: Callable) -> Callable:
        def update_from_output(scheduler_output, *a, **k):
            t = self._now()
            try:
                return orig(scheduler_output, *a, **k)
            finally:
                rec = self._by_output.pop(id(scheduler_output), None)
                if rec is not None:
                    rec["update_at_ms"] = t
                    rec["update_ms"] = self._now() - t

        return update_from_output

    # --- connector hooks -------------------------------------------------------------------

    def _timed_hook(self, orig: Callable, name: str) -> Callable:
        def hook(conn, *a, **k):
            t = time.perf_counter()
            out = orig(conn, *a, **k)
            ms = (time.perf_counter() - t) * 1e3
            rec = self._steps[-1] if self._steps else None
            hooks = rec["hooks"] if rec is not None else self._outside
            slot = hooks.setdefault(name, [0, 0.0])
            slot[0] += 1
            slot[1] += ms
            if rec is not None and name == "get_num_new_matched_tokens" and isinstance(out, tuple):
                if out[0] is None:
                    rec["ask_again"] = rec.get("ask_again", 0) + 1
                else:
                    rec["offered_tokens"] = rec.get("offered_tokens", 0) + int(out[0])
            return out

        return hook

    # --- loads and stores ------------------------------------------------------------------

    def _stamp_job(self, orig: Callable) -> Callable:
        def init(job, *a, **k):
            orig(job, *a, **k)
            try:
                job._trace_queued = time.perf_counter()
            except AttributeError:  # a Job with __slots__: no queue time
                pass

        return init

    def _io_job(self, orig: Callable, records: str) -> Callable:
        """``records``: the attribute holding the round's list (a new list each round)."""
        def run(jobs_self, job, *a, **k):
            start = self._now()
            queued = getattr(job, "_trace_queued", None)
            ns = getattr(getattr(jobs_self, "_link", None), "ns", None)
            chunks = int(getattr(job.spec, "num_chunks", 0))
            rec = {"req": job.spec.req_id, "path": "io", "chunks": chunks,
                   "bytes": chunks * int(getattr(ns, "slot_bytes", 0) or 0),
                   "queued_ms": (queued - self._t0) * 1e3 if queued else None, "start_ms": start}
            if records == "_loads":
                rec["step"] = len(self._steps) - 1
                rec["sync"] = bool(getattr(job.spec, "sync", False))
            try:
                out = orig(jobs_self, job, *a, **k)
            finally:
                rec["end_ms"] = self._now()
                getattr(self, records).append(rec)
            if isinstance(out, tuple) and out and isinstance(out[0], list):
                rec["failed_blocks"] = len(out[0])
            return out

        return run

    def _engine_load_start(self, orig: Callable) -> Callable:
        def start(loads_self, spec, *a, **k):
            t = self._now()
            load = orig(loads_self, spec, *a, **k)
            if load is None:
                return None  # the I/O thread's (traced in ServerJobs.load)
            rec = {"req": spec.req_id, "path": "engine", "chunks": load.chunks, "bytes": load.nbytes,
                   "sync": bool(getattr(spec, "sync", False)), "issue_ms": t, "issue_dur_ms": self._now() - t,
                   "step": len(self._steps) - 1}
            self._loads.append(rec)
            self._engine_loads[id(load)] = rec
            self._gpu_end_event(rec, load.handle)
            return load

        return start

    def _engine_load_reap(self, orig: Callable) -> Callable:
        def reap(loads_self, *a, **k):
            done = orig(loads_self, *a, **k)
            now = self._now()
            for load, failed in done:
                rec = self._engine_loads.pop(id(load), None)
                if rec is not None:
                    rec["seen_done_ms"] = now
                    rec["failed_blocks"] = len(failed)
            return done

        return reap

    def _gpu_end_event(self, rec: dict, handle: Any) -> None:
        """A timing event on a stream of its own that waits for the copy: it completes when
        the copy does."""
        if handle is None:
            return
        import torch

        if not torch.cuda.is_available():
            return
        if self._trace_stream is None:
            self._trace_stream = torch.cuda.Stream()
        if self._gpu_ref is None:
            ref = torch.cuda.Event(enable_timing=True)
            ref.record(self._trace_stream)
            ref.synchronize()
            self._gpu_ref = (ref, self._now())
        try:
            handle.stream_wait(self._trace_stream)
        except Exception:  # noqa: BLE001 - a handle without GPU work: no GPU end
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._trace_stream)
        self._gpu_ends.append((rec, event))

    def _resolve_gpu_ends(self) -> None:
        if self._gpu_ref is None:
            return
        ref, ref_ms = self._gpu_ref
        for rec, event in self._gpu_ends:
            if event.query():
                rec["gpu_end_ms"] = ref_ms + ref.elapsed_time(event)


def _status(request: Any) -> str:
    status = getattr(request, "status", None)
    return getattr(status, "name", str(status))


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def _interval(rec: dict) -> tuple[float, float] | None:
    lo = rec.get("issue_ms", rec.get("start_ms"))
    hi = rec.get("gpu_end_ms") or rec.get("seen_done_ms") or rec.get("end_ms")
    return (lo, hi) if lo is not None and hi is not None else None


def summarize(steps: list[dict], loads: list[dict], stores: list[dict]) -> dict:
    """Totals of one round: where its time went."""

    def hook_ms(names: tuple[str, ...]) -> float:
        return sum(s["hooks"].get(n, [0, 0.0])[1] for s in steps for n in names)

    load_iv = [iv for iv in map(_interval, loads) if iv]
    store_iv = [iv for iv in map(_interval, stores) if iv]
    both = _union_ms(load_iv) + _union_ms(store_iv) - _union_ms(load_iv + store_iv)
    return {
        "steps": len(steps),
        "idle_steps": sum(1 for s in steps if s.get("tokens", 0) == 0),
        "steps_waiting_for_loads": sum(1 for s in steps if s.get("waiting_for_loads", 0) > 0),
        "max_waiting_for_loads": max((s.get("waiting_for_loads", 0) for s in steps), default=0),
        "ask_again": sum(s.get("ask_again", 0) for s in steps),
        "schedule_ms": sum(s.get("schedule_ms", 0.0) for s in steps),
        "execute_ms": sum(s.get("execute_ms", 0.0) for s in steps),
        "update_ms": sum(s.get("update_ms", 0.0) for s in steps),
        "scheduler_hooks_ms": hook_ms(SCHEDULER_HOOKS),
        "worker_hooks_ms": hook_ms(WORKER_HOOKS),
        "get_finished_ms": hook_ms(("get_finished",)),
        "loads": len(loads),
        "load_bytes": sum(r["bytes"] for r in loads),
        "load_busy_ms": _union_ms(load_iv),
        "first_load_ms": min((iv[0] for iv in load_iv), default=None),
        "last_load_end_ms": max((iv[1] for iv in load_iv), default=None),
        "stores": len(stores),
        "store_bytes": sum(r["bytes"] for r in stores),
        "store_busy_ms": _union_ms(store_iv),
        "loads_and_stores_overlap_ms": both,
        "store_queued_ms": sum(r["start_ms"] - r["queued_ms"] for r in stores if r.get("queued_ms") is not None),
        "io_load_queued_ms": sum(r["start_ms"] - r["queued_ms"] for r in loads
                                 if r.get("path") == "io" and r.get("queued_ms") is not None),
    }
