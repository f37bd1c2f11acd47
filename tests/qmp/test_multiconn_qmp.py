"""Multi-conn and the connection limit of an NBD server started over QMP."""
from __future__ import annotations

import threading

import pytest

from helpers.daemons import MiB, file_node, nbd_uri, unix_addr
from helpers.nbd_clients import check_multi_conn_consistency, connect

nbd = pytest.importorskip("nbd")

NOT_BEFORE = 0.5       # how long a waiting client is watched for a (wrong) early completion
DEADLINE = 10.0


def setup(q, tmp_path, image, **server):
    sock = str(tmp_path / "nbd.sock")
    q.cmd("blockdev-add", file_node(image))
    q.cmd("nbd-server-start", {"addr": unix_addr(sock), **server})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "writable": True})
    return nbd_uri(sock, "f")


@pytest.mark.parametrize("server", [{}, {"max-connections": 0}, {"max-connections": 3}])
def test_multi_conn_consistency(qmp, tmp_path, image, server):
    check_multi_conn_consistency(setup(qmp, tmp_path, image, **server), zero_at=2 * MiB)


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
