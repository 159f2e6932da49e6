"""The fuzz targets in CI (tests/fuzz/, docs/fuzzing.md): every input kept in the corpus
replays clean in this process, and each target fuzzes for a bounded time in a process of its
own under atheris (coverage-guided, starting from the corpus), with zero crashes.

The bounded runs take about three minutes in all; longer runs are by hand
(docs/fuzzing.md). New inputs the runs find go to a temporary directory, not the repo.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from fuzz_common import CORPUS, inputs_in  # noqa: E402

# Seconds of fuzzing per target: the stateful targets run ~40-400 inputs a second, the
# decoders ~10k-100k.
BUDGET_S = {"wire": 15, "formats": 15, "resp": 15, "core": 45, "rpc": 45}


@pytest.mark.parametrize("target", sorted(BUDGET_S))
def test_the_corpus_replays_clean(target):
    """Every kept input (seeds and what the fuzzer found interesting) passes every check."""
    harness = importlib.import_module(f"fuzz_{target}")
    inputs = inputs_in(os.path.join(CORPUS, target))
    assert inputs, f"no corpus for {target}: run tests/fuzz/seeds.py"
    for name, data in inputs:
        try:
            harness.TestOneInput(data)
        except Exception as exc:
            raise AssertionError(f"corpus input {target}/{name} fails: {exc!r}") from exc


def _atheris_or_skip() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris: wheels for CPython 3.8-3.11 "
                    "on x86-64 Linux; other platforms build it from source with clang and libFuzzer)")


@pytest.mark.parametrize("target", sorted(BUDGET_S))
def test_a_bounded_fuzz_run_finds_nothing(target, tmp_path):
    """libFuzzer runs the target for its budget from the repo's corpus: any uncaught
    exception (a crash, a broken invariant), a timeout or running out of memory fails."""
    _atheris_or_skip()
    found = tmp_path / "found"
    found.mkdir()
    budget = BUDGET_S[target]
    command = [
        sys.executable, str(FUZZ / f"fuzz_{target}.py"),
        f"-max_total_time={budget}", "-timeout=20", "-rss_limit_mb=2048", "-max_len=4096",
        "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", str(found),
        os.path.join(CORPUS, target),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=budget + 120)
    output = run.stdout + run.stderr
    artifacts = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert run.returncode == 0 and not artifacts, (
        f"fuzz_{target} failed (exit {run.returncode}, {artifacts}):\n{output[-6000:]}"
    )
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert done and int(done.group(1)) > 0, output[-3000:]
    cov = re.findall(r"cov: (\d+) ft: (\d+)", output)
    print(f"fuzz_{target}: {done.group(1)} runs in {done.group(2)} s, cov/ft {cov[-1] if cov else '?'}")
