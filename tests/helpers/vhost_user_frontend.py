"""A small vhost-user frontend ("master") for virtio-blk, written for tests.

It plays the role QEMU's `vhost-user-blk` device plays: it connects to a backend's unix
socket, does the handshake, shares "guest memory" (one memfd mapped MAP_SHARED here and
passed with SET_MEM_TABLE), sets up split virtqueues in that memory and submits virtio-blk
requests through them (kick eventfd in, call eventfd out).

Written from the vhost-user specification (docs/interop/vhost-user.rst) and the virtio 1.x
specification (split virtqueues, virtio-blk): wire formats and numbers only.

Guest-physical addresses (what descriptors carry) and frontend "userspace addresses" (what
SET_VRING_ADDR carries) are deliberately different (GPA_BASE, UVA_BASE) so a backend that
confuses the two fails.

Memory ordering: CPython gives no fence primitive; acquiring and releasing a threading.Lock
is an atomic read-modify-write (a full barrier on x86), used where the virtio spec asks the
driver for a full barrier (publish avail idx, then read avail_event / re-check used idx).
"""
from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time

# --- vhost-user requests (frontend -> backend) -------------------------------------------
NONE = 0
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
GET_MAX_MEM_SLOTS = 36

# header flags
VERSION = 0x1
F_REPLY = 0x4
F_NEED_REPLY = 0x8

# protocol features
PF_MQ = 0
PF_LOG_SHMFD = 1
PF_RARP = 2
PF_REPLY_ACK = 3
PF_MTU = 4
PF_BACKEND_REQ = 5
PF_CROSS_ENDIAN = 6
PF_CRYPTO_SESSION = 7
PF_PAGEFAULT = 8
PF_CONFIG = 9
PF_BACKEND_SEND_FD = 10
PF_HOST_NOTIFIER = 11
PF_INFLIGHT_SHMFD = 12
PF_RESET_DEVICE = 13
PF_INBAND_NOTIFICATIONS = 14
PF_CONFIGURE_MEM_SLOTS = 15
PF_STATUS = 16

# virtio / virtio-blk feature bits
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14
BLK_F_SECURE_ERASE = 16
F_NOTIFY_ON_EMPTY = 24
F_LOG_ALL = 26
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30
F_VERSION_1 = 32
F_IOMMU_PLATFORM = 33
F_RING_PACKED = 34

# the bits this frontend can drive (what it acks when offered)
SUPPORTED_FEATURES = sum(1 << b for b in (
    BLK_F_SIZE_MAX, BLK_F_SEG_MAX, BLK_F_GEOMETRY, BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_FLUSH,
    BLK_F_TOPOLOGY, BLK_F_CONFIG_WCE, BLK_F_MQ, BLK_F_DISCARD, BLK_F_WRITE_ZEROES,
    F_RING_INDIRECT_DESC, F_RING_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1))

# virtio-blk request types and status
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
WZ_UNMAP = 1
GET_ID_LEN = 20

# split virtqueue descriptor flags
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
USED_F_NO_NOTIFY = 1

CONFIG_SIZE = 60            # struct virtio_blk_config up to write_zeroes_may_unmap + pad
CONFIG_FIELDS = (           # name, offset, struct format
    ("capacity", 0, "<Q"), ("size_max", 8, "<I"), ("seg_max", 12, "<I"),
    ("cylinders", 16, "<H"), ("heads", 18, "<B"), ("sectors", 19, "<B"),
    ("blk_size", 20, "<I"), ("physical_block_exp", 24, "<B"), ("alignment_offset", 25, "<B"),
    ("min_io_size", 26, "<H"), ("opt_io_size", 28, "<I"), ("wce", 32, "<B"),
    ("num_queues", 34, "<H"), ("max_discard_sectors", 36, "<I"),
    ("max_discard_seg", 40, "<I"), ("discard_sector_alignment", 44, "<I"),
    ("max_write_zeroes_sectors", 48, "<I"), ("max_write_zeroes_seg", 52, "<I"),
    ("write_zeroes_may_unmap", 56, "<B"))
WCE_OFFSET = 32

GPA_BASE = 0x1_0000_0000            # guest-physical address of the memory region
UVA_BASE = 0x7f3a_0000_0000         # the frontend "userspace address" of the same region
MiB = 1024 * 1024
HDR = struct.Struct("<III")
DEFAULT_TIMEOUT = 5.0


