"""Dirty bitmaps see the writes of an O_DIRECT export (``cache.direct=on``), which ours sends
to the file by native AIO when they are aligned (exports/nbd_conn.py): the raw node and the
file node below it each count what was written, and a bitmap added between writes only what
came after.  Same script on qemu-storage-daemon 7.2 and ours, same counts; on ours the
export's connection must also have made its AIO context (/proc: a ``[aio]`` mapping), or the
test would not be testing that path.
"""
from __future__ import annotations

import time

import pytest

from helpers.daemons import bitmap_count as _count, serve_nbd

nbd = pytest.importorskip("nbd")

KiB = 1024
GRANULE = 64 * KiB


def _aio_rings(pid: int) -> int:
    with open("/proc/%d/maps" % pid) as f:
        return sum("[aio]" in line for line in f)


@pytest.mark.parametrize("aio", ["threads", "native"])
def test_direct_writes_mark_bitmaps(daemon, tmp_path, aio):
    q = daemon.qmp()
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (4 * 1024 * KiB))
    q.cmd("blockdev-add", {"driver": "raw", "node-name": "fmt",
                           "file": {"driver": "file", "node-name": "f", "filename": str(img),
                                    "cache": {"direct": True}, "aio": aio}})
    for node in ("fmt", "f"):
        q.cmd("block-dirty-bitmap-add", {"node": node, "name": "b", "granularity": GRANULE})
    h = serve_nbd(q, tmp_path / "nbd.sock", "fmt", "d")
    try:
        h.pwrite(b"\x11" * (128 * KiB), 1024 * KiB)            # aligned: two granules
        h.pwrite(b"\x22" * 100, 3 * 1024 * KiB + 7)             # unaligned: one granule
        cookies = [h.aio_pwrite(b"\x33" * (4 * KiB), 2 * 1024 * KiB + i * GRANULE)
                   for i in range(8)]                            # in flight together
        deadline = time.monotonic() + 30
        for c in cookies:               # (a cookie reports completion once, then retires)
            while not h.aio_command_completed(c):
                assert time.monotonic() < deadline, "writes did not complete"
                h.poll(1000)
        if daemon.kind == "blockexport-daemon":
            assert _aio_rings(daemon.proc.pid) == 1
        for node in ("fmt", "f"):
            assert _count(q, node, "b") == 11 * GRANULE
        q.cmd("block-dirty-bitmap-add", {"node": "fmt", "name": "later",
                                         "granularity": GRANULE})
        h.pwrite(b"\x44" * (4 * KiB), 0)
        h.flush()
        assert _count(q, "fmt", "later") == GRANULE
        assert _count(q, "fmt", "b") == _count(q, "f", "b") == 12 * GRANULE
        assert h.pread(4 * KiB, 2 * 1024 * KiB + 7 * GRANULE) == b"\x33" * (4 * KiB)
    finally:
        h.shutdown()
    data = img.read_bytes()
    assert data[1024 * KiB:1152 * KiB] == b"\x11" * (128 * KiB)
    assert data[3 * 1024 * KiB + 7:3 * 1024 * KiB + 107] == b"\x22" * 100
    assert data[:4 * KiB] == b"\x44" * (4 * KiB)
