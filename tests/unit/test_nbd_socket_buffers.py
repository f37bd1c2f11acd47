"""The NBD connection's socket-buffer knob (BLOCKEXPORT_NBD_SOCKET_BUFFER, a measurement
lever for issue 13; off by default): both buffers get at least the asked size, past the
sysctl maximum where the process may (CAP_NET_ADMIN)."""
from __future__ import annotations

import os
import socket

from blockexport.exports import nbd_conn


def test_default_is_the_kernels():
    assert nbd_conn.SOCKET_BUFFER == int(os.environ.get("BLOCKEXPORT_NBD_SOCKET_BUFFER", 0))


def test_set_socket_buffers_on_a_unix_socket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        before = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        size = 4 * 1024 * 1024
        nbd_conn._set_socket_buffers(a, size)
        after_snd = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        after_rcv = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        with open("/proc/sys/net/core/wmem_max") as f:
            wmem_max = int(f.read())
        if os.geteuid() == 0:
            # the kernel doubles the value for its bookkeeping
            assert after_snd >= size and after_rcv >= size
        else:
            assert after_snd >= min(size, wmem_max)
        assert after_snd != before or before >= size
        a.sendall(b"x" * 1000)
        assert b.recv(1000) == b"x" * 1000
    finally:
        a.close()
        b.close()