def parse_config(data: bytes) -> dict:
    """struct virtio_blk_config (little-endian, VERSION_1) -> {field: value}."""
    out = {}
    for name, off, fmt in CONFIG_FIELDS:
        if off + struct.calcsize(fmt) <= len(data):
            out[name] = struct.unpack_from(fmt, data, off)[0]
    return out


def bits(mask: int) -> list[int]:
    return [i for i in range(64) if mask >> i & 1]


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event(): notify if `event` lies in (old, new]."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class VhostUserError(RuntimeError):
    pass


class Request:
    """One virtio-blk request in flight (or done): filled in by the Frontend."""

    def __init__(self, queue: int, rtype: int, sector: int, out: list[bytes], in_len: int,
                 split: int, indirect: bool, ioprio: int = 0, status_len: int = 1):
        self.queue, self.type, self.sector = queue, rtype, sector
        self.out, self.in_len, self.split, self.indirect = out, in_len, split, indirect
        self.ioprio = ioprio
        self.status_len = status_len
        self.head: int | None = None
        self.in_segs: list[tuple[int, int]] = []   # (offset in memory, length) writable data
        self.status_off = 0
        self.status: int | None = None
        self.data: bytes = b""
        self.used_len: int | None = None

    def result(self):
        return self.status, self.data, self.used_len


class Queue:
    def __init__(self, index: int, size: int, base: int):
        self.index, self.size = index, size
        self.desc = base                            # offsets inside the memory region
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        self.avail_idx = 0          # next avail index the driver publishes
        self.last_used = 0          # next used index the driver consumes
        self.next_desc = 0          # descriptor allocation (freed when idle)
        self.inflight: dict[int, Request] = {}
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks = 0
        self.calls = 0              # call eventfd signals consumed (Frontend.take_calls)

    def close(self) -> None:
        for fd in (self.kick, self.call):
            try:
                os.close(fd)
            except OSError:
                pass


