"""The FUSE export's worker loop without a kernel: a SOCK_SEQPACKET socketpair stands in for
/dev/fuse (one request per read, one reply per write), so truncated, inconsistent and unknown
requests can be sent byte by byte and the replies checked."""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading

import pytest

from blockexport.block.graph import BlockGraph
from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from blockexport.exports.fuse import FuseExport, FuseExportDriver
from blockexport.fuse import constants as C

HDR = struct.Struct("<IIQQIIIHH")


def request(opcode, unique, body=b"", length=None):
    n = HDR.size + len(body) if length is None else length
    return HDR.pack(n, opcode, unique, 1, 0, 0, 1, 0, 0) + body


def rw_in(offset, size):
    return struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)


@pytest.fixture
def served(tmp_path):
    """(send(bytes) -> reply bytes or None, the export, the image path)."""
    img = tmp_path / "img"
    img.write_bytes(b"\x11" * 8192 + bytes(8192))
    graph = BlockGraph()
    node = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img)})
    exports = []
    socks = []

    def start(writable=False, growable=False):
        att = node.attach("an unnamed block device",
                          PERM_CONSISTENT_READ | (PERM_WRITE if writable else 0), PERM_ALL)
        exp = FuseExport(FuseExportDriver(), "e", node, att, str(tmp_path / "mnt"),
                         writable, growable, False)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t = threading.Thread(target=exp._worker, args=(os.dup(theirs.fileno()),),
                             daemon=True)
        theirs.close()
        t.start()
        ours.settimeout(5)
        exports.append((exp, att, t))
        socks.append(ours)

        def send(data, reply=True):
            ours.send(data)
            if not reply:
                return None
            return ours.recv(1 << 21)
        return send, exp

    yield start, img
    for s in socks:
        s.close()                        # the worker's read ends: it leaves
    for exp, att, t in exports:
        t.join(5)
        assert not t.is_alive()
        att.detach()
    graph.close()


def status(reply):
    n, err, unique = struct.unpack_from("<IiQ", reply)
    assert n == len(reply)
    return -err, unique


def test_read_write_getattr(served):
    start, img = served
    send, _exp = start(writable=True)
    r = send(request(C.READ, 1, rw_in(8190, 4)))
    assert status(r) == (0, 1) and r[16:] == b"\x11\x11\0\0"
    r = send(request(C.READ, 2, rw_in(16384 - 2, 100)))         # short at the end
    assert status(r) == (0, 2) and r[16:] == b"\0\0"
    r = send(request(C.READ, 3, rw_in(1 << 20, 100)))          # past the end: empty
    assert status(r) == (0, 3) and r[16:] == b""
    r = send(request(C.WRITE, 4, rw_in(100, 5) + b"hello"))
    assert status(r) == (0, 4) and struct.unpack_from("<I", r, 16)[0] == 5
    assert img.read_bytes()[100:105] == b"hello"
    r = send(request(C.WRITE, 5, rw_in(16384 - 2, 4) + b"wxyz"))   # cut short: not growable
    assert struct.unpack_from("<I", r, 16)[0] == 2 and img.stat().st_size == 16384
    r = send(request(C.GETATTR, 6, bytes(16)))
    assert status(r) == (0, 6)
    size, blocks = struct.unpack_from("<QQ", r, 16 + 16 + 8)
    mode = struct.unpack_from("<I", r, 16 + 16 + 60)[0]
    assert size == 16384 and mode == 0o100600


def test_bad_requests_get_errors_not_tracebacks(served):
    start, _img = served
    send, _exp = start()
    # shorter than a header: dropped (no unique to answer), the worker goes on
    send(b"\x01\x02\x03", reply=False)
    # header length does not match what was read: EIO
    assert status(send(request(C.GETATTR, 7, bytes(16), length=999))) == (errno.EIO, 7)
    # READ without its struct: EINVAL
    assert status(send(request(C.READ, 8, b"\0" * 10))) == (errno.EINVAL, 8)
    # WRITE whose size disagrees with its payload: EINVAL (writable or not: checked after)
    assert status(send(request(C.WRITE, 9, rw_in(0, 100) + b"x"))) == (errno.EACCES, 9)
    # truncated SETATTR / FALLOCATE / LSEEK bodies: EINVAL
    for op in (C.SETATTR, C.FALLOCATE, C.LSEEK, C.OPEN):
        assert status(send(request(op, 10, b"\0" * 3))) == (errno.EINVAL, 10)
    # unknown and unsupported opcodes: ENOSYS; lookup: ENOENT
    assert status(send(request(9999, 11))) == (errno.ENOSYS, 11)
    assert status(send(request(C.LOOKUP, 12, b"x\0"))) == (errno.ENOENT, 12)
    # no reply for FORGET / INTERRUPT; the next request is still served
    send(request(C.FORGET, 13, struct.pack("<Q", 1)), reply=False)
    send(request(C.INTERRUPT, 14, struct.pack("<Q", 1)), reply=False)
    assert status(send(request(C.GETATTR, 15, bytes(16)))) == (0, 15)


def test_write_checks(served):
    start, _img = served
    send, _exp = start(writable=True)
    assert status(send(request(C.WRITE, 1, rw_in(0, 100) + b"x"))) == (errno.EINVAL, 1)
    send_ro, _ = start(writable=False)
    assert status(send_ro(request(C.WRITE, 2, rw_in(0, 1) + b"x"))) == (errno.EACCES, 2)
    setattr_size = struct.pack("<IIQQQQQQIIIIIIII", C.FATTR_SIZE, 0, 0, 4096, 0, 0, 0, 0,
                               0, 0, 0, 0, 0, 0, 0, 0)
    assert status(send_ro(request(C.SETATTR, 3, setattr_size))) == (errno.EACCES, 3)
    setattr_time = struct.pack("<IIQQQQQQIIIIIIII", C.FATTR_MTIME | C.FATTR_FH, 0, 0, 0, 0,
                               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert status(send(request(C.SETATTR, 4, setattr_time))) == (errno.ENOTSUP, 4)


def test_growable_write_grows(served):
    start, img = served
    send, _exp = start(writable=True, growable=True)
    r = send(request(C.WRITE, 1, rw_in(16384 + 4096, 4) + b"tail"))
    assert struct.unpack_from("<I", r, 16)[0] == 4
    assert img.stat().st_size == 16384 + 4096 + 4
    assert img.read_bytes()[16384:16384 + 4096] == bytes(4096)


def test_stopped_export_answers_enotconn_and_leaves(served):
    start, _img = served
    send, exp = start()
    exp.stopped = True
    assert status(send(request(C.GETATTR, 1, bytes(16)))) == (errno.ENOTCONN, 1)
