"""CPU data path: store and retrieve through a real server, beside a plain memcpy.

A paged KV cache in CPU memory (Llama-3.1-8B geometry: 32 layers, 8 KV heads, head dim 128,
bf16, 16-token blocks, blocks scattered over the cache, vLLM 0.26's per-layer tensors) is
stored chunk by chunk into the arena of a real kvdepot server (reserve, copy, commit) and read
back (acquire, copy, release). The baseline is one single-threaded memcpy of the same number
of bytes between two buffers, measured in the same run.

    python bench/cpu_datapath.py [--chunks 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from server_process import ServerProcess  # noqa: E402

from kvdepot.client import KVDepotClient  # noqa: E402
from kvdepot.transfer.base import ChunkCopy  # noqa: E402
from kvdepot.transfer.cpu import CpuTransfer  # noqa: E402
from kvdepot.transfer.layout import describe_layout  # noqa: E402

LAYERS, HEADS, HEAD_DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256


def paged_cache(num_blocks: int) -> dict[str, torch.Tensor]:
    # vLLM 0.26's per-layer tensors: (blocks, heads, block, 2*head_dim), memory order
    # (block, token, head, K|V).
    return {
        f"layer.{i}": torch.randn(num_blocks, BLOCK, HEADS, 2 * HEAD_DIM, dtype=torch.bfloat16).permute(0, 2, 1, 3)
        for i in range(LAYERS)
    }


def timed(fn, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="copy threads (default: the engine's, min(4, cores)); the memcpy baseline uses one")
    ap.add_argument("--out", default=str(REPO / "bench/results/cpu_datapath.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    blocks_per_chunk = CHUNK // BLOCK
    num_blocks = args.chunks * blocks_per_chunk * 2
    kv = paged_cache(num_blocks)
    layout = describe_layout(kv, num_blocks, BLOCK)
    slot_bytes = layout.slot_bytes(CHUNK)
    total = slot_bytes * args.chunks
    rng = np.random.default_rng(0)
    block_ids = rng.permutation(num_blocks)[: args.chunks * blocks_per_chunk].reshape(args.chunks, -1)

    buffer_gb = (total * 2 + (256 << 20)) / 1e9
    with ServerProcess(buffer_gb=buffer_gb, log_path=Path("/tmp/kvdepot-bench-cpu.log"),
                       extra=["--log-level", "WARNING"]) as srv:
        client = KVDepotClient("127.0.0.1", srv.port, timeout_ms=5000)
        assert client.connect()
        srv_ready = time.monotonic() + 30
        while not client.stats().ready and time.monotonic() < srv_ready:
            time.sleep(0.1)
        ns = client.register("bench-llama-8b", layout.geometry)
        engine = CpuTransfer(layout, client.arena_tensor(), CHUNK, threads=args.threads)
        copy_threads = engine.threads
        round_ = [0]

        def store() -> None:
            # Fresh keys each time, so every store really writes (no PRESENT shortcut).
            round_[0] += 1
            toks = np.arange(args.chunks * CHUNK) + round_[0] * 10_000_000
            keys = client.chunk_keys(ns, toks)
            res = client.reserve(ns, 0, keys)
            engine.store([ChunkCopy(o, ids.tolist()) for o, ids in zip(res.offsets, block_ids)])
            client.commit(res.id)
            store.keys = keys

        def retrieve() -> None:
            got = client.acquire(ns, 0, store.keys)
            engine.load([ChunkCopy(o, ids.tolist()) for o, ids in zip(got.offsets, block_ids)])
            client.release([got.lease])

        src = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
        dst = np.empty_like(src)
        dst[:] = 1  # fault the pages in before timing

        def memcpy() -> None:
            np.copyto(dst, src)

        t_memcpy_1 = timed(memcpy, args.repeat)
        t_store = timed(store, args.repeat)
        t_retrieve = timed(retrieve, args.repeat)
        t_memcpy_2 = timed(memcpy, args.repeat)
        # Bit-exact check of the round trip.
        before = {k: v.clone() for k, v in kv.items()}
        store()
        for t in kv.values():
            t.zero_()
        retrieve()
        exact = all(torch.equal(before[k], kv[k]) for k in kv) if args.chunks * blocks_per_chunk == num_blocks else None
        if exact is None:
            ids = torch.as_tensor(block_ids.reshape(-1))
            exact = all(torch.equal(before[k][ids], kv[k][ids]) for k in kv)
        client.close()

    t_memcpy = min(t_memcpy_1, t_memcpy_2)
    gbps = lambda t: total / t / 1e9  # noqa: E731
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "geometry": "Llama-3.1-8B: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks, per-layer (vLLM 0.26) layout",
        "chunks": args.chunks,
        "bytes": total,
        "copy_threads": copy_threads,
        "memcpy_gbps": gbps(t_memcpy),
        "store_gbps": gbps(t_store),
        "retrieve_gbps": gbps(t_retrieve),
        "store_vs_memcpy": t_memcpy / t_store,
        "retrieve_vs_memcpy": t_memcpy / t_retrieve,
        "bit_exact": bool(exact),
        "target_vs_memcpy_min": 0.8,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{args.chunks} chunks of {slot_bytes >> 20} MiB ({total / 1e9:.2f} GB), copy threads {copy_threads}")
    print(f"{'':34}{'GB/s':>8}{'vs memcpy':>11}")
    print(f"{'memcpy (np.copyto, 1 thread)':34}{gbps(t_memcpy):8.2f}{1:11.2f}")
    print(f"{'store (reserve, gather, commit)':34}{gbps(t_store):8.2f}{report['store_vs_memcpy']:11.2f}")
    print(f"{'retrieve (acquire, scatter, release)':34}{gbps(t_retrieve):8.2f}{report['retrieve_vs_memcpy']:11.2f}")
    print(f"bit-exact round trip: {report['bit_exact']}; target >= 0.8 of memcpy")


if __name__ == "__main__":
    main()
