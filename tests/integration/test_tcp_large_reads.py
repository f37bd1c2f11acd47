"""Large reads over TCP (issue 13): bytes in the page cache are served inline, copied into a
buffer while the process serves several connections on BBR, header + sendfile when it serves
one or the connection does not pace (CUBIC: loopback connections get it by default, so each
server runs with BLOCKEXPORT_NBD_LOOPBACK_CC=bbr and =cubic, checked with ss);
misses (preadv2 RWF_NOWAIT; tmpfs lacks it and is read plainly) and holes go to the pool as
before.  Whatever the path, the client must get the file's bytes, holes as holes in
structured replies, the same with DF and with simple replies, and a write on one
connection must be seen by a read on another.

Real blockexport-nbd over TCP, real libnbd clients, the file itself as the oracle; the image
on ext4 (RWF_NOWAIT honoured) and on tmpfs (the fallback).  Workers are off so that the
connections share one process (what decides copy or sendfile).
"""
from __future__ import annotations

import os

import pytest

nbd = pytest.importorskip("nbd")

from helpers.servers import start_server  # noqa: E402
from helpers.tcp_info import congestion_controls  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
HOLE = (3 * MiB, 4 * MiB)       # a hole of 1 MiB, on a file system that keeps holes


def _image(path):
    data = bytearray(os.urandom(SIZE))
    data[HOLE[0]:HOLE[1]] = bytes(HOLE[1] - HOLE[0])
    with open(path, "wb") as f:
        f.write(data[:HOLE[0]])
        f.seek(HOLE[1])
        f.write(data[HOLE[1]:])
    return path, bytes(data)


@pytest.fixture(params=["disk", "tmpfs"])
def image(request, tmp_path, shm_dir):
    base = tmp_path if request.param == "disk" else shm_dir
    return _image(base / "big.img")


@pytest.fixture(params=["bbr", "cubic"])
def server(request, tmp_path, image):
    """Ours over TCP with its loopback connections on BBR (large cached reads copied from
    two connections on) or CUBIC (sent by sendfile)."""
    env = dict(os.environ, BLOCKEXPORT_NBD_WORKERS="0",
               BLOCKEXPORT_NBD_LOOPBACK_CC=request.param)
    env.pop("BLOCKEXPORT_NBD_TCP_COPY_READS", None)
    s = start_server("blockexport-nbd", image[0], ["-e", "16"], tmp_path=tmp_path,
                     transport="tcp4", env=env)
    s.cc = request.param
    yield s
    s.stop()


def _handle(uri, structured=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    return h


RANGES = [
    (0, MiB),                      # all data, the largest read that takes the path
    (MiB + 4096, 512 * KiB),
    (64 * KiB, 64 * KiB),          # the smallest large read
    (HOLE[0] - 256 * KiB, MiB),    # data then hole: a sparse reply
    (HOLE[0], MiB),                # all hole
    (SIZE - MiB, MiB),             # up to the end of the export
    (2 * MiB, 2 * MiB),            # larger than the reader's buffer: the pool as before
]


@pytest.mark.parametrize("connections", [1, 2])
def test_large_reads(server, image, connections):
    _, want = image
    handles = [_handle(server.uri()) for _ in range(connections)]
    try:
        assert handles[0].can_df()
        assert congestion_controls(server.port) == [server.cc] * connections
        for offset, length in RANGES:
            for h in handles:
                assert h.pread(length, offset) == want[offset:offset + length], \
                    (offset, length)
                chunks = []
                h.pread_structured(length, offset,
                                   lambda sub, off, st, err: chunks.append((st, off, len(sub)))
                                   or 0, flags=nbd.CMD_FLAG_DF)
                assert chunks == [(nbd.READ_DATA, offset, length)], ("DF", offset, length)
    finally:
        for h in handles:
            h.shutdown()


# small reads, served inline only when cached (read_cached: RWF_NOWAIT), else by the pool
SMALL = [(12 * KiB, 4 * KiB), (5 * MiB + 4096, 8 * KiB), (HOLE[0] - 4096, 16 * KiB)]


@pytest.mark.parametrize("connections", [1, 2])
def test_reads_after_the_page_cache_dropped(tmp_path, connections):
    """Pages not cached (dropped with POSIX_FADV_DONTNEED, on ext4): the RWF_NOWAIT read or
    probe misses and the pool serves the read, large or small; the bytes are the same."""
    path, want = _image(tmp_path / "cold.img")
    env = dict(os.environ, BLOCKEXPORT_NBD_WORKERS="0")
    s = start_server("blockexport-nbd", path, ["-e", "16"], tmp_path=tmp_path,
                     transport="tcp4", env=env)
    handles = []
    try:
        handles = [_handle(s.uri()) for _ in range(connections)]
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, length in RANGES + SMALL:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                for h in handles:
                    assert h.pread(length, offset) == want[offset:offset + length], \
                        (offset, length)
        finally:
            os.close(fd)
    finally:
        for h in handles:
            h.shutdown()
        s.stop()


def test_simple_replies(server, image):
    _, want = image
    a = _handle(server.uri(), structured=False)
    b = _handle(server.uri(), structured=False)
    try:
        assert not a.get_structured_replies_negotiated()
        for offset, length in RANGES:
            assert a.pread(length, offset) == want[offset:offset + length], (offset, length)
    finally:
        a.shutdown()
        b.shutdown()


def test_hole_comes_as_a_hole_chunk(server, image):
    """The sparse reply survives: the read over the hole gets an OFFSET_HOLE chunk."""
    a = _handle(server.uri())
    b = _handle(server.uri())
    chunks = []

    def chunk(subbuf, offset, status, err):
        chunks.append((status, offset, len(subbuf)))
        return 0
    try:
        a.pread_structured(MiB, HOLE[0] - 256 * KiB, chunk)
    finally:
        a.shutdown()
        b.shutdown()
    assert sorted(chunks) == [(nbd.READ_DATA, HOLE[0] - 256 * KiB, 256 * KiB),
                              (nbd.READ_HOLE, HOLE[0], MiB - 256 * KiB)], chunks


def test_write_on_one_connection_read_on_another(server, image):
    a = _handle(server.uri())
    b = _handle(server.uri())
    try:
        for i, offset in enumerate((0, 5 * MiB, HOLE[0])):
            data = bytes([i + 1]) * MiB
            a.pwrite(data, offset)
            a.flush()
            assert b.pread(MiB, offset) == data
            assert b.pread(MiB // 2, offset + MiB // 4) == data[:MiB // 2]
    finally:
        a.shutdown()
        b.shutdown()


def test_many_connections_concurrent_reads(server, image):
    """Eight connections reading large ranges at once, each checked."""
    _, want = image
    handles = [_handle(server.uri()) for _ in range(8)]
    try:
        cmds = []
        for i, h in enumerate(handles):
            for k in range(8):
                offset = ((i * 8 + k) * 192 * KiB) % (SIZE - MiB)
                buf = nbd.Buffer(MiB)
                cmds.append((h, h.aio_pread(buf, offset), buf, offset))
        for h, cookie, buf, offset in cmds:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
            assert buf.to_bytearray() == want[offset:offset + MiB], offset
    finally:
        for h in handles:
            h.shutdown()
