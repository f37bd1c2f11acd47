"""nbd-server-start's ``handshake-max-seconds`` and ``--nbd-server ...,handshake-max-seconds=N``
(QEMU 10.0; the limit is QEMU 9.1's fix for CVE-2024-7409), and negotiating clients closed at
nbd-server-stop and at exit (the other half of that fix).

qemu-storage-daemon 7.2 (the oracle here) has neither the member nor the fix, so these tests
run blockexport-daemon only.  Stalled clients are raw sockets; every wait is a bounded wait for
the server's EOF, never a sleep.
"""
from __future__ import annotations

import socket

import pytest

from helpers.daemons import file_node, make_image, nbd_uri, unix_addr
from helpers.nbd_clients import finish_export_name, stalled_client, wait_eof

nbd = pytest.importorskip("nbd")

OURS = "blockexport-daemon"
LIMIT = 1


def _stalled(path, stage="silent"):
    return stalled_client(socket.AF_UNIX, str(path), stage)


def _export(q, tmp_path):
    q.cmd("blockdev-add", file_node(make_image(tmp_path / "disk.img")))
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "",
                               "writable": True})


def test_qmp_member_drops_stalled_clients(launch, tmp_path):
    q = launch(OURS).qmp()
    sock = tmp_path / "nbd.sock"
    q.cmd("nbd-server-start", {"addr": unix_addr(sock), "handshake-max-seconds": LIMIT})
    _export(q, tmp_path)
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    try:
        for stage in ("silent", "mid-option"):
            s = _stalled(sock, stage)
            try:
                assert wait_eof(s) >= LIMIT - 0.2
            finally:
                s.close()
        # the client that negotiated in time outlived the limit, and others can still connect
        assert h.pread(512, 0) == bytes(512)
        h2 = nbd.NBD()
        h2.connect_uri(nbd_uri(sock))
        h2.shutdown()
    finally:
        h.shutdown()


def test_command_line_member(launch, tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    make_image(tmp_path / "disk.img")
    blockdev = ["--blockdev", "driver=file,node-name=f,filename=%s" % (tmp_path / "disk.img")]
    unlimited = launch(OURS, blockdev + [
        "--nbd-server", "addr.type=unix,addr.path=%s,handshake-max-seconds=0" % a,
        "--export", "type=nbd,id=e,node-name=f,name="], workdir=tmp_path)
    limited = launch(OURS, [
        "--nbd-server", '{"addr": {"type": "unix", "path": "%s"}, "handshake-max-seconds": %d}'
        % (b, LIMIT)], workdir=tmp_path)
    assert unlimited.alive() and limited.alive()
    first = _stalled(a)
    try:
        late = _stalled(b)
        try:
            wait_eof(late)
        finally:
            late.close()
        assert finish_export_name(first) == 4 << 20      # limit 0: still negotiating
    finally:
        first.close()


def test_nbd_server_stop_closes_negotiating_clients(launch, tmp_path):
    q = launch(OURS).qmp()
    sock = tmp_path / "nbd.sock"
    q.cmd("nbd-server-start", {"addr": unix_addr(sock), "handshake-max-seconds": 0})
    _export(q, tmp_path)
    stalled = [_stalled(sock, stage) for stage in ("silent", "mid-option")]
    try:
        q.cmd("nbd-server-stop")
        for s in stalled:
            wait_eof(s, timeout=5)
        # the server can start again on the same path
        q.cmd("nbd-server-start", {"addr": unix_addr(sock)})
    finally:
        for s in stalled:
            s.close()


def test_quit_closes_negotiating_clients(launch, tmp_path):
    d = launch(OURS)
    q = d.qmp()
    sock = tmp_path / "nbd.sock"
    q.cmd("nbd-server-start", {"addr": unix_addr(sock), "handshake-max-seconds": 0})
    _export(q, tmp_path)
    s = _stalled(sock, "mid-option")
    try:
        q.cmd("quit")
        wait_eof(s, timeout=5)
        assert d.wait_exit(5) == 0
    finally:
        s.close()


def test_introspection_and_validation(launch, tmp_path):
    q = launch(OURS).qmp()
    schema = {e["name"]: e for e in q.cmd("query-qmp-schema")}
    for arg_type in (schema["nbd-server-start"]["arg-type"],):
        members = {m["name"]: m for m in schema[arg_type]["members"]}
        assert members["handshake-max-seconds"] == {"name": "handshake-max-seconds",
                                                    "type": "int", "default": None}
        assert list(members)[:2] == ["addr", "handshake-max-seconds"]   # QEMU's order
    addr = unix_addr(tmp_path / "nbd.sock")
    for bad in (-1, 2**32, "10"):
        err = q.error("nbd-server-start", {"addr": addr, "handshake-max-seconds": bad})
        ref = q.error("nbd-server-start", {"addr": addr, "max-connections": bad})
        assert err == ref.replace("max-connections", "handshake-max-seconds")
    q.cmd("nbd-server-start", {"addr": addr, "handshake-max-seconds": 2**32 - 1})
