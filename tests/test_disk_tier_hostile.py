"""The disk tier against a hostile directory and a tight cap: what a review found (BUG-n in
the names), kept as regression tests. Real directories, real files, real processes; the
helpers of test_disk_tier.py write and read chunk files exactly as the server's workers do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from test_disk_tier import Arena, write

from kvdepot.server.tiers.chunkfile import footprint
from kvdepot.server.tiers.disk import DiskTier

REPO = Path(__file__).resolve().parent.parent


def _on_disk_bytes(root: str) -> int:
    """Bytes the files under ``root`` take on the medium (allocated blocks, not sizes)."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total


def test_bug1_a_directory_named_like_a_chunk_file_stops_the_server_from_starting(tmp_path):
    """BUG-1 (DiskTier.scan / _unlink): anything ``*.kvc`` that open() rejects is "deleted" with
    os.unlink, and only FileNotFoundError is tolerated: a directory named ``x.kvc`` in the
    tier (a stray ``mkdir``, a restore tool) raises IsADirectoryError out of scan(), and
    build_server turns that into "Cannot start" (exit 1): the server refuses its own tier."""
    root = tmp_path / "tier"
    DiskTier(str(root), 10 << 20).close()
    (root / "00" / "junk.kvc").mkdir()
    (root / "00" / "junk.kvc" / "inside").write_bytes(b"x")
    tier = DiskTier(str(root), 10 << 20)
    try:
        found = list(tier.scan())  # today: IsADirectoryError
        assert found == [] and tier.io.used_bytes == 0
    finally:
        tier.close()


def test_bug2_a_fifo_named_like_a_chunk_file_hangs_the_start_up_scan(tmp_path):
    """BUG-2 (DiskTier._inspect): the scan opens every ``*.kvc`` with a plain blocking open(),
    following whatever it is: a FIFO (or a symlink to one, or to a character device) blocks
    open() forever, so the server never starts and never says why. The scan should lstat
    first and treat anything but a regular file as a bad file (O_NOFOLLOW | O_NONBLOCK)."""
    root = tmp_path / "tier"
    DiskTier(str(root), 10 << 20).close()
    fifo = root / "00" / "stuck.kvc"
    os.mkfifo(fifo)
    tier = DiskTier(str(root), 10 << 20)
    outcome: list[object] = []

    def scan() -> None:
        try:
            outcome.append(list(tier.scan()))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(5.0)
    hung = thread.is_alive()
    if hung:  # unblock the scan's open(): a writer appears and goes (EOF: a short header)
        os.close(os.open(fifo, os.O_WRONLY))
        thread.join(5.0)
    tier.close()
    assert not hung, "the start-up scan blocked on a FIFO named like a chunk file"
    assert outcome == [[]], outcome


def test_bug3_a_chunk_file_longer_than_its_header_says_passes_the_cap(tmp_path):
    """BUG-3 (DiskTier._inspect / scan): a file is counted by the footprint its header names
    (footprint(payload_bytes)), and only a file SHORTER than that is refused. A longer one (a
    valid chunk with data appended: a copy tool, a concatenation, a bug in another writer)
    is kept and counted small, so the tier holds more than --disk-size on disk, and nothing
    ever removes the excess. The scan should refuse (delete) any file whose size is not
    exactly footprint(payload_bytes), or count st_size."""
    root = tmp_path / "tier"
    cap = 1 << 20
    tier = DiskTier(str(root), cap)
    where = write(tier, Arena(), b"K" * 16, 65536)
    tier.close()
    path = root / where.path
    with open(path, "ab") as f:  # real bytes, not a hole: 4 MiB more on the medium
        f.write(os.urandom(4 << 20))
    again = DiskTier(str(root), cap)
    try:
        found = list(again.scan())
        on_disk = _on_disk_bytes(str(root / "00")) + sum(
            _on_disk_bytes(str(root / f"{i:02x}")) for i in range(1, 256)
        )
        assert on_disk <= cap, (
            f"{on_disk} bytes of chunk files kept under a cap of {cap} (the tier counts "
            f"{again.io.used_bytes}; {len(found)} file(s) adopted)"
        )
    finally:
        again.close()


_PROBE_UNDER_LIMIT = r"""
import os, resource, signal, sys, logging
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: EFBIG, not a kill
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
from kvdepot.server.tiers.disk import DiskTier
tier = DiskTier(sys.argv[1], cap)
print("direct", tier.direct)
tier.close()
"""


def test_bug4_the_start_up_probe_writes_a_file_larger_than_the_whole_cap(tmp_path):
    """BUG-4 (DiskTier._probe): at start the tier writes a fixed 1 MiB probe file, outside its
    books, whatever --disk-size is: with --disk-size 0.0005 (500 kB) the directory briefly
    holds twice its cap ("never more than --disk-size on disk, whatever happens"). Shown
    with a process whose file size limit is the cap (RLIMIT_FSIZE): no chunk file of the
    tier passes it, the probe does (EFBIG, logged as a failed probe). Fix: probe with
    min(_PROBE_BYTES, capacity - used - what the scan will find), or one block."""
    cap = 256 << 10  # holds three 64 KiB chunk files
    assert footprint(65536) * 3 <= cap
    out = subprocess.run(
        [sys.executable, "-c", _PROBE_UNDER_LIMIT, str(tmp_path / "tier"), str(cap)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "probe write failed" not in out.stdout + out.stderr, out.stdout + out.stderr
