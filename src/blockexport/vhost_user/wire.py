"""vhost-user messages on the wire: the header, the payload structs, and a framing decoder.

A message is a 12-byte little-endian header (request, flags, payload size) and its payload;
file descriptors travel beside it as ``SCM_RIGHTS`` ancillary data.  :class:`Decoder` takes
bytes and fds as they arrive (``feed``) and returns whole :class:`Message` values
(``next_message``), or :data:`NEED_DATA`.  Fds belong to the message being assembled when
they are fed, the one the fed bytes start in (a frontend sends a message's fds with its first
byte), even when several messages are fed before they are taken.

Read at most :meth:`Decoder.bytes_missing` bytes per ``recvmsg``: Linux ends a read after
the bytes that carried fds but not before them, so a longer read can return the tail of one
message and the next message whole, with that next message's fds.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from blockexport.vhost_user import constants as C
from blockexport.vhost_user.errors import VhostUserProtocolError

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
#: vring state: index, num (SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE)
VRING_STATE = struct.Struct("<II")
#: vring address: index, flags, descriptor / used / available ring addresses (frontend
#: virtual addresses), log address
VRING_ADDR = struct.Struct("<IIQQQQ")
#: memory table head: number of regions, padding
MEM_TABLE_HEAD = struct.Struct("<II")
#: a memory region: guest physical address, size, frontend virtual address, offset in the fd
MEM_REGION = struct.Struct("<QQQQ")
#: config space request: offset, size, flags (then ``size`` bytes of config)
CONFIG_HEAD = struct.Struct("<III")
#: inflight description: mmap size, mmap offset, number of queues, queue size
INFLIGHT = struct.Struct("<QQHH")

NEED_DATA = object()


class Message(NamedTuple):
    """One frontend message: its request code, flags, payload and the fds that came with it."""
    request: int
    flags: int
    payload: bytes
    fds: tuple

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & C.FLAG_NEED_REPLY)


class MemRegion(NamedTuple):
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def pack_message(request: int, payload: bytes = b"", reply: bool = True) -> bytes:
    """A whole message: header (version 1, the reply flag) and payload."""
    flags = C.VERSION | (C.FLAG_REPLY if reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def pack_u64(request: int, value: int) -> bytes:
    return pack_message(request, U64.pack(value))


def pack_vring_state(request: int, index: int, num: int) -> bytes:
    return pack_message(request, VRING_STATE.pack(index, num))


def pack_config(request: int, offset: int, flags: int, data: bytes) -> bytes:
    return pack_message(request, CONFIG_HEAD.pack(offset, len(data), flags) + data)


def parse_u64(msg: Message) -> int:
    _need(msg, U64.size)
    return U64.unpack_from(msg.payload)[0]


def parse_vring_state(msg: Message) -> tuple[int, int]:
    _need(msg, VRING_STATE.size)
    return VRING_STATE.unpack_from(msg.payload)


def parse_vring_addr(msg: Message) -> tuple[int, int, int, int, int, int]:
    """(index, flags, desc, used, avail, log) addresses."""
    _need(msg, VRING_ADDR.size)
    return VRING_ADDR.unpack_from(msg.payload)


def parse_mem_table(msg: Message) -> tuple[MemRegion, ...]:
    _need(msg, MEM_TABLE_HEAD.size)
    count = MEM_TABLE_HEAD.unpack_from(msg.payload)[0]
    if count == 0 or count > C.MAX_MEM_REGIONS:
        raise VhostUserProtocolError("memory table with %d regions (1 to %d allowed)"
                                     % (count, C.MAX_MEM_REGIONS))
    _need(msg, MEM_TABLE_HEAD.size + count * MEM_REGION.size)
    return tuple(MemRegion(*MEM_REGION.unpack_from(msg.payload, MEM_TABLE_HEAD.size + i
                                                   * MEM_REGION.size))
                 for i in range(count))


def parse_config(msg: Message) -> tuple[int, int, int, bytes]:
    """(offset, size, flags, data) of GET_CONFIG / SET_CONFIG."""
    _need(msg, CONFIG_HEAD.size)
    offset, size, flags = CONFIG_HEAD.unpack_from(msg.payload)
    if size > C.MAX_CONFIG_SIZE:
        raise VhostUserProtocolError("config space request of %d bytes" % size)
    _need(msg, CONFIG_HEAD.size + size)
    return offset, size, flags, msg.payload[CONFIG_HEAD.size:CONFIG_HEAD.size + size]


def _need(msg: Message, size: int) -> None:
    if len(msg.payload) < size:
        raise VhostUserProtocolError("%s payload of %d bytes, %d expected"
                                     % (request_name(msg.request), len(msg.payload), size))


def request_name(code: int) -> str:
    try:
        return C.Request(code).name
    except ValueError:
        return "request %d" % code


class Decoder:
    """Frames the frontend's byte stream into messages (sans-IO)."""

    def __init__(self):
        self._buf = bytearray()
        #: the stream offset of ``_buf[0]``
        self._pos = 0
        #: (stream offset of the first byte fed with them, fds), in arrival order
        self._fds: list[tuple[int, tuple]] = []
        #: set when the stream can't go on (a bad header); fds are then the caller's to close
        self.broken = False

    def feed(self, data: bytes, fds=()) -> None:
        if fds:
            self._fds.append((self._pos + len(self._buf), tuple(fds)))
        self._buf += data

    def bytes_missing(self) -> int:
        """Bytes still needed to complete the current message: the header first, then the
        payload it announces (call :meth:`next_message` first: it refuses bad headers)."""
        if len(self._buf) < C.HEADER_SIZE:
            return C.HEADER_SIZE - len(self._buf)
        size = HEADER.unpack_from(self._buf)[2]
        return max(0, C.HEADER_SIZE + size - len(self._buf))

    def next_message(self):
        """The next whole message, or :data:`NEED_DATA`.  Raises
        :class:`VhostUserProtocolError` for a header no frontend sends (wrong version, a
        reply flag, an oversized payload)."""
        if len(self._buf) < C.HEADER_SIZE:
            return NEED_DATA
        request, flags, size = HEADER.unpack_from(self._buf)
        if flags & C.VERSION_MASK != C.VERSION:
            self.broken = True
            raise VhostUserProtocolError("message with protocol version %d (flags 0x%x)"
                                         % (flags & C.VERSION_MASK, flags))
        if flags & C.FLAG_REPLY:
            self.broken = True
            raise VhostUserProtocolError("%s carries the reply flag" % request_name(request))
        if size > C.MAX_PAYLOAD:
            self.broken = True
            raise VhostUserProtocolError("%s with a %d-byte payload (at most %d)"
                                         % (request_name(request), size, C.MAX_PAYLOAD))
        end = C.HEADER_SIZE + size
        if len(self._buf) < end:
            return NEED_DATA
        payload = bytes(self._buf[C.HEADER_SIZE:end])
        del self._buf[:end]
        self._pos += end
        fds = ()
        while self._fds and self._fds[0][0] < self._pos:
            fds += self._fds.pop(0)[1]
        return Message(request, flags, payload, fds)

    def take_fds(self) -> list[int]:
        """The fds received and not yet handed out in a message (to close them)."""
        fds = [fd for _pos, group in self._fds for fd in group]
        self._fds = []
        return fds
