"""Several connections to one export: multi-conn consistency and the -e/--shared limit."""
from __future__ import annotations

import select
import socket

import pytest

from conftest import IMAGE_DATA, MiB
from helpers.nbd_clients import check_multi_conn_consistency
from helpers.nbd_clients import connect as _connect
from helpers.prober import Prober

nbd = pytest.importorskip("nbd")

NO_GREETING_WAIT = 0.5     # how long a waiting client is watched for a (wrong) greeting
GREETING_DEADLINE = 10.0


@pytest.mark.parametrize("shared", ["3", "4", "0"])
def test_write_flush_read_across_connections(start_server, sparse_image, shared):
    s = start_server(sparse_image, ["-e", shared])
    check_multi_conn_consistency(s.uri(), zero_at=0, tail=IMAGE_DATA[0][:4096])


@pytest.mark.parametrize("args,multi", [
    ([], False), (["-r"], False), (["-t"], False), (["-r", "-t"], False),
    (["-e", "1"], False), (["-e", "0"], True), (["-e", "2"], True), (["-e", "5"], True),
    (["-r", "-e", "2"], True), (["-t", "-e", "0"], True),
])
def test_can_multi_conn(start_server, sparse_image, args, multi):
    s = start_server(sparse_image, args, persistent=False)
    h = _connect(s.uri())
    try:
        assert h.can_multi_conn() is multi
    finally:
        h.shutdown()


def _open_client(server) -> Prober:
    p = Prober.connect(server)
    p.open("")
    return p


def _nonblocking_connect(server) -> socket.socket:
    s = socket.socket(server.family, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(server.address)
    except (BlockingIOError, InterruptedError):
        # TCP: wait (bounded) for the connect to complete at TCP level
        _, w, _ = select.select([], [s], [], GREETING_DEADLINE)
        assert w, "TCP connect did not complete"
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return s


def _assert_no_greeting(sock: socket.socket) -> None:
    r, _, _ = select.select([sock], [], [], NO_GREETING_WAIT)
    assert not r, f"greeting arrived although the connection limit is reached: {sock.recv(64)!r}"


def _assert_greeting(sock: socket.socket) -> None:
    data = b""
    while len(data) < 18:
        r, _, _ = select.select([sock], [], [], GREETING_DEADLINE)
        assert r, "no greeting after the slot was freed"
        chunk = sock.recv(18 - len(data))
        assert chunk, "server closed the waiting connection"
        data += chunk
    assert data == b"NBDMAGICIHAVEOPT\x00\x03"


@pytest.mark.parametrize("transport", ["unix", "tcp4"])
def test_shared_1_second_client_waits(start_server, sparse_image, transport):
    s = start_server(sparse_image, [], transport=transport)      # -t, default -e 1
    first = _open_client(s)
    waiting = _nonblocking_connect(s)
    try:
        _assert_no_greeting(waiting)
        assert first.pread(0, 16) == IMAGE_DATA[0][:16]        # the first is unaffected
        first.disconnect()
        _assert_greeting(waiting)
        # and the second can now negotiate and work
        waiting.setblocking(True)
        p = Prober(waiting)
        p.send_client_flags()
        p.go("", [])
        assert p.pread(0, 16) == IMAGE_DATA[0][:16]
        p.disconnect()
    finally:
        first.close()
        waiting.close()


def test_shared_2_third_client_waits(start_server, sparse_image):
    s = start_server(sparse_image, ["-e", "2"])
    c1 = _open_client(s)
    c2 = _open_client(s)
    waiting = _nonblocking_connect(s)
    try:
        _assert_no_greeting(waiting)
        c2.disconnect()
        _assert_greeting(waiting)
        assert c1.pread(MiB, 16) == b"\x22" * 16
    finally:
        for x in (c1, c2):
            x.close()
        waiting.close()


def test_waiting_client_counts_only_when_accepted(start_server, sparse_image):
    """A client that gave up while waiting does not take the slot."""
    s = start_server(sparse_image)
    first = _open_client(s)
    gave_up = _nonblocking_connect(s)
    _assert_no_greeting(gave_up)
    gave_up.close()
    waiting = _nonblocking_connect(s)
    try:
        first.disconnect()
        _assert_greeting(waiting)
    finally:
        first.close()
        waiting.close()


def test_shared_unlimited_many_clients(start_server, sparse_image):
    s = start_server(sparse_image, ["-e", "0"])
    clients = [_open_client(s) for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            c.pwrite(2 * MiB + i * 512, bytes([i]) * 512)
        for i, c in enumerate(clients):
            assert c.pread(2 * MiB + ((i + 1) % 20) * 512, 512) == bytes([(i + 1) % 20]) * 512
    finally:
        for c in clients:
            c.close()
