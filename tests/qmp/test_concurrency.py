"""Concurrency with real clients: several libnbd connections write, zero, trim and flush at once
while the monitor adds, clears, disables and enables dirty bitmaps, adds and deletes another
export of the same node, and finally stops the NBD server under them.  After each run the disk
is checked against a model, and the bitmaps against the requests that were made.  The same
script runs on qemu-storage-daemon 7.2 (the oracle) and ours.

The model: each client owns a disjoint region, so the final content of every byte is the last
operation its client completed there (writes of a pattern; write-zeroes and, with
``discard=unmap`` on a file node, trims read back as zeroes).  Bitmap ``all`` is never touched:
it must mark exactly the granules the clients touched.  Bitmap ``raced`` is cleared, disabled
and enabled under the I/O: it can only be a subset of ``all``; once the I/O has stopped and it is
cleared, one more write must show in it exactly.
"""
from __future__ import annotations

import random
import threading
import time

import pytest

from helpers.daemons import nbd_uri

nbd = pytest.importorskip("nbd")

KiB = 1024
MiB = 1024 * KiB
CLIENTS = 4
REGION = 2 * MiB
GRAN = 64 * KiB
OPS = 300


def _dirty(h, ctx, size):
    """Granule indexes marked in the ``qemu:dirty-bitmap:`` context ``ctx``."""
    marked = set()
    pos = 0
    while pos < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == ctx:
                got.extend(entries)
        h.block_status(size - pos, pos, cb)
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if flags & 1:
                marked.update(range(pos // GRAN, (pos + length + GRAN - 1) // GRAN))
            pos += length
    return marked


class Client(threading.Thread):
    def __init__(self, uri, index, seed):
        super().__init__(name=f"client{index}")
        self.uri = uri
        self.base = index * REGION
        self.rng = random.Random(seed)
        self.model = bytearray(REGION)
        self.touched = set()
        self.error = None

    def run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            try:
                self._ops(h)
            finally:
                h.shutdown()
        except Exception as exc:   # reported by the test
            self.error = exc

    def _ops(self, h):
        rng = self.rng
        for i in range(OPS):
            off = rng.randrange(0, REGION - 4096) & ~511
            length = min(rng.choice((512, 4096, 65536, 200 * KiB)), REGION - off)
            op = rng.random()
            if op < 0.55:
                data = bytes([rng.randrange(1, 256)]) * length
                h.pwrite(data, self.base + off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                self.model[off:off + length] = data
            elif op < 0.75:
                h.zero(length, self.base + off)
                self.model[off:off + length] = bytes(length)
            elif op < 0.85:
                h.trim(length, self.base + off)
                self.model[off:off + length] = bytes(length)
            else:
                h.flush()
                continue
            self.touched.update(range((self.base + off) // GRAN,
                                      (self.base + off + length + GRAN - 1) // GRAN))
        h.flush()


def _control(q, tmp_path, stop: threading.Event, seed):
    """Monitor commands racing the I/O until ``stop``."""
    rng = random.Random(seed)
    x = False
    while not stop.is_set():
        r = rng.random()
        if r < 0.3:
            q.cmd("block-dirty-bitmap-clear", {"node": "f", "name": "raced"})
        elif r < 0.45:
            q.cmd("block-dirty-bitmap-disable", {"node": "f", "name": "raced"})
            q.cmd("block-dirty-bitmap-enable", {"node": "f", "name": "raced"})
        elif r < 0.6:
            q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "tmp"})
            q.cmd("block-dirty-bitmap-remove", {"node": "f", "name": "tmp"})
        elif not x:
            q.cmd("block-export-add", {"type": "nbd", "id": "x", "node-name": "f",
                                       "name": "x", "writable": False})
            h = nbd.NBD()
            h.connect_uri(nbd_uri(tmp_path / "nbd.sock", "x"))
            h.pread(4096, rng.randrange(0, CLIENTS * REGION - 4096))
            h.shutdown()
            x = True
        else:
            q.cmd("block-export-del", {"id": "x", "mode": rng.choice(("safe", "hard"))})
            q.event("BLOCK_EXPORT_DELETED")
            x = False
    if x:
        q.cmd("block-export-del", {"id": "x", "mode": "hard"})
        q.event("BLOCK_EXPORT_DELETED")


@pytest.mark.parametrize("seed", [1, 2])
def test_clients_and_monitor_race(start_daemon, tmp_path, seed):
    size = CLIENTS * REGION
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
    d = start_daemon(["--blockdev", f"driver=file,node-name=f,filename={img},discard=unmap",
                      "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock"])
    q = d.qmp()
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "all"})
    q.cmd("block-dirty-bitmap-add", {"node": "f", "name": "raced"})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "f",
                               "writable": True, "bitmaps": ["all"]})
    uri = nbd_uri(tmp_path / "nbd.sock", "f")
    clients = [Client(uri, i, seed * 100 + i) for i in range(CLIENTS)]
    stop = threading.Event()
    ctl_error = []

    def control():
        try:
            _control(q, tmp_path, stop, seed)
        except Exception as exc:
            ctl_error.append(exc)
    ctl = threading.Thread(target=control)
    for c in clients:
        c.start()
    ctl.start()
    for c in clients:
        c.join(timeout=120)
    stop.set()
    ctl.join(timeout=60)
    assert not ctl_error, ctl_error
    for c in clients:
        assert not c.is_alive() and c.error is None, (c.name, c.error)

    touched = set().union(*(c.touched for c in clients))
    model = b"".join(bytes(c.model) for c in clients)
    def raced_marked():
        """Export the bitmap (busy while exported) on its own to read it."""
        q.cmd("block-export-add", {"type": "nbd", "id": "chk", "node-name": "f",
                                   "name": "chk", "writable": True, "bitmaps": ["raced"]})
        r = nbd.NBD()
        r.add_meta_context("qemu:dirty-bitmap:raced")
        r.connect_uri(nbd_uri(tmp_path / "nbd.sock", "chk"))
        try:
            return _dirty(r, "qemu:dirty-bitmap:raced", size)
        finally:
            r.shutdown()
            q.cmd("block-export-del", {"id": "chk", "mode": "hard"})
            q.event("BLOCK_EXPORT_DELETED")

    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:all")
    h.connect_uri(uri)
    try:
        assert h.pread(size, 0) == model
        all_marked = _dirty(h, "qemu:dirty-bitmap:all", size)
        assert all_marked == touched
        assert raced_marked() <= all_marked
        # quiet now: clear, one write, exactly that granule
        q.cmd("block-dirty-bitmap-clear", {"node": "f", "name": "raced"})
        h.pwrite(b"\x77" * 512, 5 * GRAN + 100)
        assert raced_marked() == {5}
        # nbd-server-stop under a connected client: it is dropped, the daemon goes on
        q.cmd("nbd-server-stop")
        assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
        with pytest.raises(nbd.Error):
            for _ in range(100):
                h.pread(4096, 0)
                time.sleep(0.01)
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass
    assert q.cmd("query-block-exports") == []
    d.stop()
    model = bytearray(model)
    model[5 * GRAN + 100:5 * GRAN + 612] = b"\x77" * 512
    assert img.read_bytes() == bytes(model)
