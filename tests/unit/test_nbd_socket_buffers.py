"""The NBD connection's socket buffers (issue 13): 2 MiB on unix sockets by default, the
kernel's autotuning on TCP, BLOCKEXPORT_NBD_SOCKET_BUFFER for any socket; both buffers get at
least the asked size, past the sysctl maximum where the process may (CAP_NET_ADMIN)."""
from __future__ import annotations

import os
import socket

from blockexport.exports import nbd_conn


def test_default_sizes():
    assert nbd_conn.SOCKET_BUFFER == int(os.environ.get("BLOCKEXPORT_NBD_SOCKET_BUFFER", -1))
    u = socket.socket(socket.AF_UNIX)
    t = socket.socket(socket.AF_INET)
    try:
        assert nbd_conn.socket_buffer_size(u, -1) == 2 * 1024 * 1024
        assert nbd_conn.socket_buffer_size(t, -1) == 0          # TCP: autotuning
        assert nbd_conn.socket_buffer_size(t, 1 << 20) == 1 << 20
        assert nbd_conn.socket_buffer_size(u, 0) == 0           # the knob turns it off
    finally:
        u.close()
        t.close()


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
