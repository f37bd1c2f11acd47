"""Transmission phase of an NBD server, sans-IO: request checks and reply framing.

The data path (``exports/nbd_conn.py``) reads a 28-byte request header, asks
:meth:`Transmission.check` whether QEMU would accept it, performs the I/O and frames the
reply with the functions here.  Nothing in this module touches a socket or a file.

This is the hottest Python in the project: every request passes ``check`` and one of the
framing functions, so they use precompiled structs, plain ints and no per-request objects.
"""
from array import array
import sys

from blockexport.nbd import constants as C
from blockexport.nbd import wire

_REQ_UNPACK = wire.REQUEST.unpack_from
_SIMPLE = wire.SIMPLE_REPLY.pack
_CHUNK = wire.STRUCTURED_REPLY.pack
_DATA_CHUNK = wire.OFFSET_DATA_CHUNK.pack
_HOLE_CHUNK = wire.OFFSET_HOLE_CHUNK.pack
_ERROR_CHUNK = wire.ERROR_CHUNK.pack
_BS_HEADER = wire.BLOCK_STATUS_HEADER.pack

SIMPLE_MAGIC = C.SIMPLE_REPLY_MAGIC
SR_MAGIC = C.STRUCTURED_REPLY_MAGIC
DONE = C.REPLY_FLAG_DONE
MAX_BUFFER = C.MAX_BUFFER_SIZE
EINVAL = C.NBD_EINVAL

# Commands whose length is a payload size (limited to 32 MiB).
_SIZED_COMMANDS = frozenset((C.CMD_READ, C.CMD_WRITE, C.CMD_CACHE))
_WRITING_COMMANDS = frozenset((C.CMD_WRITE, C.CMD_WRITE_ZEROES, C.CMD_TRIM))


def unpack_request(buf, pos=0):
    """(magic, flags, type, cookie, offset, length) of the request header at ``buf[pos:]``."""
    return _REQ_UNPACK(buf, pos)


class Transmission:
    """Per-connection transmission state: what was negotiated and what QEMU accepts.

    ``contexts`` are the (id, name) pairs selected by SET_META_CONTEXT for this export, in
    reply order.
    """

    __slots__ = ("size", "flags", "structured", "read_only", "contexts", "_valid_flags")

    def __init__(self, size: int, flags: int, structured: bool, contexts=()):
        self.size = size
        self.flags = flags
        self.structured = structured
        self.read_only = bool(flags & C.TxFlag.READ_ONLY)
        self.contexts = tuple(contexts)
        fua = C.CMD_FLAG_FUA
        valid = {}
        for cmd in range(256):
            valid[cmd] = fua
        if structured:
            valid[C.CMD_READ] = fua | C.CMD_FLAG_DF
        valid[C.CMD_WRITE_ZEROES] = fua | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO
        valid[C.CMD_BLOCK_STATUS] = fua | C.CMD_FLAG_REQ_ONE
        self._valid_flags = valid

    # --- request checks (QEMU's order) ----------------------------------------------------
    def check_length(self, cmd: int, length: int):
        """First check, before any payload is read: the 32 MiB limit of READ/WRITE/CACHE.

        Returns None or an error message (reply EINVAL; for WRITE the payload was not read,
        so the connection must be dropped after the reply).
        """
        if length > MAX_BUFFER and cmd in _SIZED_COMMANDS:
            return "len (%d ) is larger than max len (%d)" % (length, MAX_BUFFER)  # sic, QEMU 7.2
        return None

    def check(self, flags: int, cmd: int, offset: int, length: int):
        """The sanity checks after the payload was read: None, or an error message.

        Every failure is answered with EINVAL, as QEMU does (even read-only writes and
        writes past the end, which QEMU computes as EROFS/ENOSPC first).
        """
        if self.read_only and cmd in _WRITING_COMMANDS:
            return "Export is read-only"
        size = self.size
        if offset > size or length > size - offset:
            return "operation past EOF; From: %d, Len: %d, Size: %d" % (offset, length, size)
        if flags & ~self._valid_flags.get(cmd, C.CMD_FLAG_FUA):
            return "unsupported flags for command %s (got 0x%x)" % (C.cmd_name(cmd), flags)
        return None

    # --- replies ---------------------------------------------------------------------------
    def error_reply(self, cookie: int, error: int, message: str) -> bytes:
        """A complete error reply: a structured ERROR chunk (with the message) or simple."""
        if self.structured:
            msg = message.encode("utf-8", "replace")[: C.MAX_STRING_SIZE]
            return _ERROR_CHUNK(SR_MAGIC, DONE, C.REPLY_TYPE_ERROR, cookie,
                                6 + len(msg), error, len(msg)) + msg
        return _SIMPLE(SIMPLE_MAGIC, error, cookie)

    def ok_reply(self, cookie: int) -> bytes:
        """Success without data (WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES): QEMU 7.2 sends a
        simple reply even when structured replies were negotiated."""
        return _SIMPLE(SIMPLE_MAGIC, 0, cookie)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE(SIMPLE_MAGIC, error, cookie)


def none_chunk(cookie: int) -> bytes:
    return _CHUNK(SR_MAGIC, DONE, C.REPLY_TYPE_NONE, cookie, 0)


def data_chunk_header(cookie: int, offset: int, length: int, final: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` data bytes follow it."""
    return _DATA_CHUNK(SR_MAGIC, DONE if final else 0, C.REPLY_TYPE_OFFSET_DATA, cookie,
                       8 + length, offset)


def hole_chunk(cookie: int, offset: int, length: int, final: bool) -> bytes:
    return _HOLE_CHUNK(SR_MAGIC, DONE if final else 0, C.REPLY_TYPE_OFFSET_HOLE, cookie,
                       12, offset, length)


_NEED_SWAP = sys.byteorder == "little"


def block_status_chunk(cookie: int, context_id: int, extents, final: bool) -> bytes:
    """A BLOCK_STATUS chunk for one context; ``extents`` is a flat sequence
    ``[len0, flags0, len1, flags1, ...]`` of 32-bit values."""
    arr = array("I", extents)
    if _NEED_SWAP:
        arr.byteswap()
    body = arr.tobytes()
    return _BS_HEADER(SR_MAGIC, DONE if final else 0, C.REPLY_TYPE_BLOCK_STATUS, cookie,
                      4 + len(body), context_id) + body
