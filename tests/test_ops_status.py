"""`kvdepot status` (issue 5): a table for people, --json for scripts, one clear line on failure.

Unit level against HttpEndpoint with stand-in stats; end to end against the real server after
real stores and retrieves, through the installed `kvdepot status` command.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import msgspec
import pytest

from kvdepot.server.http import HttpEndpoint
from kvdepot.server.metrics import ServerMetrics
from kvdepot.status import human_bytes, human_duration, run_status, stats_url, status_rows
from ops_fakes import fake_stats
from ops_server import REPO_ROOT, TINY_GEOMETRY, OpsServer, store_chunks
from server_process import free_port


@pytest.fixture
def stats_endpoint():
    """A real HTTP endpoint serving fake_stats(); yields (base url, the stats it serves)."""
    stats = fake_stats()
    endpoint = HttpEndpoint(
        "127.0.0.1", 0, stats=lambda: stats, metrics=ServerMetrics(), is_ready=lambda: True
    )
    endpoint.start()
    yield f"http://127.0.0.1:{endpoint.port}", stats
    endpoint.stop()


def test_table_shows_every_figure_a_person_asks_about(stats_endpoint):
    url, _ = stats_endpoint
    out = io.StringIO()
    assert run_status(url, as_json=False, out=out) == 0
    table = out.getvalue()
    expected_fragments = [
        "kvdepot 0.1.0, boot boot-1234",
        "1h 02m 05s",  # uptime 3725.5 s
        "1.25 GB used of 5.00 GB (25.0%), 3.75 GB free",
        "312 of 256 tokens",
        "3 connected",
        "1,024, hit ratio 62.5%",
        "640 chunks, 163,840 tokens",  # hits
        "384 chunks, 98,304 tokens",  # misses
        "1,200 chunks, 307,200 tokens, 48.00 GB",  # stored
        "700 chunks, 179,200 tokens, 28.00 GB",  # retrieved
        "888 chunks",  # evicted
        "5 leases, 6 reservations",  # expired
        "BAD_FRAME 2",
    ]
    for fragment in expected_fragments:
        assert fragment in table, f"{fragment!r} missing from:\n{table}"
    assert "NO_SPACE" not in table  # codes that never happened are left out
    assert re.search(r"^  state +ready$", table, re.MULTILINE)
    # One row per figure, every value starting in the same column.
    rows = status_rows(json.loads(msgspec.json.encode(fake_stats())))
    lines = table.splitlines()[1:]
    assert len(lines) == len(rows)
    assert len({line.index(value) for line, (_, value) in zip(lines, rows)}) == 1


def test_json_is_the_servers_stats_unchanged(stats_endpoint):
    url, stats = stats_endpoint
    out = io.StringIO()
    assert run_status(url, as_json=True, out=out) == 0
    printed = json.loads(out.getvalue())
    assert printed["stored_bytes"] == stats.stored_bytes
    assert printed["errors"] == stats.errors
    assert set(printed) == set(stats.__struct_fields__)


@pytest.mark.parametrize(
    "given",
    ["127.0.0.1:{port}", "http://127.0.0.1:{port}/", "http://127.0.0.1:{port}/stats"],
)
def test_url_forms_a_person_types(stats_endpoint, given):
    url, _ = stats_endpoint
    port = url.rsplit(":", 1)[1]
    assert run_status(given.format(port=port), as_json=True, out=io.StringIO()) == 0


def test_unreachable_server_is_one_clear_line_and_exit_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert run_status(url, as_json=False) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith(f"kvdepot status: cannot reach {url}/stats")


def test_a_port_that_is_not_kvdepot_is_reported_not_crashed_on(capsys):
    # The metrics page is text, not stats JSON: what someone gets pointing at the wrong path.
    stats = fake_stats()
    endpoint = HttpEndpoint("127.0.0.1", 0, stats=lambda: stats, metrics=ServerMetrics(),
                            is_ready=lambda: True)  # fmt: skip
    endpoint.start()
    try:
        assert run_status(f"http://127.0.0.1:{endpoint.port}/nothing-here", as_json=False) == 1
    finally:
        endpoint.stop()
    assert "HTTP 404" in capsys.readouterr().err


def test_formatting_helpers():
    assert stats_url("localhost:8555") == "http://localhost:8555/stats"
    assert human_bytes(999) == "999 B"
    assert human_bytes(5_000_000_000) == "5.00 GB"
    assert human_duration(59) == "0m 59s"
    assert human_duration(90061) == "1d 1h 01m"


# --- end to end: `kvdepot status` against the real server ----------------------------------------


def kvdepot_cli(*args: str) -> subprocess.CompletedProcess:
    """The `kvdepot` command as a person runs it (python -m kvdepot is the same entry point)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "kvdepot", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO_ROOT),
    )  # fmt: skip


def test_status_prints_the_figures_of_a_real_server_after_real_traffic():
    srv = OpsServer().start()
    try:
        client = srv.client("ops-status")
        try:
            ns = client.register("ops/status", TINY_GEOMETRY)
            keys = client.chunk_keys(ns, list(range(5 * 256)))
            client.lookup(ns, keys)  # 5 misses
            assert store_chunks(client, ns, keys, fill=1) == 5
            client.lookup(ns, keys[:2])  # 2 hits
            acquired = client.acquire(ns, 0, keys[:2])
            client.release([acquired.lease])
            stats = srv.settled_stats()  # while the engine is still connected

            table = kvdepot_cli("status", "--url", srv.base_url)
            as_json = kvdepot_cli("status", "--url", srv.base_url, "--json")
        finally:
            client.close()
    finally:
        srv.stop()

    assert table.returncode == 0, table.stderr
    assert stats.stored_chunks == 5 and stats.retrieved_chunks == 2
    expected_fragments = [
        f"boot {stats.boot_id}",
        "1 connected",
        "5 of 256 tokens",  # chunks
        f"{stats.lookups:,}, hit ratio {100 * 2 / 7:.1f}%",
        "2 chunks, 512 tokens",  # hits
        "5 chunks, 1,280 tokens",  # misses
        f"5 chunks, 1,280 tokens, {human_bytes(5 * ns.slot_bytes)}",  # stored
        f"2 chunks, 512 tokens, {human_bytes(2 * ns.slot_bytes)}",  # retrieved
    ]
    for fragment in expected_fragments:
        assert fragment in table.stdout, f"{fragment!r} missing from:\n{table.stdout}"
    assert re.search(r"^  evicted +0 chunks$", table.stdout, re.MULTILINE)
    assert re.search(r"^  errors +none$", table.stdout, re.MULTILINE)

    assert as_json.returncode == 0, as_json.stderr
    printed = json.loads(as_json.stdout)
    expected = msgspec.structs.asdict(stats)
    for volatile in ("uptime_s",):
        printed.pop(volatile), expected.pop(volatile)
    assert printed == expected


def test_status_of_a_stopped_server_fails_with_one_line():
    result = kvdepot_cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot reach" in result.stderr
