"""Where the time of a single-chunk transfer goes, from a CUDA profiler trace (GPU machine).

Runs single-chunk stores and loads through the auto engines and raw copies of the same
bytes under torch.profiler (CUPTI), each iteration host-synchronized as the benchmark's
batch-of-one rows are, and splits each iteration's wall time into: host time before the
first GPU operation starts, GPU operations (kernels, copies) and the gaps between them, and
the time from the last GPU operation's end to the host's return. Writes JSON, prints a table.

    python bench/trace_single_chunk.py [--out bench/results/trace_single_chunk.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from gpu_transfer import Bench, CHUNK, make_gpu_transfer  # noqa: E402


def breakdown(trace_path: str, prefix: str) -> list[dict]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    windows = [e for e in events if e.get("cat") == "user_annotation"
               and str(e.get("name", "")).startswith(prefix)]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    out = []
    for w in windows:
        t0, t1 = w["ts"], w["ts"] + w["dur"]
        ops = sorted((e for e in gpu if t0 <= e["ts"] <= t1), key=lambda e: e["ts"])
        if not ops:
            continue
        gaps, busy = [], 0.0
        end = ops[0]["ts"]
        for e in ops:
            gaps.append(max(0.0, e["ts"] - end))
            end = max(end, e["ts"] + e["dur"])
            busy += e["dur"]
        out.append({
            "wall_us": w["dur"],
            "host_to_first_op_us": ops[0]["ts"] - t0,
            "ops": [(e["cat"], round(e["dur"], 1)) for e in ops],
            "op_us": round(busy, 1),
            "kernel_us": round(sum(e["dur"] for e in ops if e["cat"] == "kernel"), 1),
            "gaps_between_ops_us": round(sum(gaps[1:]), 1),
            "last_op_to_return_us": t1 - end,
        })
    return out


def summarize(rows: list[dict]) -> dict:
    med = statistics.median
    keys = ("wall_us", "host_to_first_op_us", "op_us", "kernel_us", "gaps_between_ops_us",
            "last_op_to_return_us")
    s = {k: round(med(r[k] for r in rows), 1) for k in keys}
    s["ops_example"] = rows[len(rows) // 2]["ops"]
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "trace_single_chunk.json"))
    ap.add_argument("--num-blocks", type=int, default=8192)
    ap.add_argument("--arena-gib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    b = Bench(args)
    b.setup()
    engines = {
        "staged/v026": make_gpu_transfer(b.layouts["v026"], b.arena, CHUNK),
        "staged-python-issue/v026": make_gpu_transfer(b.layouts["v026"], b.arena, CHUNK,
                                                      native_issue=False),
        "staged-device-table/v026": make_gpu_transfer(b.layouts["v026"], b.arena, CHUNK,
                                                      table_on_host=False),
        "dma/BLHNC": make_gpu_transfer(b.layouts["BLHNC"], b.arena, CHUNK),
        "dma-python-issue/BLHNC": make_gpu_transfer(b.layouts["BLHNC"], b.arena, CHUNK,
                                                    native_issue=False),
    }
    for e in engines.values():
        e._pin.wait()
    b.raw_dev = torch.empty(2 * b.slot, dtype=torch.uint8, device=b.dev)
    res = {"env": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}}

    x = torch.randn(4096, 4096, device=b.dev, dtype=torch.bfloat16)

    def busy_sms():
        """~1 ms of matmuls: SM clocks as under a running model (an idle GPU drops them)."""
        for _ in range(4):
            x @ x

    def run_case(label, fn, warm_sms=False):
        for _ in range(3):  # warm
            torch.cuda.synchronize()
            fn()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.reps):
                if warm_sms:
                    busy_sms()
                torch.cuda.synchronize()
                with record_function(f"{label}#{i}"):
                    fn()
        path = tempfile.mktemp(suffix=".json")
        prof.export_chrome_trace(path)
        rows = breakdown(path, label + "#")
        os.unlink(path)
        res[label] = summarize(rows) if rows else {"error": "no GPU ops in the windows"}
        print(label, res[label], flush=True)

    for direction in ("store", "load"):
        for name, eng in engines.items():
            call = eng.store if direction == "store" else eng.load
            run_case(f"{name}/{direction}", lambda: call(b.chunks(1, direction)).wait())
            if name.startswith("staged"):
                run_case(f"{name}/{direction}/sms-busy-before", lambda: call(
                    b.chunks(1, direction)).wait(), warm_sms=True)

        def raw():
            host = b.arena.data_ptr() + int(b.chunks(1, direction)[0].slot_offset)
            dev = b.raw_dev.data_ptr()
            dst, src = (host, dev) if direction == "store" else (dev, host)
            b.rt.memcpy(dst, src, b.slot, b.raw_stream.cuda_stream)
            b.raw_stream.synchronize()

        run_case(f"raw/{direction}", raw)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'case':44s} {'wall':>7s} {'host->1st':>9s} {'ops':>7s} {'kernel':>6s} {'gaps':>6s}"
          f" {'end->ret':>8s}")
    for k, v in res.items():
        if k != "env" and "wall_us" in v:
            print(f"{k:44s} {v['wall_us']:7.1f} {v['host_to_first_op_us']:9.1f} {v['op_us']:7.1f}"
                  f" {v['kernel_us']:6.1f} {v['gaps_between_ops_us']:6.1f} {v['last_op_to_return_us']:8.1f}")
    for e in engines.values():
        e.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
