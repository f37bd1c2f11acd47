"""blockexport.util.linux_aio against the real kernel: O_DIRECT reads and writes, the end of
the file, a refused submission, an fdatasync by AIO, the stop poll waking a waiting thread."""
from __future__ import annotations

import errno
import mmap
import os
import threading

import pytest

from blockexport.util import linux_aio as A


@pytest.fixture
def direct_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(64 * 1024))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        yield path, fd
    finally:
        os.close(fd)


def test_available_on_linux():
    assert A.available()


def test_write_then_read_in_flight_together(direct_file):
    path, fd = direct_file
    ctx = A.AioContext(4)
    try:
        bufs = [mmap.mmap(-1, 4096) for _ in range(4)]
        for i, b in enumerate(bufs[:2]):
            b[:] = bytes([i + 1]) * 4096
            ctx.submit(i, A.IOCB_CMD_PWRITE, fd, A.buffer_address(b), 4096, i * 8192)
        done = []
        while len(done) < 2:
            done += ctx.getevents()
        assert sorted(done) == [(0, 4096), (1, 4096)]
        ctx.submit(2, A.IOCB_CMD_PREAD, fd, A.buffer_address(bufs[2]), 4096, 8192)
        ctx.submit(3, A.IOCB_CMD_PREAD, fd, A.buffer_address(bufs[3]), 4096, 60 * 1024)
        done = []
        while len(done) < 2:
            done += ctx.getevents()
        assert sorted(done) == [(2, 4096), (3, 4096)]
        assert bufs[2][:] == b"\x02" * 4096 and bufs[3][:] == bytes(4096)
        ctx.submit(0, A.IOCB_CMD_PREAD, fd, A.buffer_address(bufs[0]), 4096, 1 << 20)
        assert ctx.getevents() == [(0, 0)]          # past the end: nothing read
    finally:
        ctx.close()
        ctx.close()                                  # twice is harmless
    data = path.read_bytes()
    assert data[:4096] == b"\x01" * 4096 and data[8192:12288] == b"\x02" * 4096


def test_refused_submission_raises(direct_file):
    ctx = A.AioContext(1)
    try:
        b = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as e:
            ctx.submit(0, A.IOCB_CMD_PREAD, 987654, A.buffer_address(b), 4096, 0)
        assert e.value.errno == errno.EBADF
    finally:
        ctx.close()


def test_wake_ends_a_wait():
    ctx = A.AioContext(2)
    got = []
    try:
        ctx.arm_wake()
        t = threading.Thread(target=lambda: got.extend(ctx.getevents()))
        t.start()
        ctx.wake()
        t.join(10)
        assert not t.is_alive()
        assert [slot for slot, _ in got] == [ctx.STOP]
    finally:
        ctx.close()


def test_fdsync_completes_after_the_writes_before_it(direct_file):
    path, fd = direct_file
    ctx = A.AioContext(2)
    try:
        b = mmap.mmap(-1, 4096)
        b[:] = b"\x07" * 4096
        ctx.submit(0, A.IOCB_CMD_PWRITE, fd, A.buffer_address(b), 4096, 4096)
        assert ctx.getevents() == [(0, 4096)]
        ctx.submit(1, A.IOCB_CMD_FDSYNC, fd, 0, 0, 0)
        assert ctx.getevents() == [(1, 0)]
        with pytest.raises(OSError) as e:       # not a file descriptor: refused at submission
            ctx.submit(1, A.IOCB_CMD_FDSYNC, 987654, 0, 0, 0)
        assert e.value.errno == errno.EBADF
    finally:
        ctx.close()
    assert path.read_bytes()[4096:8192] == b"\x07" * 4096
