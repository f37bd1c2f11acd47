"""FLUSH and FUA writes where a sync waits on nothing (a raw or qcow2 image on tmpfs;
cache.no-flush=on): ours serves them inline like any memory copy (exports/nbd_conn.py,
``_free_sync``), with no hand-off to the connection's pool; on a disk file system they
still go to the pool.  Seen from outside: the server's thread count (/proc/PID/task) stays
put through 48 FUA writes and flushes in flight on tmpfs, and grows on the disk.  The bytes
land either way (qcow2: qemu-img check, then convert as the oracle)."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd")

from helpers.servers import start_server  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
DEADLINE = 30.0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture(params=["shm", "shm-qcow2", "disk", "disk-unsafe"])
def where(request, tmp_path):
    if request.param.startswith("shm"):
        d = Path(tempfile.mkdtemp(prefix="blockexport-test-", dir="/dev/shm"))
        try:
            yield request.param, d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield request.param, tmp_path


def test_fua_and_flush_inline_where_sync_is_free(where, tmp_path):
    kind, d = where
    image = d / "d.img"
    fmt = "raw"
    if kind == "shm-qcow2":      # empty: the FUA writes allocate, their flush writes metadata
        fmt = "qcow2"
        model = bytearray(8 * MiB)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"],
                       check=True)
    else:
        model = bytearray(random.Random(5).randbytes(8 * MiB))
        image.write_bytes(model)
    cache = "--cache=unsafe" if kind == "disk-unsafe" else "--cache=writeback"
    # idle pool threads would exit after 2 s: keep them for the count
    env = dict(os.environ, BLOCKEXPORT_NBD_IDLE_SECONDS="600")
    srv = start_server("blockexport-nbd", image, [cache], tmp_path=tmp_path, env=env, fmt=fmt)
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        try:
            h.pwrite(b"\x01" * 4096, 0)
            model[0:4096] = b"\x01" * 4096
            before = threads(srv.proc.pid)
            rnd = random.Random(6)
            cookies = []
            for i in range(48):
                if i % 12 == 11:
                    cookies.append(h.aio_flush())
                    continue
                # each in a region of its own: requests in flight together may land in
                # any order
                n = rnd.choice((512, 4 * KiB, 100, 128 * KiB))
                off = i * 160 * KiB + rnd.randrange(0, 160 * KiB - n)
                data = rnd.randbytes(n)
                model[off:off + n] = data
                cookies.append(h.aio_pwrite(data, off, flags=nbd.CMD_FLAG_FUA))
            end = time.monotonic() + DEADLINE
            for c in cookies:
                while not h.aio_command_completed(c):
                    assert time.monotonic() < end, "requests did not complete"
                    h.poll(100)
            h.flush()
            after = threads(srv.proc.pid)
            assert h.pread(8 * MiB, 0) == model
        finally:
            h.shutdown()
    finally:
        srv.stop()
    if kind == "disk":
        assert after > before       # FUA writes and flushes went to the pool
    else:
        assert after == before      # served inline
    if fmt == "raw":
        assert image.read_bytes() == model
    else:
        subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
        raw = tmp_path / "back.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image),
                        str(raw)], check=True)
        assert raw.read_bytes() == model
