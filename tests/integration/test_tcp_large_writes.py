"""Large writes over TCP (issue 13): payloads are received into the connection's buffers (a
large buffer of its own past 1 MiB), then written.  Whatever the sizes, every byte must land
where the client wrote it, and the request after a large write must be served at once.
(This file first tested an SO_RCVLOWAT scheme, dropped after a benchmark run hung on it:
a reader left waiting for a mark that is never reached is what the deadlines here catch.)

Real blockexport-nbd over TCP (in the main process, in a worker process, with small fixed
socket buffers), real libnbd clients, the file itself as the oracle.  Every wait has a
deadline: a stuck reader fails the test instead of hanging it.
"""
from __future__ import annotations

import os
import time

import pytest

nbd = pytest.importorskip("nbd")

from helpers.servers import start_server  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SIZE = 48 * MiB
LOWAT = 256 * KiB       # the dropped scheme's mark: sizes around it stay in the matrix
DEADLINE = 15.0

# payload sizes around 256 KiB, the reader's buffer (1 MiB) and a large buffer of its own
SIZES = [LOWAT - 1, LOWAT, LOWAT + 1, 2 * LOWAT + 3, MiB - 1, MiB, 2 * MiB + 5, 32 * MiB]


@pytest.fixture(params=["here", "worker", "fixed-buffers"])
def server(request, tmp_path, shm_dir):
    image = shm_dir / "w.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    env = dict(os.environ)
    if request.param == "worker":
        env["BLOCKEXPORT_NBD_WORKER_POLICY"] = "always"
        env["BLOCKEXPORT_NBD_WORKERS"] = "1"
    else:
        env["BLOCKEXPORT_NBD_WORKERS"] = "0"
    if request.param == "fixed-buffers":     # a window smaller than most payloads
        env["BLOCKEXPORT_NBD_SOCKET_BUFFER"] = str(128 * KiB)
    s = start_server("blockexport-nbd", image, ["-e", "4"], tmp_path=tmp_path,
                     transport="tcp4", env=env)
    yield s, image
    s.stop()


def _wait(h, cookie):
    """Wait for an aio command with a deadline (True if it completed)."""
    end = time.monotonic() + DEADLINE
    while not h.aio_command_completed(cookie):
        if time.monotonic() > end:
            return False
        h.poll(100)
    return True


def _file(image, offset, length):
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_large_writes_then_small_requests(server):
    """Each large write, then a small write and a small read right after it: all served
    within the deadline, the file holds the bytes."""
    srv, image = server
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        offset = 0
        for size in SIZES:
            data = os.urandom(size)
            assert _wait(h, h.aio_pwrite(data, offset)), "large write of %d stuck" % size
            tail = os.urandom(512)
            after = offset + size
            assert _wait(h, h.aio_pwrite(tail, after)), "small write after %d stuck" % size
            buf = nbd.Buffer(512)
            assert _wait(h, h.aio_pread(buf, offset)), "small read after %d stuck" % size
            assert buf.to_bytearray() == data[:512]
            assert _wait(h, h.aio_flush())
            assert _file(image, offset, size) == data, size
            assert _file(image, after, 512) == tail
            offset = (after + 512 + 4095) // 4096 * 4096
            if offset + 32 * MiB + 4096 > SIZE:
                offset = 0
    finally:
        h.shutdown()


def test_pipelined_large_and_small_writes(server):
    """Large and small writes in flight together (8 MiB-sized writes around 1 MiB and
    4 KiB ones between them), then reads of every range: the bytes of each, nothing
    shifted between requests."""
    srv, image = server
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        writes = []
        offset = 0
        for i in range(24):
            size = [MiB, 4 * KiB, LOWAT + 7, 700 * KiB][i % 4]
            writes.append((offset, os.urandom(size)))
            offset += (size + 4095) // 4096 * 4096
        cookies = [h.aio_pwrite(data, off) for off, data in writes]
        for c in cookies:
            assert _wait(h, c)
        assert _wait(h, h.aio_flush())
        for off, data in writes:
            assert _file(image, off, len(data)) == data, off
            buf = nbd.Buffer(len(data))
            assert _wait(h, h.aio_pread(buf, off))
            assert buf.to_bytearray() == data, off
    finally:
        h.shutdown()


def test_client_gone_mid_payload(server):
    """A client that sends a large write's header and part of its payload, then closes:
    that connection is dropped and the next client is served at once."""
    import socket
    import struct
    srv, image = server
    host, port = srv.address
    s = socket.create_connection((host, port))
    try:
        f = s.makefile("rb")
        # fixed newstyle handshake, NBD_OPT_GO for the default export (name "")
        f.read(18)
        s.sendall(struct.pack(">I", 3))          # FIXED_NEWSTYLE | NO_ZEROES
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", f.read(20))
            f.read(length)
            if rtype == 1:                        # NBD_REP_ACK
                break
        # a 1 MiB write, then 300 KiB of its payload, then gone
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, MiB) + os.urandom(300 * KiB))
    finally:
        s.close()
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        data = os.urandom(MiB)
        assert _wait(h, h.aio_pwrite(data, 4 * MiB))
        assert _wait(h, h.aio_flush())
        assert _file(image, 4 * MiB, MiB) == data
    finally:
        h.shutdown()