class Frontend:
    """A vhost-user-blk frontend on `path`; handshake and queue setup in the constructor
    (unless handshake=False: then only connect(), for fault tests driving messages by hand)."""

    def __init__(self, path: str, mem_size: int = 16 * MiB, num_queues: int = 1,
                 queue_size: int = 128, event_idx: bool = True, indirect: bool = True,
                 reply_ack: bool = True, inflight: bool = False, handshake: bool = True,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_TIMEOUT,
                 features: int | None = None, mmap_offset: int = 0):
        self.path = path
        self.timeout = timeout
        self.mem_size = mem_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.want_reply_ack = reply_ack
        self.want_inflight = inflight
        self.want_features = features
        self._fence_lock = threading.Lock()
        self.sock = self._connect(path, connect_timeout)
        self.memfd = os.memfd_create("vhu-guest-mem", os.MFD_CLOEXEC)
        # with mmap_offset, the region starts that far into the fd (the backend must add
        # the region's mmap_offset to its mapping)
        self.mmap_offset = mmap_offset
        os.ftruncate(self.memfd, mem_size + mmap_offset)
        self.mem = mmap.mmap(self.memfd, mem_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
        self.mem16 = memoryview(self.mem).cast("H")
        self.queues: list[Queue] = []
        self.features = 0
        self.offered_features = None
        self.offered_protocol = None
        self.protocol = 0
        self.queue_num = None
        self.config_bytes = b""
        self.closed = False
        self._buf_start = 0
        self._buf_next = 0
        if handshake:
            try:
                self.handshake()
            except BaseException:
                self.close()
                raise

    # --- connection -------------------------------------------------------------------
    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        """connect(), retrying while the listener refuses (a backlog full while the backend
        tears down its previous client), bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return s
            except (ConnectionRefusedError, FileNotFoundError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                select.select([], [], [], 0.005)   # bounded back-off, not synchronisation

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        finally:
            for q in self.queues:
                q.close()
            self.mem16.release()
            try:
                self.mem.close()
            except BufferError:
                pass
            os.close(self.memfd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- raw messages -----------------------------------------------------------------
    def send_raw(self, data: bytes, fds=()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send_msg(self, request: int, payload: bytes = b"", flags: int = VERSION,
                 fds=()) -> None:
        self.send_raw(HDR.pack(request, flags, len(payload)) + payload, fds)

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"vhost-user reply not received within {self.timeout}s")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"backend closed the connection ({len(buf)}/{n} bytes)")
            buf += chunk
        return buf

    def recv_reply(self, timeout: float | None = None) -> tuple[int, int, bytes]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        request, flags, size = HDR.unpack(self._recv_exact(HDR.size, deadline))
        payload = self._recv_exact(size, deadline) if size else b""
        return request, flags, payload

    def wait_closed(self, timeout: float | None = None) -> bool:
        """True if the backend closes the connection (EOF or reset) within the timeout;
        anything it sends before is discarded."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                try:
                    if not self.sock.recv(4096):
                        return True
                except ConnectionResetError:
                    return True

    def call(self, request: int, payload: bytes = b"", fds=()) -> bytes:
        """A request that has a reply: send, check the reply header, return its payload."""
        self.send_msg(request, payload, fds=fds)
        req, flags, reply = self.recv_reply()
        if req != request or not flags & F_REPLY:
            raise VhostUserError(f"reply to {request}: request {req} flags {flags:#x}")
        return reply

    def u64_call(self, request: int) -> int:
        reply = self.call(request)
        if len(reply) != 8:
            raise VhostUserError(f"reply to {request}: {len(reply)}-byte payload")
        return struct.unpack("<Q", reply)[0]

    def set(self, request: int, payload: bytes = b"", fds=(), ack: bool | None = None) -> int | None:
        """A request without a reply; with REPLY_ACK negotiated (or ack=True) asks for the
        ack and returns its u64 (0 = success); raises VhostUserError on non-zero."""
        if ack is None:
            ack = bool(self.protocol >> PF_REPLY_ACK & 1)
        self.send_msg(request, payload, VERSION | (F_NEED_REPLY if ack else 0), fds)
        if not ack:
            return None
        req, flags, reply = self.recv_reply()
        if req != request or len(reply) != 8:
            raise VhostUserError(f"ack of {request}: request {req} payload {reply!r}")
        value = struct.unpack("<Q", reply)[0]
        if value:
            raise VhostUserError(f"request {request} acked with {value}")
        return value

    # --- the messages -----------------------------------------------------------------
    def get_features(self) -> int:
        return self.u64_call(GET_FEATURES)

    def get_protocol_features(self) -> int:
        return self.u64_call(GET_PROTOCOL_FEATURES)

    def get_queue_num(self) -> int:
        return self.u64_call(GET_QUEUE_NUM)

    def get_config(self, size: int = CONFIG_SIZE, offset: int = 0, flags: int = 0) -> bytes:
        """GET_CONFIG; returns the config bytes (b"" when the backend answers size 0, its
        way of refusing)."""
        reply = self.call(GET_CONFIG, struct.pack("<III", offset, size, flags) + bytes(size))
        if len(reply) < 12:
            return b""
        _off, rsize, _flags = struct.unpack_from("<III", reply)
        return reply[12:12 + rsize]

    def set_config(self, offset: int, data: bytes, flags: int = 0, ack: bool | None = None):
        return self.set(SET_CONFIG, struct.pack("<III", offset, len(data), flags) + data,
                        ack=ack)

    def get_vring_base(self, index: int) -> int:
        reply = self.call(GET_VRING_BASE, struct.pack("<II", index, 0))
        idx, num = struct.unpack("<II", reply)
        if idx != index:
            raise VhostUserError(f"GET_VRING_BASE reply for vring {idx}, asked {index}")
        return num

    def mem_table_payload(self, regions) -> bytes:
        """regions: [(gpa, size, uva, mmap_offset)]."""
        p = struct.pack("<II", len(regions), 0)
        for gpa, size, uva, off in regions:
            p += struct.pack("<QQQQ", gpa, size, uva, off)
        return p

    def handshake(self) -> None:
        """QEMU vhost-user-blk's order: features, protocol features, queue num, owner,
        config, then (at device start) SET_FEATURES, the memory table and the vrings."""
        self.offered_features = self.get_features()
        if self.offered_features >> F_PROTOCOL_FEATURES & 1:
            self.offered_protocol = self.get_protocol_features()
            want = (1 << PF_CONFIG) | (1 << PF_MQ)
            if self.want_reply_ack:
                want |= 1 << PF_REPLY_ACK
            if self.want_inflight:
                want |= 1 << PF_INFLIGHT_SHMFD
            proto = self.offered_protocol & want
            self.set(SET_PROTOCOL_FEATURES, struct.pack("<Q", proto), ack=False)
            self.protocol = proto
            if proto >> PF_MQ & 1:
                self.queue_num = self.get_queue_num()
                if self.num_queues > self.queue_num:
                    raise VhostUserError(f"backend has {self.queue_num} queues, "
                                         f"{self.num_queues} wanted")
        self.set(SET_OWNER)
        if self.protocol >> PF_CONFIG & 1:
            self.config_bytes = self.get_config(CONFIG_SIZE)
        if self.want_features is not None:
            feats = self.want_features
        else:
            feats = self.offered_features & SUPPORTED_FEATURES
            if not self.want_event_idx:
                feats &= ~(1 << F_RING_EVENT_IDX)
            if not self.want_indirect:
                feats &= ~(1 << F_RING_INDIRECT_DESC)
        self.set(SET_FEATURES, struct.pack("<Q", feats))
        self.features = feats
        self.set(SET_MEM_TABLE, self.mem_table_payload(
            [(GPA_BASE, self.mem_size, UVA_BASE, self.mmap_offset)]), fds=[self.memfd])
        base = 0
        for i in range(self.num_queues):
            q = Queue(i, self.queue_size, base)
            base = (q.end + 4095) & ~4095
            self.queues.append(q)
        self._buf_start = self._buf_next = base
        for q in self.queues:
            self.setup_vring(q)

    def setup_vring(self, q: Queue) -> None:
        self.set(SET_VRING_NUM, struct.pack("<II", q.index, q.size))
        self.set(SET_VRING_BASE, struct.pack("<II", q.index, 0))
        self.set(SET_VRING_ADDR, struct.pack("<IIQQQQ", q.index, 0, UVA_BASE + q.desc,
                                             UVA_BASE + q.used, UVA_BASE + q.avail, 0))
        self.set(SET_VRING_KICK, struct.pack("<Q", q.index), fds=[q.kick])
        self.set(SET_VRING_CALL, struct.pack("<Q", q.index), fds=[q.call])
        if self.features >> F_PROTOCOL_FEATURES & 1:
            self.set(SET_VRING_ENABLE, struct.pack("<II", q.index, 1))

    def stop_vring(self, index: int) -> int:
        """QEMU's device stop for one queue: GET_VRING_BASE (the backend stops the ring and
        answers where it stopped).  Returns that index."""
        return self.get_vring_base(index)

    def restart_vring(self, index: int, base: int | None = None) -> None:
        """QEMU's device start after a stop: the ring set up again from `base` (default: the
        driver's avail index, all requests consumed) with fresh kick/call eventfds."""
        q = self.queues[index]
        if q.inflight:
            raise VhostUserError(f"queue {index}: {len(q.inflight)} requests still in flight")
        q.close()
        q.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        q.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        base = q.avail_idx if base is None else base
        self.set(SET_VRING_NUM, struct.pack("<II", q.index, q.size))
        self.set(SET_VRING_BASE, struct.pack("<II", q.index, base))
        self.set(SET_VRING_ADDR, struct.pack("<IIQQQQ", q.index, 0, UVA_BASE + q.desc,
                                             UVA_BASE + q.used, UVA_BASE + q.avail, 0))
        self.set(SET_VRING_KICK, struct.pack("<Q", q.index), fds=[q.kick])
        self.set(SET_VRING_CALL, struct.pack("<Q", q.index), fds=[q.call])
        if self.features >> F_PROTOCOL_FEATURES & 1:
            self.set(SET_VRING_ENABLE, struct.pack("<II", q.index, 1))

    @property
    def config(self) -> dict:
        return parse_config(self.config_bytes)

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> F_RING_EVENT_IDX & 1)

    @property
    def indirect(self) -> bool:
        return bool(self.features >> F_RING_INDIRECT_DESC & 1)

    # --- guest memory -----------------------------------------------------------------
    def _fence(self) -> None:
        with self._fence_lock:
            pass

    def alloc(self, n: int, align: int = 16) -> int:
        off = (self._buf_next + align - 1) & ~(align - 1)
        if off + n > self.mem_size:
            raise MemoryError("guest memory exhausted (too many requests in flight)")
        self._buf_next = off + n
        return off

    def _maybe_reset_alloc(self) -> None:
        if not any(q.inflight for q in self.queues):
            self._buf_next = self._buf_start
            for q in self.queues:
                q.next_desc = 0

    def _store_u16(self, off: int, value: int) -> None:
        """One 16-bit store, for the fields the backend reads while we write them
        (struct.pack_into clears a field before writing it: a reader could see 0)."""
        self.mem16[off // 2] = value

    def _u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.mem, off)[0]

    def _put_desc(self, table_off: int, i: int, off: int, length: int, flags: int,
                  nxt: int) -> None:
        struct.pack_into("<QIHH", self.mem, table_off + 16 * i, GPA_BASE + off, length,
                         flags, nxt)

    # --- requests ---------------------------------------------------------------------
    def _build(self, req: Request) -> None:
        """Lay out one request's buffers and descriptors; publish it in the avail ring."""
        q = self.queues[req.queue]
        segs: list[tuple[int, int, int]] = []     # (offset, length, flags)
        hdr = self.alloc(16)
        struct.pack_into("<IIQ", self.mem, hdr, req.type, req.ioprio, req.sector)
        segs.append((hdr, 16, 0))
        for b in req.out:
            off = self.alloc(max(1, len(b)))
            self.mem[off:off + len(b)] = b
            segs.append((off, len(b), 0))
        if req.in_len:
            sizes = _split(req.in_len, req.split)
            for n in sizes:
                off = self.alloc(n)
                self.mem[off:off + n] = bytes(n)
                segs.append((off, n, DESC_F_WRITE))
                req.in_segs.append((off, n))
        st = self.alloc(req.status_len)
        self.mem[st:st + req.status_len] = b"\xff" * req.status_len
        segs.append((st, req.status_len, DESC_F_WRITE))
        req.status_off = st + req.status_len - 1
        if req.indirect:
            table = self.alloc(16 * len(segs))
            for i, (off, n, fl) in enumerate(segs):
                last = i == len(segs) - 1
                self._put_desc(table, i, off, n, fl | (0 if last else DESC_F_NEXT),
                               0 if last else i + 1)
            head = self._alloc_desc(q, 1)[0]
            self._put_desc(q.desc, head, table, 16 * len(segs), DESC_F_INDIRECT, 0)
        else:
            ids = self._alloc_desc(q, len(segs))
            for i, (off, n, fl) in enumerate(segs):
                last = i == len(segs) - 1
                self._put_desc(q.desc, ids[i], off, n, fl | (0 if last else DESC_F_NEXT),
                               0 if last else ids[i + 1])
            head = ids[0]
        req.head = head
        q.inflight[head] = req
        struct.pack_into("<H", self.mem, q.avail + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF

    def _alloc_desc(self, q: Queue, n: int) -> list[int]:
        if q.next_desc + n > q.size:
            raise VhostUserError(f"queue {q.index}: out of descriptors")
        ids = list(range(q.next_desc, q.next_desc + n))
        q.next_desc += n
        return ids

    def _publish_and_kick(self, q: Queue, old_idx: int) -> None:
        self._store_u16(q.avail + 2, q.avail_idx)                     # avail->idx
        self._fence()
        if self.event_idx:
            avail_event = self._u16(q.used + 4 + 8 * q.size)
            if not need_event(avail_event, q.avail_idx, old_idx):
                return
        elif self._u16(q.used) & USED_F_NO_NOTIFY:
            return
        q.kicks += 1
        os.eventfd_write(q.kick, 1)

    def _reap(self, q: Queue) -> list[Request]:
        done = []
        used_idx = self._u16(q.used + 2)
        while q.last_used != used_idx:
            ent = q.used + 4 + 8 * (q.last_used % q.size)
            head, length = struct.unpack_from("<II", self.mem, ent)
            q.last_used = (q.last_used + 1) & 0xFFFF
            req = q.inflight.pop(head, None)
            if req is None:
                raise VhostUserError(f"queue {q.index}: used id {head} not in flight")
            req.used_len = length
            req.status = self.mem[req.status_off]
            req.data = b"".join(bytes(self.mem[o:o + n]) for o, n in req.in_segs)
            done.append(req)
        return done

    def wait(self, reqs: list[Request], timeout: float | None = None) -> None:
        """Wait (poll on the call eventfds, with a deadline) until all `reqs` are used."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = {id(r) for r in reqs if r.status is None or r.used_len is None}
        queues = {r.queue for r in reqs}
        while True:
            for qi in queues:
                for r in self._reap(self.queues[qi]):
                    pending.discard(id(r))
            if not pending:
                break
            armed = False
            for qi in queues:     # ask for an interrupt at the next used entry
                q = self.queues[qi]
                if self.event_idx:
                    self._store_u16(q.avail + 4 + 2 * q.size, q.last_used)   # used_event
            self._fence()
            for qi in queues:
                q = self.queues[qi]
                if self._u16(q.used + 2) != q.last_used:
                    armed = True
            if armed:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} request(s) not completed within "
                                   f"{timeout}s")
            by_fd = {self.queues[qi].call: self.queues[qi] for qi in queues}
            r, _, _ = select.select(list(by_fd), [], [], left)
            for fd in r:
                self.take_calls(by_fd[fd])
        self._maybe_reset_alloc()

    def take_calls(self, q: Queue, timeout: float = 0.0) -> int:
        """Read q's call eventfd (waiting up to `timeout` for it); counts into q.calls."""
        if timeout and not select.select([q.call], [], [], timeout)[0]:
            return 0
        try:
            n = os.eventfd_read(q.call)
        except BlockingIOError:
            return 0
        q.calls += n
        return n

    def request(self, queue: int, rtype: int, sector: int = 0, out=(), in_len: int = 0,
                split: int = 1, indirect: bool = False, ioprio: int = 0,
                status_len: int = 1) -> Request:
        if isinstance(out, (bytes, bytearray)):
            out = [bytes(out)]
        out = list(out)
        if rtype == T_OUT and split > 1 and len(out) == 1:
            out = [out[0][a:a + n] for a, n in _offsets(len(out[0]), split)]
        return Request(queue, rtype, sector, out, in_len, split, indirect, ioprio, status_len)

    def submit_many(self, reqs: list[Request], timeout: float | None = None) -> list[Request]:
        """Put all `reqs` in flight (avail idx published once per queue, one kick per queue
        if EVENT_IDX allows), then wait for all of them."""
        old = {}
        for r in reqs:
            q = self.queues[r.queue]
            old.setdefault(r.queue, q.avail_idx)
            self._build(r)
        for qi, old_idx in old.items():
            self._publish_and_kick(self.queues[qi], old_idx)
        self.wait(reqs, timeout)
        return reqs

    def submit(self, queue: int, rtype: int, sector: int = 0, out=(), in_len: int = 0,
               split: int = 1, indirect: bool = False, timeout: float | None = None, **kw):
        """One request: -> (status, data read, used_len)."""
        r = self.request(queue, rtype, sector, out, in_len, split, indirect, **kw)
        self.submit_many([r], timeout)
        return r.result()

    # --- helpers ----------------------------------------------------------------------
    def read(self, sector: int, nbytes: int, queue: int = 0, **kw):
        return self.submit(queue, T_IN, sector, in_len=nbytes, **kw)

    def write(self, sector: int, data: bytes, queue: int = 0, **kw):
        return self.submit(queue, T_OUT, sector, out=data, **kw)

    def flush(self, queue: int = 0, **kw):
        return self.submit(queue, T_FLUSH, 0, **kw)

    def get_id(self, queue: int = 0, in_len: int = GET_ID_LEN, **kw):
        return self.submit(queue, T_GET_ID, 0, in_len=in_len, **kw)

    @staticmethod
    def segment(sector: int, n: int, flags: int = 0) -> bytes:
        return struct.pack("<QII", sector, n, flags)

    def discard(self, sector: int, n: int, queue: int = 0, flags: int = 0, **kw):
        return self.submit(queue, T_DISCARD, 0, out=self.segment(sector, n, flags), **kw)

    def write_zeroes(self, sector: int, n: int, unmap: bool = False, queue: int = 0, **kw):
        return self.submit(queue, T_WRITE_ZEROES, 0,
                           out=self.segment(sector, n, WZ_UNMAP if unmap else 0), **kw)


def _offsets(total: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, total)) if total else 1
    base, extra = divmod(total, parts)
    out, a = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((a, n))
        a += n
    return out


def _split(total: int, parts: int) -> list[int]:
    return [n for _, n in _offsets(total, parts) if n]
