"""NBD connections served by worker processes (exports/nbd_workers.py, issue 13): the data
is the same whichever process serves a connection, a FLUSH anywhere covers writes made
everywhere, dirty bitmaps see a worker's writes, export removal and server stop reach the
worker's clients, and a worker that dies takes only its own clients.

Real servers (blockexport-nbd, blockexport-daemon with QMP) and libnbd clients.  Which
process serves a connection is chosen by BLOCKEXPORT_NBD_WORKERS (how many workers) and
BLOCKEXPORT_NBD_WORKER_POLICY (``always``: every eligible connection to a worker); the
tests check the worker processes exist through /proc, not by timing.
"""
from __future__ import annotations

import itertools
import os
import signal
import time

import pytest

nbd = pytest.importorskip("nbd")

from helpers.daemons import (QMP, bitmap_count, file_node, nbd_uri, start_daemon,  # noqa: E402
                             unix_addr)
from helpers.procs import nbd_workers_of as _children, wait_pid_gone  # noqa: E402
from helpers.servers import start_server  # noqa: E402

KiB = 1024
MiB = 1024 * KiB


def _image(path, size=8 * MiB):
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
    return path


def _env(**kw):
    env = dict(os.environ)
    env.pop("BLOCKEXPORT_NBD_WORKER_POLICY", None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _connect(uri, *contexts):
    """A connected handle that has been served once: so the connection has found its
    process (the hand-off happens after negotiation, before the first request is read)."""
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    h.pread(512, 0)
    return h


def _hang_up(h) -> None:
    """Shut a handle down whose server may have dropped it already."""
    try:
        h.shutdown()
    except nbd.Error:
        pass


def _always_worker_server(tmp_path, image):
    """blockexport-nbd with one worker that takes every connection."""
    return start_server("blockexport-nbd", image, ["-e", "4"], tmp_path=tmp_path,
                        env=_env(BLOCKEXPORT_NBD_WORKERS=1, BLOCKEXPORT_NBD_WORKER_POLICY="always"))


def _extents(h, length, offset=0, context="base:allocation"):
    got = []

    def cb(meta, off, entries, err):
        if meta == context:
            got.extend(entries)
    h.block_status(length, offset, cb)
    return got


@pytest.fixture
def shm_image(shm_dir):
    path = shm_dir / "w.img"
    _image(path)
    return path


def test_connection_served_by_a_worker(tmp_path, shm_image):
    srv = _always_worker_server(tmp_path, shm_image)
    try:
        assert _children(srv.proc.pid) == []          # spawned on first use
        h = _connect(srv.uri(), "base:allocation")
        try:
            workers = _children(srv.proc.pid)
            assert len(workers) == 1
            assert h.pread(4096, 8192) == (bytes(range(256)) * 16)
            h.pwrite(b"\xaa" * 65536, 1 * MiB)
            h.zero(128 * KiB, 4 * MiB)                 # punches a hole (no NO_HOLE)
            h.flush()
            with open(shm_image, "rb") as f:
                f.seek(1 * MiB)
                assert f.read(65536) == b"\xaa" * 65536
                f.seek(4 * MiB)
                assert f.read(128 * KiB) == bytes(128 * KiB)
            # block status and the sparse read come from the worker's node
            assert _extents(h, 128 * KiB, 4 * MiB) == [128 * KiB, 3]
            assert h.pread(128 * KiB, 4 * MiB) == bytes(128 * KiB)
            # a request the worker refuses, as the main process would
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 8 * MiB)
            assert e.value.errnum == 22
            assert h.pread(16, 0) == bytes(range(16))  # ... and the connection lives
        finally:
            h.shutdown()
    finally:
        srv.stop()


def test_spread_connections_share_writes_and_flush(tmp_path, shm_image):
    """Three connections: here, worker 1, worker 2.  Each writes its own MiB without a
    flush; every connection reads every write at once (one page cache), and one FLUSH
    makes all of them durable: the file holds them."""
    srv = start_server("blockexport-nbd", shm_image, ["-e", "8"], tmp_path=tmp_path,
                       env=_env(BLOCKEXPORT_NBD_WORKERS=2))
    hs = []
    try:
        for _ in range(3):
            hs.append(_connect(srv.uri()))
        assert len(_children(srv.proc.pid)) == 2
        for i, h in enumerate(hs):
            h.pwrite(bytes([0x10 + i]) * MiB, i * MiB)
        for h in hs:
            for i in range(3):
                assert h.pread(MiB, i * MiB) == bytes([0x10 + i]) * MiB
        hs[2].flush()
        with open(shm_image, "rb") as f:
            for i in range(3):
                assert f.read(MiB) == bytes([0x10 + i]) * MiB
        # pipelined writes from all three at once, then reads back everywhere
        cookies = []
        for i, h in enumerate(hs):
            for k in range(32):
                cookies.append((h, h.aio_pwrite(bytes([k, i]) * 2048, (4 + i) * MiB + k * 4096)))
        for h, c in cookies:
            while not h.aio_command_completed(c):
                h.poll(1000)
        for h in hs:
            for i in range(3):
                data = h.pread(32 * 4096, (4 + i) * MiB)
                assert data == b"".join(bytes([k, i]) * 2048 for k in range(32))
    finally:
        for h in hs:
            h.shutdown()
        srv.stop()


