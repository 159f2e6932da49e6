"""GPU <-> arena transfer benchmark (run on the GPU machine).

Qwen3-14B geometry (40 layers, 8 KV heads, head dim 128, bf16, 16-token blocks; a 256-token
chunk is 40 MiB), blocks scattered over a large paged cache, 256-token chunks, batches of 1, 4
and 16 chunks. Store (GPU -> arena) and load (arena -> GPU) GB/s through kvdepot's own engines
into a /dev/shm arena mapped and pinned the way an engine maps the server's arena, each beside
the raw pinned copy of the same bytes (one cudaMemcpyAsync, timed the same way: host clock from
the call to completion), measured alternately with it rep by rep so that the shared machine's
drift hits both (the headline ratio), and beside the ceilings measured at the start. Then
stores and loads at once, and the slowdown of a bf16 matmul loop while transfers run.

    python bench/gpu_transfer.py [--out bench/results/gpu_transfer.json] [--quick]

Writes JSON and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvdepot.transfer.base import ChunkCopy  # noqa: E402
from kvdepot.transfer.gpu import choose_engine, make_gpu_transfer, triton_available  # noqa: E402
from kvdepot.transfer.layout import describe_layout  # noqa: E402
from kvdepot.transfer.pinning import cuda_runtime  # noqa: E402
from test_layout import build_kv_caches  # noqa: E402
from test_layout import make_arena as make_file_arena  # noqa: E402

CHUNK = 256
BLOCK = 16
BPC = CHUNK // BLOCK
GEOM = dict(layers=40, heads=8, head_dim=128, block_size=BLOCK)
BATCHES = (1, 4, 16)


def log(*a):
    print(*a, flush=True)


def make_arena(nbytes: int):
    """(flat uint8 tensor, info, keep-alive). The server's own SharedArena and the engine's
    ArenaMapping where they import and /dev/shm has room; else a plain mapped file."""
    info = {"bytes": nbytes}
    try:
        st = os.statvfs("/dev/shm")
        room = st.f_bavail * st.f_frsize
    except OSError:
        room = 0
    info["dev_shm_free"] = room
    if room >= nbytes + (1 << 30):
        try:
            from kvdepot.client.arena import ArenaMapping
            from kvdepot.server.arena import SharedArena

            name = f"kvdepot-bench-{os.getpid()}"
            server = SharedArena(name, nbytes)
            t0 = time.perf_counter()
            server.touch_pages()  # what the server does at start, before engines pin
            info["server_touch_s"] = round(time.perf_counter() - t0, 2)
            mapping = ArenaMapping(name, nbytes)
            info["kind"] = "kvdepot SharedArena (server) + ArenaMapping (engine), /dev/shm"
            return mapping.tensor(), info, (server, mapping)
        except Exception as e:  # the server package needs msgspec/pyzmq; fall back
            info["shared_arena_error"] = repr(e)
    d = "/dev/shm" if room >= nbytes + (1 << 30) else tempfile.gettempdir()
    info["kind"] = f"mmap of a file in {d}"
    return make_file_arena(nbytes, d), info, None


class Bench:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device("cuda", 0)
        self.rng = np.random.default_rng(0)
        self.reps = args.reps
        self.rt = cuda_runtime()
        self.raw_stream = torch.cuda.Stream(self.dev)
        self.raw_stream2 = torch.cuda.Stream(self.dev)

    # -- setup ---------------------------------------------------------------------------

    def setup(self):
        a = self.args
        t0 = time.perf_counter()
        self.layouts = {}
        self.keep = {}
        for kind in ("v026", "BLHNC"):
            caches, bufs = build_kv_caches(
                kind, num_blocks=a.num_blocks, device=self.dev, seed=1, **GEOM
            )
            layout = describe_layout(caches, a.num_blocks, BLOCK)
            self.layouts[kind] = layout
            self.keep[kind] = (caches, bufs)
        torch.cuda.synchronize()
        self.slot = self.layouts["v026"].slot_bytes(CHUNK)
        assert self.slot == self.layouts["BLHNC"].slot_bytes(CHUNK) == 40 << 20
        log(f"caches: 2 x {a.num_blocks} blocks x {self.slot // BPC >> 10} KiB "
            f"({2 * a.num_blocks * self.slot // BPC / 2**30:.1f} GiB) in {time.perf_counter() - t0:.1f} s")
        self.arena, self.arena_info, self._arena_keep = make_arena(a.arena_gib << 30)
        self.n_slots = self.arena.numel() // self.slot
        self.half = self.n_slots // 2  # stores rotate in the first half, loads in the second
        log(f"arena: {a.arena_gib} GiB, {self.n_slots} slots: {self.arena_info}")

    # -- timing helpers ------------------------------------------------------------------

    def chunks(self, n, region, ids=None):
        if ids is None:
            ids = self.rng.choice(self.args.num_blocks, size=n * BPC, replace=False)
        first = self.rng.integers(0, self.half - n + 1)
        base = 0 if region == "store" else self.half
        return [
            ChunkCopy(int(base + first + i) * self.slot, ids[i * BPC : (i + 1) * BPC].tolist())
            for i in range(n)
        ]

    def chunk_pair(self, n):
        """A store batch and a load batch over disjoint blocks (a load never writes what a
        concurrent store reads)."""
        ids = self.rng.choice(self.args.num_blocks, size=2 * n * BPC, replace=False)
        return self.chunks(n, "store", ids[: n * BPC]), self.chunks(n, "load", ids[n * BPC :])

    def time_engine(self, eng, n, direction, reps=None):
        """(engine GB/s, raw GB/s): the engine's transfer of n chunks and one raw pinned copy
        of the same bytes, alternating rep by rep (which goes first alternates too), so that
        the machine's drift (shared, noisy) hits both; medians."""
        # Single chunks are the noisiest figure and the cheapest to repeat.
        reps = reps or (4 * self.reps if n == 1 else self.reps)
        call = eng.store if direction == "store" else eng.load
        dev = self.raw_dev[: n * self.slot].data_ptr()
        eng_t, raw_t = [], []

        def raw_copy():
            host = self.arena.data_ptr() + int(self.chunks(n, direction)[0].slot_offset)
            dst, src = (host, dev) if direction == "store" else (dev, host)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.rt.memcpy(dst, src, n * self.slot, self.raw_stream.cuda_stream)
            self.raw_stream.synchronize()
            return time.perf_counter() - t0

        def engine_copy():
            chunks = self.chunks(n, direction)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(chunks).wait()
            return time.perf_counter() - t0

        for r in range(reps + 2):
            first, second = (raw_copy, engine_copy) if r % 2 else (engine_copy, raw_copy)
            a, b = first(), second()
            if r >= 2:
                (raw_t if first is raw_copy else eng_t).append(a)
                (eng_t if first is raw_copy else raw_t).append(b)
        nbytes = n * self.slot
        return nbytes / statistics.median(eng_t) / 1e9, nbytes / statistics.median(raw_t) / 1e9

    def time_raw(self, nbytes, direction, reps=None):
        reps = reps or self.reps
        dev = self.raw_dev[:nbytes]
        times = []
        for r in range(reps + 2):
            off = int(self.rng.integers(0, self.half - nbytes // self.slot)) * self.slot
            host = self.arena.data_ptr() + off + (0 if direction == "store" else self.half * self.slot)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if direction == "store":
                self.rt.memcpy(host, dev.data_ptr(), nbytes, self.raw_stream.cuda_stream)
            else:
                self.rt.memcpy(dev.data_ptr(), host, nbytes, self.raw_stream.cuda_stream)
            self.raw_stream.synchronize()
            dt = time.perf_counter() - t0
            if r >= 2:
                times.append(dt)
        return nbytes / statistics.median(times) / 1e9

    def time_raw_split(self, nbytes, direction, piece=(40 << 20) // BPC, reps=None):
        """The same bytes as contiguous 2.5 MiB pieces in one cudaMemcpyBatchAsync: several
        copy engines can share a transfer that one large copy leaves to one."""
        from kvdepot.transfer.pinning import MemcpyAttributes, SRC_ACCESS_ORDER_STREAM

        reps = reps or self.reps
        attrs = MemcpyAttributes()
        attrs.srcAccessOrder = SRC_ACCESS_ORDER_STREAM
        dev = self.raw_dev[:nbytes]
        n = nbytes // piece
        times = []
        for r in range(reps + 2):
            off = int(self.rng.integers(0, self.half - nbytes // self.slot)) * self.slot
            host = self.arena.data_ptr() + off + (0 if direction == "store" else self.half * self.slot)
            h = host + np.arange(n, dtype=np.uint64) * np.uint64(piece)
            d = dev.data_ptr() + np.arange(n, dtype=np.uint64) * np.uint64(piece)
            dst, src = (h, d) if direction == "store" else (d, h)
            sizes = np.full(n, piece, dtype=np.uint64)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.rt.memcpy_batch(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, n, attrs,
                                 self.raw_stream.cuda_stream)
            self.raw_stream.synchronize()
            dt = time.perf_counter() - t0
            if r >= 2:
                times.append(dt)
        return nbytes / statistics.median(times) / 1e9

    def latency(self, eng, direction, reps=None):
        """Batch of one: host issue time, GPU time (engine timing events) and wall time, us."""
        reps = reps or self.reps
        issue, dev, wall = [], [], []
        for r in range(reps + 2):
            chunks = self.chunks(1, direction)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            h = (eng.store if direction == "store" else eng.load)(chunks)
            t1 = time.perf_counter()
            h.wait()
            t2 = time.perf_counter()
            if r >= 2:
                issue.append((t1 - t0) * 1e6)
                wall.append((t2 - t0) * 1e6)
                dev.append(h.device_ms() * 1e3)
        med = statistics.median
        return {"issue_us": round(med(issue), 1), "device_us": round(med(dev), 1),
                "wall_us": round(med(wall), 1),
                "gbps": round(self.slot / med(wall) * 1e6 / 1e9, 2)}

    def host_costs(self, eng, n=50):
        """Host time per call of the operations a transfer is made of (issue only)."""
        out = {}
        dev = self.raw_dev
        host = self.arena.data_ptr() + self.half * self.slot
        stream = self.raw_stream

        def per_call(fn):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            return round(dt, 1)

        out["cudaMemcpyAsync_4KiB_h2d"] = per_call(
            lambda: self.rt.memcpy(dev.data_ptr(), host, 4096, stream.cuda_stream))
        out["cudaMemcpyAsync_4KiB_d2h"] = per_call(
            lambda: self.rt.memcpy(host, dev.data_ptr(), 4096, stream.cuda_stream))
        out["event_create_record"] = per_call(lambda: torch.cuda.Event().record(stream))
        staged = eng("gpu-triton-staged", "v026")
        buf = staged._buffers[True][0]
        offs = np.zeros(1, dtype=np.int64)
        ids = np.arange(BPC, dtype=np.int64)[None]

        def launch():
            with torch.cuda.stream(stream):
                staged.copier.launch(to_slot=True, slot_base=buf.data_ptr(), slot_owner=buf,
                                     slot_offsets=offs, block_ids=ids, stream=stream)

        out["fused_launch_1chunk"] = per_call(launch)
        out["fused_launches_native"] = staged.copier.native_launches
        via_triton = eng("gpu-triton-staged", "v026", native_launch=False)

        def launch_via_triton():
            with torch.cuda.stream(stream):
                via_triton.copier.launch(to_slot=True, slot_base=buf.data_ptr(), slot_owner=buf,
                                         slot_offsets=offs, block_ids=ids, stream=stream)

        out["fused_launch_1chunk_triton_launcher"] = per_call(launch_via_triton)
        dma = eng("gpu-dma", "BLHNC")
        one = self.chunks(1, "store")
        out["dma_store_call_1chunk"] = per_call(lambda: dma.store(one))
        out["staged_store_call_1chunk"] = per_call(lambda: staged.store(one))
        out["staged_store_call_1chunk_triton_launcher"] = per_call(lambda: via_triton.store(one))
        return out

    def cold_costs(self, eng, reps=15):
        """Host time of each step of a single-chunk staged store, each timed right after the
        host waited for the GPU (as the batch-of-one rows run), medians in us."""
        staged = eng("gpu-triton-staged", "v026")
        python_issue = eng("gpu-triton-staged", "v026", native_issue=False)
        one = self.chunks(1, "store")
        buf = staged._buffers[True][0]
        offs = np.zeros(1, dtype=np.int64)
        ids = np.asarray([one[0].block_ids], dtype=np.int64)
        stream = staged.kernel_streams[True]
        fence = staged._fence[True]
        dev = self.raw_dev
        host = self.arena.data_ptr() + self.half * self.slot
        steps = {
            "validate": lambda: staged._validate(one),
            "current_stream": lambda: torch.cuda.current_stream(self.dev),
            "raw_event_record_and_wait": lambda: (
                staged.rt.record(fence, stream.cuda_stream), staged.rt.wait(stream.cuda_stream, fence)),
            "torch_event_create_record": lambda: torch.cuda.Event().record(stream),
            "kernel_launch_with_table": lambda: staged.copier.launch(
                to_slot=True, slot_base=buf.data_ptr(), slot_owner=buf, slot_offsets=offs,
                block_ids=ids, stream=stream),
            "cudaMemcpyAsync_4KiB_d2h": lambda: self.rt.memcpy(host, dev.data_ptr(), 4096,
                                                               stream.cuda_stream),
            "whole_store_call": lambda: staged.store(one),
            "whole_store_call_python_issue": lambda: python_issue.store(one),
        }
        out = {}
        for name, fn in steps.items():
            times = []
            for _ in range(reps + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
            out[name] = round(statistics.median(times[2:]), 1)
        return out

    def streamed(self, eng, direction, n=16, reps=5):
        """n single-chunk calls issued back to back (one chunk per engine step, as a serving
        engine stores), against n single-chunk raw copies issued the same way: GB/s each."""
        def once(issue):
            plans = [self.chunks(1, direction) for _ in range(n)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            issue(plans)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        call = eng.store if direction == "store" else eng.load

        def engine_calls(plans):
            for chunks in plans:
                call(chunks)

        def raw_calls(plans):
            dev = self.raw_dev[: self.slot].data_ptr()
            for chunks in plans:
                host = self.arena.data_ptr() + int(chunks[0].slot_offset)
                dst, src = (host, dev) if direction == "store" else (dev, host)
                self.rt.memcpy(dst, src, self.slot, self.raw_stream.cuda_stream)

        eng_t, raw_t = [], []
        for r in range(reps + 1):  # alternating, as time_engine does
            pair = (engine_calls, raw_calls) if r % 2 else (raw_calls, engine_calls)
            for issue in pair:
                dt = once(issue)
                if r:
                    (eng_t if issue is engine_calls else raw_t).append(dt)
        got = n * self.slot / statistics.median(eng_t) / 1e9
        raw = n * self.slot / statistics.median(raw_t) / 1e9
        return {"gbps": round(got, 2), "raw_gbps": round(raw, 2), "pct_of_raw": round(100 * got / raw, 1)}

    def time_raw_both(self, nbytes, reps=None):
        reps = reps or self.reps
        times = []
        d1, d2 = self.raw_dev[:nbytes], self.raw_dev[nbytes : 2 * nbytes]
        for r in range(reps + 2):
            h1 = self.arena.data_ptr()
            h2 = self.arena.data_ptr() + self.half * self.slot
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.rt.memcpy(h1, d1.data_ptr(), nbytes, self.raw_stream.cuda_stream)
            self.rt.memcpy(d2.data_ptr(), h2, nbytes, self.raw_stream2.cuda_stream)
            self.raw_stream.synchronize()
            self.raw_stream2.synchronize()
            dt = time.perf_counter() - t0
            if r >= 2:
                times.append(dt)
        return 2 * nbytes / statistics.median(times) / 1e9

    def time_both(self, eng, n, reps=None):
        reps = reps or self.reps
        times = []
        for r in range(reps + 2):
            cs, cl = self.chunk_pair(n)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hs = eng.store(cs)
            hl = eng.load(cl)
            hs.wait()
            hl.wait()
            dt = time.perf_counter() - t0
            if r >= 2:
                times.append(dt)
        return 2 * n * self.slot / statistics.median(times) / 1e9

    def check_exact(self, eng, layout):
        """One stored batch equals a gather done by torch; loading it back restores it."""
        chunks = self.chunks(4, "store")
        eng.store(chunks).wait()
        views = (layout.blocks,) if layout.block_major else layout.planes
        for c in chunks:
            ids = torch.tensor(c.block_ids, device=self.dev)
            ref = torch.stack([v.index_select(0, ids) for v in views]).reshape(-1).cpu()
            got = self.arena[c.slot_offset : c.slot_offset + self.slot]
            if not torch.equal(got, ref):
                return False
        # Load them into other blocks; those must then equal the originals.
        used = {b for c in chunks for b in c.block_ids}
        free = [b for b in range(self.args.num_blocks) if b not in used][: 4 * BPC]
        moved = [ChunkCopy(c.slot_offset, free[i * BPC : (i + 1) * BPC]) for i, c in enumerate(chunks)]
        eng.load(moved).wait()
        for c, m in zip(chunks, moved):
            a = torch.tensor(c.block_ids, device=self.dev)
            b = torch.tensor(m.block_ids, device=self.dev)
            for v in views:
                if not torch.equal(v.index_select(0, a), v.index_select(0, b)):
                    return False
        return True

    def matmul_slowdown(self, eng, n=4):
        """A bf16 8192^3 matmul loop on its own stream, alone and with stores+loads running."""
        model = torch.cuda.Stream(self.dev)
        a = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        out = torch.empty_like(a)
        iters = self.args.mm_iters

        def run_mm():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(model):
                s.record()
                for _ in range(iters):
                    torch.matmul(a, b, out=out)
                e.record()
            return s, e

        torch.cuda.synchronize()
        s, e = run_mm()  # warm-up
        e.synchronize()
        alone = []
        for _ in range(2):
            s, e = run_mm()
            e.synchronize()
            alone.append(s.elapsed_time(e))
        t_alone = min(alone)
        if eng is None:
            return {"matmul_ms": t_alone}
        s, e = run_mm()
        moved = 0
        t0 = time.perf_counter()
        while not e.query():
            cs, cl = self.chunk_pair(n)
            hs = eng.store(cs)
            hl = eng.load(cl)
            hs.wait()
            hl.wait()
            moved += 2 * n * self.slot
        dt = time.perf_counter() - t0
        e.synchronize()
        t_with = s.elapsed_time(e)
        return {
            "matmul_ms_alone": round(t_alone, 2),
            "matmul_ms_with_transfers": round(t_with, 2),
            "slowdown_pct": round(100 * (t_with / t_alone - 1), 1),
            "tflops_alone": round(2 * 8192**3 * iters / (t_alone / 1e3) / 1e12, 1),
            "transfer_gbps_during": round(moved / dt / 1e9, 1),
        }

    # -- the run -------------------------------------------------------------------------

    def run(self, out_path):
        a = self.args
        res = {"env": self.env(), "config": vars(a), "errors": {}}

        def save():
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)

        def attempt(label, fn, default=None):
            # One failing engine must not cost the others' numbers (few device runs).
            try:
                return fn()
            except Exception as e:
                traceback.print_exc()
                res["errors"][label] = repr(e)
                return default

        self.setup()
        t0 = time.perf_counter()
        engines = {}

        def eng(name, kind, **kw):
            key = (name, kind, tuple(sorted(kw.items())))
            if key not in engines:
                real = "gpu-dma" if name == "gpu-dma-loop" else name
                if name == "gpu-dma-loop":
                    kw = dict(kw, batch=False)
                engines[key] = make_gpu_transfer(
                    self.layouts[kind], self.arena, CHUNK, engine=real, **kw
                )
            return engines[key]

        first = eng("gpu-dma", "BLHNC")
        first._pin.wait()
        res["pin"] = {
            "arena_bytes": self.arena.numel(),
            "register_s": round(first.pin_seconds, 3),
            "gib_per_s": round(self.arena.numel() / 2**30 / first.pin_seconds, 2),
            "arena": self.arena_info,
            "wait_after_start_s": round(time.perf_counter() - t0, 3),
        }
        log(f"pinned {a.arena_gib} GiB in {first.pin_seconds:.2f} s")
        # Random arena contents for loads (one big DMA from the random cache).
        self.raw_dev = torch.empty(2 * 16 * self.slot, dtype=torch.uint8, device=self.dev)
        src = self.layouts["BLHNC"].blocks.reshape(-1)
        n = min(self.arena.numel(), src.numel())
        self.rt.memcpy(self.arena.data_ptr(), src.data_ptr(), n, self.raw_stream.cuda_stream)
        self.raw_dev.copy_(src[: self.raw_dev.numel()])
        torch.cuda.synchronize()

        auto = {k: choose_engine(self.layouts[k])[0] for k in self.layouts}
        res["auto_engine"] = auto
        log("auto:", auto)

        # Raw pinned copies of the same bytes (no gather): one cudaMemcpyAsync, and 2.5 MiB
        # pieces in one batch call. "same size" is the better of the two for that many
        # bytes; "link" the best seen per direction at any size (the ~55 GB/s ceiling).
        raw = {}
        for b in BATCHES:
            for d in ("store", "load"):
                raw[f"single_{d}_{b}"] = round(self.time_raw(b * self.slot, d), 2)
                raw[f"split_{d}_{b}"] = round(self.time_raw_split(b * self.slot, d), 2)
        raw["both_16"] = round(self.time_raw_both(16 * self.slot), 2)
        raw["both_4"] = round(self.time_raw_both(4 * self.slot), 2)
        ceiling = {}
        for d in ("store", "load"):
            for b in BATCHES:
                ceiling[f"{d}_{b}"] = max(raw[f"single_{d}_{b}"], raw[f"split_{d}_{b}"])
            ceiling[f"link_{d}"] = max(ceiling[f"{d}_{b}"] for b in BATCHES)
        ceiling["both_16"], ceiling["both_4"] = raw["both_16"], raw["both_4"]
        res["raw_copy_gbps"] = raw
        res["ceiling_gbps"] = ceiling
        log("raw:", raw)
        log("ceiling:", ceiling)
        save()

        configs = [
            ("gpu-triton-staged", "v026", {}),
            ("gpu-triton-staged", "v026", {"native_issue": False}),
            ("gpu-triton", "v026", {}),
            ("gpu-dma", "BLHNC", {}),
            ("gpu-dma", "BLHNC", {"native_issue": False}),
            ("gpu-dma-loop", "BLHNC", {}),
            ("gpu-triton-staged", "BLHNC", {}),
        ]
        if a.quick:
            configs = configs[:3]
        def label(name, kind, kw):
            return f"{name}/{kind}" + "".join(f"/{k}={v}" for k, v in kw.items())

        exact = {}
        for name, kind, kw in configs:
            exact[label(name, kind, kw)] = attempt(
                f"exact {label(name, kind, kw)}",
                lambda: self.check_exact(eng(name, kind, **kw), self.layouts[kind]),
            )
        res["bit_exact"] = exact
        log("bit exact:", exact)
        working = [c for c in configs if exact.get(label(*c)) is not None]

        rows = res["rows"] = []

        def measure(name, kind, kw, batches, reps=None):
            e = eng(name, kind, **kw)
            for b in batches:
                for d in ("store", "load"):
                    g, paired = self.time_engine(e, b, d, reps=reps)
                    c = ceiling[f"{d}_{b}"]
                    link = ceiling[f"link_{d}"]
                    rows.append({"engine": name + "".join(f" {k}={v}" for k, v in kw.items()),
                                 "layout": kind, "batch": b, "direction": d,
                                 "gbps": round(g, 2),
                                 "paired_raw_gbps": round(paired, 2),
                                 "pct_of_paired_raw": round(100 * g / paired, 1),
                                 "same_size_raw_gbps": c,
                                 "pct_of_same_size_raw": round(100 * g / c, 1),
                                 "link_gbps": link, "pct_of_link": round(100 * g / link, 1),
                                 "auto": auto[kind] == name and not kw,
                                 "native_issue": getattr(e, "issues_natively", False)})
                    log(f"{name:18s} {kind:6s} x{b:<2d} {d:5s} {g:6.2f} GB/s "
                        f"({100 * g / paired:5.1f}% of the paired raw copy {paired:5.2f}, "
                        f"{100 * g / c:5.1f}% of same-size raw, {100 * g / link:5.1f}% of link)")

        for name, kind, kw in working:
            attempt(f"rows {name}/{kind}", lambda: measure(name, kind, kw, BATCHES))
        # Per-piece DMA on the per-layer layout: why the kernel exists.
        for name in ("gpu-dma", "gpu-dma-loop"):
            attempt(f"rows {name}/v026", lambda: measure(name, "v026", {}, (1,), reps=3))
        save()

        lat = res["latency_batch1"] = {}
        for name, kind, kw in working:
            for d in ("store", "load"):
                key = f"{name}/{kind}/{d}" + "".join(f"/{k}={v}" for k, v in kw.items())
                r = attempt(f"latency {key}", lambda: self.latency(
                    eng(name, kind, timing=True, **kw), d))
                if r is not None:
                    lat[key] = r
                    log("latency", key, r)
        save()

        both = res["concurrent"] = []
        for name, kind, kw in working:
            for b in (4, 16):
                g = attempt(f"both {name}/{kind}/{b}", lambda: self.time_both(eng(name, kind, **kw), b))
                if g is None:
                    continue
                both.append({"engine": label(name, kind, kw), "layout": kind, "batch": b,
                             "total_gbps": round(g, 2),
                             "ceiling_gbps": ceiling[f"both_{b}"]})
                log(f"both {name:18s} {kind:6s} x{b:<2d} {g:6.2f} GB/s total")
        save()

        sweep = res["sweep"] = []
        if not a.quick and triton_available():
            def knob_row(name, label, **kw):
                e = eng(name, "v026", **kw)
                row = dict(kw)
                for b in (1, 16):
                    for d in ("store", "load"):
                        g, paired = self.time_engine(e, b, d, reps=8)
                        row[f"{d}_{b}"] = round(g, 2)
                        row[f"{d}_{b}_pct_of_paired_raw"] = round(100 * g / paired, 1)
                sweep.append(row)
                log("sweep", name, row)

            for progs in a.programs:
                attempt(f"sweep {progs}", lambda: knob_row(
                    "gpu-triton", "", max_programs=progs))
            for sb in (2 * self.slot, 32 * self.slot):
                attempt(f"sweep staged {sb}", lambda: knob_row(
                    "gpu-triton-staged", "", staging_bytes=sb))
            attempt("sweep staged 132", lambda: knob_row(
                "gpu-triton-staged", "", max_programs=132))

        save()

        res["host_costs_us"] = attempt("host costs", lambda: self.host_costs(eng))
        log("host costs (us per call):", res["host_costs_us"])
        res["cold_costs_us"] = attempt("cold costs", lambda: self.cold_costs(eng))
        log("host costs right after a GPU wait (us):", res["cold_costs_us"])
        streamed = res["streamed_batch1"] = {}
        for name, kind, kw in working:
            for d in ("store", "load"):
                key = f"{label(name, kind, kw)}/{d}"
                r = attempt(f"streamed {key}", lambda: self.streamed(eng(name, kind, **kw), d))
                if r is not None:
                    streamed[key] = r
                    log("streamed single chunks", key, r)
        save()

        mm = res["matmul"] = {"baseline": self.matmul_slowdown(None)}
        for name, kind, kw in working:
            r = attempt(f"matmul {label(name, kind, kw)}",
                        lambda: self.matmul_slowdown(eng(name, kind, **kw)))
            if r is not None:
                mm[label(name, kind, kw)] = r
                log("matmul", name, kind, r)
        if not a.quick and triton_available():
            for name, progs in [("gpu-triton", p) for p in a.mm_programs] + [
                ("gpu-triton-staged", 132)
            ]:
                key = f"{name}/v026/programs={progs}"
                r = attempt(key, lambda: self.matmul_slowdown(
                    eng(name, "v026", max_programs=progs)))
                if r is not None:
                    mm[key] = r
                    log("matmul", key, r)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        save()
        for e in engines.values():
            e.close()
        server = self._arena_keep[0] if isinstance(self._arena_keep, tuple) else None
        if server is not None:
            server.close()
        return res

    def env(self):
        p = torch.cuda.get_device_properties(0)
        try:
            import triton

            tv = triton.__version__
        except Exception:
            tv = None
        return {
            "gpu": p.name,
            "sms": p.multi_processor_count,
            "torch": torch.__version__,
            "triton": tv,
            "cudart": self.rt.version,
            "cudart_path": self.rt.path,
            "batch_memcpy": self.rt.has_batch_memcpy,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }


def table(res):
    lines = ["engine              layout  batch dir    GB/s  paired raw  %   link  %"]
    for r in res["rows"]:
        lines.append(
            f"{r['engine']:19s} {r['layout']:6s} {r['batch']:5d} {r['direction']:5s} "
            f"{r['gbps']:6.1f} {r['paired_raw_gbps']:8.1f} {r['pct_of_paired_raw']:6.1f}"
            f" {r['link_gbps']:5.1f} {r['pct_of_link']:5.1f}"
            + (" *auto" if r["auto"] else "")
        )
    lines.append("batch of one, us (host issue / GPU / wall):")
    for k, v in res.get("latency_batch1", {}).items():
        lines.append(f"  {k:34s} {v['issue_us']:7.1f} {v['device_us']:7.1f} {v['wall_us']:7.1f}")
    lines.append("single-chunk calls back to back, x16 (GB/s, % of raw copies issued the same way):")
    for k, v in res.get("streamed_batch1", {}).items():
        lines.append(f"  {k:40s} {v['gbps']:6.1f} {v['pct_of_raw']:6.1f}%")
    lines.append("stores+loads at once (total GB/s):")
    for r in res["concurrent"]:
        lines.append(f"  {r['engine']:19s} {r['layout']:6s} x{r['batch']:<3d} {r['total_gbps']:6.1f}"
                     f" (raw single copies both ways {r['ceiling_gbps']})")
    lines.append("matmul slowdown while transfers run:")
    for k, v in res["matmul"].items():
        if k != "baseline":
            lines.append(f"  {k:36s} {v['slowdown_pct']:5.1f}%  ({v['transfer_gbps_during']} GB/s moved)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_transfer.json"))
    ap.add_argument("--num-blocks", type=int, default=8192)
    ap.add_argument("--arena-gib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--mm-iters", type=int, default=60)
    ap.add_argument("--programs", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--mm-programs", type=int, nargs="*", default=[16])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    res = Bench(args).run(args.out)
    print(table(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
