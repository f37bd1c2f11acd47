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


# --- raw clients that stop negotiating (the handshake limit) ------------------------------------
GREETING_LEN = 18
IHAVEOPT = b"IHAVEOPT"
FLAG_C_FIXED_NEWSTYLE = 1
OPT_GO = 7


def stalled_client(family: int, address, stage: str = "silent", timeout: float = 15.0):
    """A raw socket that connected, read the greeting, then stopped negotiating:
    'silent' sends nothing; 'mid-option' sends the client flags and the start of an
    NBD_OPT_GO whose payload never completes.  The socket's timeout is `timeout` (a bound on
    waits, never a synchronisation)."""
    import socket
    import struct
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(address)
    greeting = b""
    while len(greeting) < GREETING_LEN:
        chunk = s.recv(GREETING_LEN - len(greeting))
        assert chunk, "server closed before its greeting"
        greeting += chunk
    assert greeting[8:16] == IHAVEOPT
    if stage == "mid-option":
        s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE)
                  + IHAVEOPT + struct.pack(">II", OPT_GO, 100) + b"\0" * 10)
    else:
        assert stage == "silent", stage
    return s


def wait_eof(s, timeout: float = 15.0) -> float:
    """Read from `s` until the server closes it; returns the seconds that took.  Fails if the
    server sends anything, or does not close within `timeout`."""
    import socket
    import time
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        data = b""
    except socket.timeout:
        raise AssertionError("the server did not drop the client within %ss" % timeout)
    assert data == b"", "unexpected bytes from the server: %r" % data[:64]
    return time.monotonic() - t0


def finish_export_name(s, name: str = "") -> int:
    """Complete negotiation on a 'silent' stalled client with NBD_OPT_EXPORT_NAME; returns the
    export size the server announced (proves the connection was alive)."""
    import struct
    payload = name.encode()
    s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | 2)   # FIXED_NEWSTYLE | NO_ZEROES
              + IHAVEOPT + struct.pack(">II", 1, len(payload)) + payload)
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "server closed the connection instead of answering NBD_OPT_EXPORT_NAME"
        reply += chunk
    return struct.unpack(">QH", reply)[0]
