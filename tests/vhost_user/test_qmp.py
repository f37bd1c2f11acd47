"""vhost-user-blk exports over QMP and on the command line, with a frontend connected:
query-block-exports, block-export-del (safe and hard), a new export after the first is gone,
and a garbage frontend on one export while another export keeps serving.

Expected values are what qemu-storage-daemon 7.2 does (tests/vhost_user/QSD_FACTS.md)."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess

import pytest

from helpers import daemons as D
from helpers.procs import die_with_parent, make_image
from helpers.vhost_user_frontend import HDR, S_OK, VERSION, Frontend

from .conftest import KINDS


EXPORT_E = {"node-name": "f", "shutting-down": False, "type": "vhost-user-blk", "id": "e"}


def test_query_block_exports(start):
    s = start()
    q = s.qmp()
    assert q.cmd("query-block-exports") == [EXPORT_E]
    f = s.frontend()
    assert f.read(0, 512)[0] == S_OK
    assert q.cmd("query-block-exports") == [EXPORT_E]


@pytest.mark.parametrize("mode", ["safe", "hard"])
def test_export_del_with_frontend(start, mode):
    """block-export-del while a frontend is connected succeeds at once in both modes
    (safe does not wait for the vhost-user client): BLOCK_EXPORT_DELETED, the frontend's
    connection is closed, the socket file removed, query-block-exports empty."""
    s = start()
    q = s.qmp()
    f = s.frontend()
    assert f.write(0, b"d" * 512)[0] == S_OK
    assert q.cmd("block-export-del", {"id": "e", "mode": mode}) == {}
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e"}
    assert q.cmd("query-block-exports") == []
    assert f.wait_closed(2.0)
    assert not os.path.exists(s.sock)
    assert q.error("block-export-del", {"id": "e"}) == "Export 'e' is not found"


def test_export_add_errors_and_add(start, tmp_path):
    """A new export after the first is gone (writable, 2 queues) serves a frontend; a default
    (read-only) add offers VIRTIO_BLK_F_RO.  (The argument errors are compared word for word
    with QSD in tests/qmp/test_vhost_user_blk_qmp.py.)"""
    s = start()
    q = s.qmp()
    assert q.cmd("block-export-del", {"id": "e"}) == {}
    q.event("BLOCK_EXPORT_DELETED")
    sock = str(tmp_path / "e2.sock")
    base = {"type": "vhost-user-blk", "id": "e2", "node-name": "f",
            "addr": {"type": "unix", "path": sock}}
    assert q.cmd("query-block-exports") == []
    assert q.cmd("block-export-add", {**base, "writable": True, "num-queues": 2}) == {}
    f = Frontend(sock, num_queues=2)
    s.daemon.clients.append(f)
    assert f.queue_num == 2 and not f.offered_features >> 5 & 1
    assert f.write(0, b"2" * 512, queue=1)[0] == S_OK
    assert q.cmd("block-export-del", {"id": "e2"}) == {}
    q.event("BLOCK_EXPORT_DELETED")
    assert f.wait_closed(2.0)
    f.close()
    assert q.cmd("block-export-add", {**base, "id": "e3"}) == {}
    g = Frontend(sock)
    s.daemon.clients.append(g)
    assert g.offered_features >> 5 & 1
    assert g.read(0, 512) == (S_OK, b"2" * 512, 513)


def test_garbage_on_one_export_others_served(start, tmp_path):
    """Two exports in one daemon: a frontend of export 2 sends garbage and is dropped while a
    frontend of export 1 keeps working throughout."""
    s = start()
    q = s.qmp()
    img2 = make_image(tmp_path / "second.img", 1024 * 1024)
    q.cmd("blockdev-add", {"driver": "file", "node-name": "g", "filename": str(img2)})
    sock2 = str(tmp_path / "second.sock")
    q.cmd("block-export-add", {"type": "vhost-user-blk", "id": "e2", "node-name": "g",
                               "writable": True, "addr": {"type": "unix", "path": sock2}})
    good = s.frontend()
    assert good.write(0, b"g" * 512)[0] == S_OK
    bad = Frontend(sock2, handshake=False)
    s.daemon.clients.append(bad)
    bad.send_raw(HDR.pack(200, VERSION, 0))
    assert bad.wait_closed(2.0)
    assert good.read(0, 512)[1] == b"g" * 512
    bad2 = Frontend(sock2, handshake=False)
    s.daemon.clients.append(bad2)
    bad2.send_raw(HDR.pack(5, VERSION, 8 + 32) + struct.pack("<II", 1, 0) + bytes(16))
    bad2.close()                                        # truncated SET_MEM_TABLE, then gone
    assert good.read(0, 512)[1] == b"g" * 512
    third = Frontend(sock2)
    s.daemon.clients.append(third)
    assert third.write(0, b"3" * 512)[0] == S_OK
    # newest first
    assert q.cmd("query-block-exports") == [
        {"node-name": "g", "shutting-down": False, "type": "vhost-user-blk", "id": "e2"},
        EXPORT_E]


def test_addr_fd_inherited_listener(server, tmp_path):
    """`addr.type=fd,addr.str=N`: the export serves a listening socket the daemon inherited
    (a service manager's way); the frontend works through it."""
    image = make_image(tmp_path / "d.img", 1024 * 1024)
    path = str(tmp_path / "inherited.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    fd = lsock.fileno()
    proc = subprocess.Popen(
        [D.daemon_binary(KINDS[server]), "--blockdev",
         f"driver=file,node-name=f,filename={image}", "--export",
         f"type=vhost-user-blk,id=e,node-name=f,addr.type=fd,addr.str={fd},writable=on"],
        pass_fds=(fd,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=die_with_parent)
    lsock.close()
    try:
        f = Frontend(path)
        try:
            assert f.write(0, b"f" * 512)[0] == S_OK
            assert f.read(0, 512)[1] == b"f" * 512
        finally:
            f.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def test_sigterm_with_frontend_connected(start):
    """SIGTERM with a frontend connected: the daemon exits 0 and the frontend is
    disconnected."""
    s = start()
    f = s.frontend()
    assert f.write(0, b"t" * 512)[0] == S_OK
    s.daemon.signal(signal.SIGTERM)
    assert s.daemon.proc.wait(10) == 0
    assert f.wait_closed(2.0)
    assert s.image_bytes(0, 512) == b"t" * 512


def test_writethrough_export(start, server):
    """writethrough=on: both say write through in the config space (wce 0); data lands."""
    s = start()
    q = s.qmp()
    assert q.cmd("block-export-del", {"id": "e"}) == {}
    q.event("BLOCK_EXPORT_DELETED")
    sock = os.path.join(os.path.dirname(s.sock), "wt.sock")
    assert q.cmd("block-export-add", {"type": "vhost-user-blk", "id": "wt", "node-name": "f",
                                      "writable": True, "writethrough": True,
                                      "addr": {"type": "unix", "path": sock}}) == {}
    f = Frontend(sock)
    s.daemon.clients.append(f)
    assert f.config["wce"] == 0
    assert f.write(16, b"w" * 1024)[0] == S_OK
    assert s.image_bytes(16 * 512, 1024) == b"w" * 1024
