"""Multi-conn and the connection limit of an NBD server started over QMP."""
from __future__ import annotations

import os
import threading

import pytest

from helpers.daemons import MiB, file_node, nbd_uri, unix_addr

nbd = pytest.importorskip("nbd")

NOT_BEFORE = 0.5       # how long a waiting client is watched for a (wrong) early completion
DEADLINE = 10.0


def setup(q, tmp_path, image, **server):
    sock = str(tmp_path / "nbd.sock")
    q.cmd("blockdev-add", file_node(image))
    q.cmd("nbd-server-start", {"addr": unix_addr(sock), **server})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "writable": True})
    return nbd_uri(sock, "f")


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


@pytest.mark.parametrize("server", [{}, {"max-connections": 0}, {"max-connections": 3}])
def test_multi_conn_consistency(qmp, tmp_path, image, server):
    uri = setup(qmp, tmp_path, image, **server)
    a, b, c = (connect(uri) for _ in range(3))
    try:
        assert a.can_multi_conn() and b.can_multi_conn() and c.can_multi_conn()
        data = os.urandom(65536)
        a.pwrite(data, 2 * MiB)
        b.flush()
        assert c.pread(65536, 2 * MiB) == data
        c.zero(4096, 2 * MiB)
        a.flush()
        assert b.pread(8192, 2 * MiB) == bytes(4096) + data[4096:8192]
    finally:
        for h in (a, b, c):
            h.shutdown()


def test_max_connections_one(qmp, tmp_path, image):
    uri = setup(qmp, tmp_path, image, **{"max-connections": 1})
    first = connect(uri)
    assert not first.can_multi_conn()
    done = threading.Event()
    result: dict = {}

    def second():
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            result["handle"] = h
        except Exception as e:       # reported by the assertions below
            result["error"] = e
        finally:
            done.set()

    t = threading.Thread(target=second, daemon=True)
    t.start()
    try:
        # the second connect sits in the listen backlog while the first is connected
        assert not done.wait(NOT_BEFORE), f"second client completed early: {result}"
        assert first.pread(4, 0) == bytes(4)
        first.shutdown()
        assert done.wait(DEADLINE), "second client never got in after the first left"
        assert "error" not in result, result
        h = result["handle"]
        assert not h.can_multi_conn()
        assert h.pread(4, 0) == bytes(4)
        h.shutdown()
    finally:
        t.join(DEADLINE)


def test_max_connections_visible_over_two_exports(qmp, tmp_path, image):
    """The limit counts connections to the server, not per export."""
    uri = setup(qmp, tmp_path, image, **{"max-connections": 2})
    qmp.cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "f", "name": "two"})
    a = connect(uri)
    b = connect(uri.replace("/f?", "/two?"))
    done = threading.Event()

    def third():
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            h.shutdown()
        finally:
            done.set()

    t = threading.Thread(target=third, daemon=True)
    t.start()
    try:
        assert a.can_multi_conn() and b.can_multi_conn()
        assert not done.wait(NOT_BEFORE)
        b.shutdown()
        assert done.wait(DEADLINE)
    finally:
        a.shutdown()
        t.join(DEADLINE)