def test_worker_killed_drops_only_its_clients(tmp_path, shm_image):
    srv = start_server("blockexport-nbd", shm_image, ["-e", "8"], tmp_path=tmp_path,
                       env=_env(BLOCKEXPORT_NBD_WORKERS=1))
    a = _connect(srv.uri())          # served here
    b = _connect(srv.uri())          # served by the worker
    c = None
    try:
        worker, = _children(srv.proc.pid)
        a.pwrite(b"\x01" * 4096, 0)
        b.pwrite(b"\x02" * 4096, 4096)
        os.kill(worker, signal.SIGKILL)
        wait_pid_gone(worker, 10)
        with pytest.raises(nbd.Error):
            b.pread(4096, 0)
        assert a.pread(8192, 0) == b"\x01" * 4096 + b"\x02" * 4096
        # the main process counted b gone, and the next connection gets a new worker
        deadline = time.monotonic() + 10
        while True:
            c = _connect(srv.uri())
            if _children(srv.proc.pid):
                break
            # placed here because b's departure was not counted yet: try again
            c.shutdown()
            c = None
            assert time.monotonic() < deadline, "no new worker"
        assert _children(srv.proc.pid) != [worker]
        assert c.pread(8192, 0) == b"\x01" * 4096 + b"\x02" * 4096
        assert srv.alive()
    finally:
        a.shutdown()
        if c is not None:
            c.shutdown()
        _hang_up(b)
        srv.stop()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_server_gone_ends_workers_and_their_clients(tmp_path, shm_image, how):
    """SIGTERM: the server stops (flushing), its worker exits.  SIGKILL: the worker finds its
    main process gone (its channel reads EOF), drops its clients and exits."""
    srv = _always_worker_server(tmp_path, shm_image)
    h = _connect(srv.uri())
    try:
        h.pwrite(b"\x77" * 4096, 0)
        worker, = _children(srv.proc.pid)
        srv.proc.send_signal(getattr(signal, how))
        status = srv.proc.wait(timeout=20)
        assert status == (0 if how == "SIGTERM" else -signal.SIGKILL)
        wait_pid_gone(worker, 10)
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
        if how == "SIGTERM":
            with open(shm_image, "rb") as f:
                assert f.read(4096) == b"\x77" * 4096     # flushed at stop
    finally:
        _hang_up(h)
        srv.stop()


# --- QMP: bitmaps and export removal with a worker-served client ----------------------------------

@pytest.fixture
def worker_daemon(tmp_path, shm_image, monkeypatch):
    monkeypatch.setenv("BLOCKEXPORT_NBD_WORKERS", "1")
    monkeypatch.setenv("BLOCKEXPORT_NBD_WORKER_POLICY", "always")
    d = start_daemon("blockexport-daemon", tmp_path=tmp_path)
    q = QMP(d.qmp_path)
    sock = tmp_path / "nbd.sock"
    try:
        q.cmd("blockdev-add", file_node(shm_image, discard="unmap"))
        q.cmd("nbd-server-start", {"addr": unix_addr(sock)})
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "f",
                                   "writable": True})
        yield d, q, sock
    finally:
        q.close()
        d.stop()


def _count(q, name):
    return bitmap_count(q, "f", name)


def test_bitmap_added_later_sees_worker_writes(worker_daemon):
    d, q, sock = worker_daemon
    h = _connect(nbd_uri(sock, "f"))
    try:
        assert len(_children(d.proc.pid)) == 1
        h.pwrite(b"\x01" * 4096, 0)                    # before the bitmap: not marked
        q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b", "granularity": 65536})
        assert _count(q, "b") == 0
        h.pwrite(b"\x02" * 4096, 1 * MiB + 100)        # one granule
        assert _count(q, "b") == 64 * KiB              # marked before the reply came
        h.zero(128 * KiB, 2 * MiB)                     # two granules
        h.trim(64 * KiB, 3 * MiB)                      # one (discard=unmap)
        assert _count(q, "b") == 4 * 64 * KiB
        # a disabled bitmap is not marked, an enabled one still is
        q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "c", "disabled": True})
        h.pwrite(b"\x03" * 4096, 3 * MiB)
        assert _count(q, "c") == 0
        assert _count(q, "b") == 4 * 64 * KiB
        # a client of the bitmap itself is served by the main process and sees the same
        q.cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "f", "name": "f2",
                                   "writable": True, "bitmaps": ["b"]})
        r = _connect(nbd_uri(sock, "f2"), "qemu:dirty-bitmap:b")
        try:
            ext = _extents(r, 4 * MiB, 0, "qemu:dirty-bitmap:b")
            lengths, flags = ext[0::2], ext[1::2]
            starts = [0, *itertools.accumulate(lengths)]
            dirty = [(starts[i], n) for i, (n, f) in enumerate(zip(lengths, flags)) if f]
            assert dirty == [(1 * MiB, 64 * KiB), (2 * MiB, 128 * KiB), (3 * MiB, 64 * KiB)]
        finally:
            r.shutdown()
    finally:
        h.shutdown()


def test_export_removal_reaches_worker_clients(worker_daemon):
    d, q, sock = worker_daemon
    h = _connect(nbd_uri(sock, "f"))
    try:
        assert len(_children(d.proc.pid)) == 1
        h.pwrite(b"\x05" * 4096, 0)
        # safe removal sees the worker's client ...
        assert q.error("block-export-del", {"id": "e"}) == "export 'e' still in use"
        assert [e["id"] for e in q.cmd("query-block-exports")] == ["e"]
        assert h.pread(4096, 0) == b"\x05" * 4096
        # ... hard removal drops it
        q.cmd("block-export-del", {"id": "e", "mode": "hard"})
        ev = q.event("BLOCK_EXPORT_DELETED")
        assert ev["id"] == "e"
        assert q.cmd("query-block-exports") == []
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
    finally:
        _hang_up(h)
    assert d.alive()
