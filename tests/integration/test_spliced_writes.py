"""Large writes moved by splice(2) (socket -> pipe -> file): the payload never passes through
Python.  libnbd writes through our server in-process (so the test can count the spliced
bytes and put faults under them); the images are checked with qemu-img.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import subprocess

import pytest

nbd = pytest.importorskip("nbd")

from conftest import MiB  # noqa: E402
from helpers.inprocess import InProcessServer  # noqa: E402

from blockexport.block import dirty_bitmap  # noqa: E402
from blockexport.block.graph import BlockGraph  # noqa: E402
from blockexport.nbd import constants as C  # noqa: E402

KiB = 1024
SIZE = 16 * MiB


def _graph(tmp_path, fmt: str, **raw_opts):
    img = tmp_path / ("img." + fmt)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)],
                       check=True)
    else:
        with open(img, "wb") as f:
            f.truncate(SIZE + raw_opts.get("offset", 0))
    graph = BlockGraph()
    graph.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img)})
    opts = {"driver": fmt, "node-name": "r", "file": "f"}
    opts.update(raw_opts)
    graph.blockdev_add(opts)
    return graph, img


class Counted:
    """Counts what the node's splice_write moved (wraps the node's own function)."""

    def __init__(self, node):
        self.node = node
        self.inner = node.splice_write
        self.bytes = 0
        node.splice_write = self

    def __call__(self, offset, pipe_fd, n):
        done = self.inner(offset, pipe_fd, n)
        self.bytes += done
        return done


def _shut(graph, srv):
    """Stop the server and close the nodes (once)."""
    if srv.loop.is_closed():
        return
    srv.stop()
    for name in ("r", "f"):
        graph.blockdev_del(name)


@pytest.fixture
def served(tmp_path):
    made = []

    def serve(fmt, **raw_opts):
        graph, img = _graph(tmp_path, fmt, **raw_opts)
        srv = InProcessServer(tmp_path / ("nbd%d.sock" % len(made)), graph)
        made.append((graph, srv))
        srv.add("r", writable=True)
        return graph, srv, img
    yield serve
    for graph, srv in made:
        _shut(graph, srv)


def _requests(seed, count):
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        length = rnd.choice([128 * KiB, 256 * KiB + 7, 1 * MiB, 1 * MiB - 512, 300 * KiB])
        offset = rnd.randrange(0, SIZE - length)
        out.append((offset, length, rnd.randbytes(length)))
    return out


def _write_pipelined(h, requests):
    """All writes in flight at once (libnbd keeps them pipelined), then wait for them."""
    cookies = [h.aio_pwrite(data, offset) for offset, _, data in requests]
    for cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(-1)


def _model(requests, base=None):
    img = bytearray(SIZE) if base is None else bytearray(base)
    for offset, length, data in requests:
        img[offset:offset + length] = data
    return bytes(img)


@pytest.mark.parametrize("fmt,opts", [("raw", {}), ("raw", {"offset": 64 * KiB}),
                                      ("qcow2", {})])
def test_large_writes_are_spliced_and_land(served, tmp_path, fmt, opts):
    graph, srv, img = served(fmt, **opts)
    node = graph.get("r")
    assert node.splice_write is not None
    h = nbd.NBD()
    h.connect_uri(srv.uri("r"))
    try:
        first = _requests(1, 24)
        _write_pipelined(h, first)      # qcow2: allocating, mostly the usual path
        counted = Counted(node)
        second = _requests(2, 24)
        # overwrite what the first round allocated (qcow2: in place, so spliced)
        second += [(o, n, bytes([i + 1]) * n) for i, (o, n, _) in enumerate(first)]
        _write_pipelined(h, second)
        h.flush()
        expected = _model(first + second)
        assert h.pread(SIZE, 0) == expected
        # most of the overwrite round went through the pipe (a request whose payload had
        # mostly arrived with earlier ones, in one receive, is written from the buffer)
        total = sum(n for _, n, _ in second)
        assert counted.bytes > total // 2, (counted.bytes, total)
    finally:
        h.shutdown()
    _shut(graph, srv)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)],
                       check=True)
        assert out.read_bytes() == expected
    else:
        data = img.read_bytes()
        off = opts.get("offset", 0)
        assert data[off:off + SIZE] == expected
        assert data[:off] == bytes(off)


def test_failed_spliced_write_drains_payload_and_connection_lives(served):
    graph, srv, _ = served("raw")
    node = graph.get("r")
    inner = node.splice_write
    calls = []

    def failing(offset, pipe_fd, n):
        calls.append(n)
        if len(calls) == 1:
            # part of the bytes reach the file, then the disk fails
            inner(offset, pipe_fd, min(n, 4096))
            raise OSError(28, "No space left on device")
        return inner(offset, pipe_fd, n)
    node.splice_write = failing
    h = nbd.NBD()
    h.connect_uri(srv.uri("r"))
    try:
        with pytest.raises(nbd.Error) as ei:
            h.pwrite(b"a" * MiB, 0)
        assert ei.value.errnum == 28          # ENOSPC, as the node said
        # the rest of that payload was drained: the next requests parse and succeed
        h.pwrite(b"b" * MiB, MiB)
        h.pwrite(b"c" * 4096, 0)
        assert h.pread(4096, 0) == b"c" * 4096
        assert h.pread(MiB, MiB) == b"b" * MiB
        assert len(calls) >= 2
    finally:
        h.shutdown()


def test_spliced_writes_mark_dirty_bitmaps(served):
    graph, srv, _ = served("raw")
    node = graph.get("r")
    dirty_bitmap.bitmap_add(graph, "r", "b0", granularity=64 * KiB)
    counted = Counted(node)
    h = nbd.NBD()
    h.connect_uri(srv.uri("r"))
    try:
        h.pwrite(b"x" * MiB, 3 * MiB)
        h.pwrite(b"y" * (256 * KiB), 8 * MiB + 64 * KiB)
    finally:
        h.shutdown()
    assert counted.bytes >= MiB
    bm = node.find_dirty_bitmap("b0")
    flat = bm.extents(0, SIZE, 1000)
    dirty, pos = [], 0
    for n, st in zip(flat[::2], flat[1::2]):
        if st:
            dirty.append((pos, n))
        pos += n
    assert dirty == [(3 * MiB, MiB), (8 * MiB + 64 * KiB, 256 * KiB)]


def _raw_write_header(offset, length, cookie=1):
    return struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_WRITE, cookie, offset, length)


def test_client_vanishing_mid_payload_loses_only_itself(served):
    graph, srv, img = served("raw")
    h = nbd.NBD()
    h.connect_uri(srv.uri("r"))
    try:
        h.pwrite(b"k" * 4096, 0)
        for cut in (0, 100 * KiB, 700 * KiB):
            s = socket.socket(socket.AF_UNIX)
            s.connect(srv.path)
            try:
                _negotiate(s)
                s.sendall(_raw_write_header(MiB, MiB) + b"z" * cut)
            finally:
                s.close()
        # the server dropped those connections and serves the first client as before
        assert h.pread(4096, 0) == b"k" * 4096
        # (bytes of an unacknowledged write may or may not have reached the node)
        assert set(h.pread(MiB, MiB)) <= {0, ord("z")}
        h.pwrite(b"m" * MiB, 2 * MiB)
        assert h.pread(MiB, 2 * MiB) == b"m" * MiB
    finally:
        h.shutdown()
    assert _wait_connections(srv, 0)


def _negotiate(s):
    """Fixed newstyle, NBD_OPT_EXPORT_NAME "r", no zeroes: straight to transmission."""
    def exact(n):
        buf = b""
        while len(buf) < n:
            got = s.recv(n - len(buf))
            assert got
            buf += got
        return buf
    exact(18)
    s.sendall(struct.pack(">I", C.KNOWN_CLIENT_FLAGS))
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.Opt.EXPORT_NAME, 1) + b"r")
    exact(10)


def _wait_connections(srv, n, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while srv.connection_count() != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
