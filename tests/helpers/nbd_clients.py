"""libnbd client checks shared by the qemu-nbd tests and the QMP (storage daemon) tests."""
from __future__ import annotations

import os

MiB = 1024 * 1024


def connect(uri: str):
    """A libnbd handle connected to `uri` (the caller shuts it down)."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def check_multi_conn_consistency(uri: str, zero_at: int = 2 * MiB,
                                 tail: bytes | None = None) -> None:
    """Three connections to `uri` advertise multi-conn, and what one writes or zeroes is read
    by the others once a third one has flushed: 64 KiB written at 2 MiB, then 4 KiB zeroed at
    `zero_at`; `tail` is what the next 4 KiB must still hold (by default the data written
    there, `zero_at` being inside the written range)."""
    a, b, c = (connect(uri) for _ in range(3))
    try:
        assert a.can_multi_conn() and b.can_multi_conn() and c.can_multi_conn()
        data = os.urandom(65536)
        a.pwrite(data, 2 * MiB)
        b.flush()
        assert c.pread(65536, 2 * MiB) == data
        c.zero(4096, zero_at)
        a.flush()
        if tail is None:
            start = zero_at - 2 * MiB + 4096
            tail = data[start:start + 4096]
        assert b.pread(8192, zero_at) == bytes(4096) + tail
    finally:
        for h in (a, b, c):
            h.shutdown()


def unsent_bytes(fd: int) -> int:
    """Bytes the peer has not read yet from our socket ``fd`` (SIOCOUTQ)."""
    import fcntl
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def wait_sent(h, timeout: float = 10.0) -> None:
    """Until the server has read everything the libnbd handle ``h`` sent: a condition (the
    kernel's count of unread bytes), not a delay."""
    import time
    fd = h.aio_get_fd()
    deadline = time.monotonic() + timeout
    while unsent_bytes(fd):
        assert time.monotonic() < deadline, "server did not read the request"
        time.sleep(0.001)


def hang_up(h) -> None:
    """Hang up the libnbd handle's connection abruptly (no NBD_CMD_DISC)."""
    import socket
    s = socket.socket(fileno=os.dup(h.aio_get_fd()))
    try:
        s.shutdown(socket.SHUT_RDWR)
    finally:
        s.close()
