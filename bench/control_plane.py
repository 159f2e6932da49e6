"""Control-plane benchmark: kvdepot lookups beside a bare ZMQ echo of the same bytes.

Both servers are real processes on loopback; both clients are Python, so the ratio shows what
kvdepot's decoding, index work and reply cost on top of the transport.

    python bench/control_plane.py [--seconds 3] [--out bench/results/control_plane.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from server_process import ServerProcess, free_port  # noqa: E402

from kvdepot import protocol as p  # noqa: E402
from kvdepot.client import KVDepotClient  # noqa: E402
from kvdepot.protocol import KVGeometry  # noqa: E402

KEYS = 128  # a 32k-token prompt in 256-token chunks
GEOMETRY = KVGeometry(
    num_layers=40, num_kv_heads=8, head_size_k=128, head_size_v=128, dtype="bfloat16",
    block_size=16, num_planes=1, piece_bytes=4096, layout="layer_major:bench",  # 64 KiB slots
)


def echo_server(port: int, ready) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"stop":
            break
        sock.send_multipart(frames)


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency(send_recv, n: int) -> dict:
    for _ in range(200):
        send_recv()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        send_recv()
        samples.append((time.perf_counter() - t) * 1e6)
    return {
        "p50_us": statistics.median(samples),
        "p99_us": percentile(samples, 0.99),
        "mean_us": statistics.fmean(samples),
        "round_trips_per_s": 1e6 / statistics.fmean(samples),
    }


def pipelined_client(port: int, frame: bytes, seconds: float, depth: int, hello: bytes | None, out) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    if hello is not None:
        sock.send(hello)
        sock.recv()
    for _ in range(depth):
        sock.send(frame)
    done = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sock.recv()
        done += 1
        sock.send(frame)
    for _ in range(depth):
        sock.recv()
    out.put(done / seconds)
    sock.close()
    ctx.term()


def throughput(port: int, frame: bytes, seconds: float, clients: int, depth: int, hello: bytes | None) -> float:
    out: mp.Queue = mp.Queue()
    procs = [
        mp.Process(target=pipelined_client, args=(port, frame, seconds, depth, hello, out))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    total = sum(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--out", default=str(REPO / "bench/results/control_plane.json"))
    args = ap.parse_args()

    with ServerProcess(buffer_gb=0.5, log_path=Path("/tmp/kvdepot-bench-cp.log")) as srv:
        client = KVDepotClient("127.0.0.1", srv.port, heartbeat=False, timeout_ms=5000)
        assert client.connect()
        ns = client.register("bench-model", GEOMETRY)
        keys = client.chunk_keys(ns, list(range(256 * KEYS)))
        # Half the prompt is cached, as in a typical partial hit.
        res = client.reserve(ns, 0, keys[: KEYS // 2])
        client.commit(res.id)
        lookup_frame = p.encode(p.Lookup(req_id=1, namespace=ns.id, keys=b"".join(keys)))
        hello = p.encode(p.Hello(req_id=1, protocol_version=p.PROTOCOL_VERSION, engine_id="bench"))

        echo_port = free_port()
        ready = mp.Event()
        echo = mp.Process(target=echo_server, args=(echo_port, ready), daemon=True)
        echo.start()
        ready.wait(10)
        ctx = zmq.Context()
        bare = ctx.socket(zmq.DEALER)
        bare.connect(f"tcp://127.0.0.1:{echo_port}")

        def bare_rt() -> None:
            bare.send(lookup_frame)
            bare.recv()

        def kvdepot_rt() -> None:
            assert client.lookup(ns, keys).hit_chunks == KEYS // 2

        results: dict = {}
        # Interleave the two, twice, so drift on a shared machine hits both alike.
        for round_ in range(2):
            results.setdefault("bare_zmq", []).append(latency(bare_rt, args.samples))
            results.setdefault("kvdepot_lookup", []).append(latency(kvdepot_rt, args.samples))
        lat = {k: min(v, key=lambda r: r["p50_us"]) for k, v in results.items()}

        cpu0 = cpu_seconds(echo.pid)
        tput_bare = throughput(echo_port, lookup_frame, args.seconds, 4, 8, None)
        cpu_bare_us = (cpu_seconds(echo.pid) - cpu0) / (tput_bare * args.seconds) * 1e6
        cpu0 = cpu_seconds(srv.proc.pid)
        tput_kv = throughput(srv.port, lookup_frame, args.seconds, 4, 8, hello)
        cpu_kv_us = (cpu_seconds(srv.proc.pid) - cpu0) / (tput_kv * args.seconds) * 1e6
        bare.send(b"stop")
        echo.join(5)
        client.close()

    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "keys_per_lookup": KEYS,
        "request_bytes": len(lookup_frame),
        "latency": lat,
        "lookup_p99_vs_bare_p99": lat["kvdepot_lookup"]["p99_us"] / lat["bare_zmq"]["p99_us"],
        "lookup_p50_vs_bare_p50": lat["kvdepot_lookup"]["p50_us"] / lat["bare_zmq"]["p50_us"],
        "throughput_4x8": {"bare_echo_rps": tput_bare, "kvdepot_lookup_rps": tput_kv},
        "throughput_vs_bare": tput_kv / tput_bare,
        "server_cpu_us_per_request": {"bare_echo": cpu_bare_us, "kvdepot_lookup": cpu_kv_us},
        "targets": {"lookup_p99_vs_bare_p99_max": 1.5, "throughput_vs_bare_min": 0.5},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    b, k = lat["bare_zmq"], lat["kvdepot_lookup"]
    print(f"{'':28}{'p50 us':>10}{'p99 us':>10}{'req/s (4x8)':>14}")
    print(f"{'bare ZMQ echo, same bytes':28}{b['p50_us']:10.0f}{b['p99_us']:10.0f}{tput_bare:14.0f}")
    print(f"{'kvdepot lookup, 128 keys':28}{k['p50_us']:10.0f}{k['p99_us']:10.0f}{tput_kv:14.0f}")
    print(f"server CPU per request: bare {cpu_bare_us:.1f} us, kvdepot {cpu_kv_us:.1f} us")
    print(f"ratios: p99 {report['lookup_p99_vs_bare_p99']:.2f}x (target <= 1.5), "
          f"throughput {report['throughput_vs_bare']:.2f}x of bare (target >= 0.5)")


if __name__ == "__main__":
    main()
