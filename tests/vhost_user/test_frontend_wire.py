"""The test frontend itself, against a scripted backend in a thread (a real unix socket, real
fds): the handshake's message order and payloads are QEMU vhost-user-blk's, the memory table
fd maps the frontend's guest memory, and the vring addresses are userspace addresses."""
from __future__ import annotations

import mmap
import os
import socket
import struct
import threading

from helpers.vhost_user_frontend import (
    F_NEED_REPLY, GET_CONFIG, GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GPA_BASE,
    HDR, PF_CONFIG, PF_MQ, PF_REPLY_ACK, SET_FEATURES, SET_MEM_TABLE, SET_OWNER,
    SET_PROTOCOL_FEATURES, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL, SET_VRING_ENABLE,
    SET_VRING_KICK, SET_VRING_NUM, UVA_BASE, VERSION, Frontend, need_event, parse_config)

FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 12) | (1 << 6)
PROTOCOL = (1 << PF_MQ) | (1 << PF_CONFIG) | (1 << PF_REPLY_ACK) | (1 << 12)


class ScriptedBackend(threading.Thread):
    """Accepts one connection, answers the handshake, records (request, flags, payload,
    nfds) and maps the memory table fd."""

    def __init__(self, path: str, queues: int = 2):
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.queues = queues
        self.log: list[tuple[int, int, bytes, int]] = []
        self.mapped: mmap.mmap | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                self.serve(conn)
        except BaseException as e:      # reported by the test
            self.error = e

    def serve(self, conn: socket.socket) -> None:
        while True:
            hdr, fds, _flags, _addr = socket.recv_fds(conn, HDR.size, 16)
            if not hdr:
                return
            request, flags, size = HDR.unpack(hdr)
            payload = b""
            while len(payload) < size:
                payload += conn.recv(size - len(payload))
            self.log.append((request, flags, payload, len(fds)))
            if request == SET_MEM_TABLE:
                _n, _pad, gpa, msize, uva, off = struct.unpack_from("<IIQQQQ", payload)
                self.mapped = mmap.mmap(fds[0], msize, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
            for fd in fds:
                os.close(fd)
            reply = None
            if request == GET_FEATURES:
                reply = struct.pack("<Q", FEATURES)
            elif request == GET_PROTOCOL_FEATURES:
                reply = struct.pack("<Q", PROTOCOL)
            elif request == GET_QUEUE_NUM:
                reply = struct.pack("<Q", self.queues)
            elif request == GET_CONFIG:
                cfg = bytearray(60)
                struct.pack_into("<Q", cfg, 0, 1234)
                struct.pack_into("<H", cfg, 34, self.queues)
                reply = payload[:12] + bytes(cfg)
            elif flags & F_NEED_REPLY:
                reply = struct.pack("<Q", 0)
            if reply is not None:
                conn.sendall(HDR.pack(request, VERSION | 0x4, len(reply)) + reply)


def test_handshake_order_and_payloads(tmp_path):
    path = str(tmp_path / "b.sock")
    b = ScriptedBackend(path, queues=2)
    b.start()
    f = Frontend(path, num_queues=2, mem_size=4 * 1024 * 1024)
    try:
        assert f.config == {**parse_config(bytes(60)), "capacity": 1234, "num_queues": 2}
        f.close()
        b.join(5)
        assert b.error is None, b.error
        order = [r for r, *_ in b.log]
        per_queue = [SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
                     SET_VRING_CALL, SET_VRING_ENABLE]
        assert order == [GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
                         GET_QUEUE_NUM, SET_OWNER, GET_CONFIG, SET_FEATURES, SET_MEM_TABLE,
                         *per_queue, *per_queue]
        log = {r: (fl, p, n) for r, fl, p, n in b.log}
        # INFLIGHT_SHMFD offered but not asked for; REPLY_ACK used from then on
        assert struct.unpack("<Q", log[SET_PROTOCOL_FEATURES][1])[0] == \
            (1 << PF_MQ) | (1 << PF_CONFIG) | (1 << PF_REPLY_ACK)
        assert log[SET_PROTOCOL_FEATURES][0] == VERSION
        assert log[SET_OWNER][0] == VERSION | F_NEED_REPLY
        assert struct.unpack("<Q", log[SET_FEATURES][1])[0] == FEATURES
        fl, p, nfds = log[SET_MEM_TABLE]
        assert nfds == 1
        assert struct.unpack("<IIQQQQ", p) == (1, 0, GPA_BASE, 4 * 1024 * 1024, UVA_BASE, 0)
        addrs = [struct.unpack("<IIQQQQ", p) for r, _fl, p, _n in b.log if r == SET_VRING_ADDR]
        for i, (idx, flags, desc, used, avail, logaddr) in enumerate(addrs):
            q = f.queues[i]
            assert (idx, flags, logaddr) == (i, 0, 0)
            assert (desc, used, avail) == (UVA_BASE + q.desc, UVA_BASE + q.used,
                                           UVA_BASE + q.avail)
            assert desc % 16 == 0 and avail % 2 == 0 and used % 4 == 0
        assert [n for r, _fl, _p, n in b.log if r in (SET_VRING_KICK, SET_VRING_CALL)] == \
            [1] * 4
    finally:
        f.close()
        b.listener.close()


def test_memory_is_shared(tmp_path):
    """The fd passed with SET_MEM_TABLE maps the frontend's guest memory (both ways)."""
    path = str(tmp_path / "b.sock")
    b = ScriptedBackend(path, queues=1)
    b.start()
    f = Frontend(path, mem_size=1024 * 1024, mmap_offset=8192)
    try:
        assert b.mapped is not None     # SET_MEM_TABLE was acked (REPLY_ACK): mapped
        b.mapped[4096:4100] = b"back"
        assert f.mem[4096:4100] == b"back"
        f.mem[100:104] = b"frnt"
        assert b.mapped[100:104] == b"frnt"
    finally:
        f.close()
        b.join(5)
        b.listener.close()
        if b.mapped is not None:
            b.mapped.close()


def test_need_event():
    """virtio's vring_need_event, including 16-bit wrap."""
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(2, 3, 0)
    assert need_event(0xFFFF, 0, 0xFFFE)
    assert not need_event(1, 0, 0xFFFE)
