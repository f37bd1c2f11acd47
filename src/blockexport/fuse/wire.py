"""Precompiled structs of the FUSE kernel protocol and the codec built on them.

Requests: :func:`parse_header` (the 40-byte ``fuse_in_header``) and :func:`parse_body` (the
operation's struct, length-checked).  Replies: ``pack_*`` functions writing into a caller's
buffer (no allocation on the hot path) or returning bytes for rare replies.  INIT is
negotiated by :func:`negotiate_init`.  Layouts follow the Linux uapi header ``linux/fuse.h``
(native byte order; every Linux FUSE host is little-endian here, as the structs say ``<``).
"""
from __future__ import annotations

import errno as _errno
import struct

from blockexport.fuse import constants as C
from blockexport.fuse.errors import FuseProtocolError

#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
IN_HEADER_SIZE = IN_HEADER.size      # 40
OUT_HEADER_SIZE = OUT_HEADER.size    # 16

#: fuse_read_in / fuse_write_in: fh, offset, size, read_flags|write_flags, lock_owner, flags
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = READ_IN
#: offset of a WRITE's data in the request
WRITE_DATA_OFFSET = IN_HEADER_SIZE + WRITE_IN.size     # 80
#: fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
#: mtimensec, ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
#: fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
#: fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
#: fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QII")
#: fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
#: fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
#: fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQII")
#: fuse_lseek_in: fh, offset, whence, padding
LSEEK_IN = struct.Struct("<QQII")
#: fuse_init_in up to flags (7.x); flags2 follows from 7.36 on
INIT_IN = struct.Struct("<IIII")
INIT_IN_FLAGS2 = struct.Struct("<I")

#: fuse_write_out: size, padding
WRITE_OUT = struct.Struct("<II")
#: fuse_lseek_out: offset
LSEEK_OUT = struct.Struct("<Q")
#: fuse_open_out: fh, open_flags, padding
OPEN_OUT = struct.Struct("<QII")
#: fuse_attr_out (attr_valid, attr_valid_nsec, dummy) followed by fuse_attr (ino, size,
#: blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid, gid,
#: rdev, blksize, flags)
ATTR_OUT = struct.Struct("<QII" "QQQQQQIIIIIIIIII")
#: fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
#: fuse_statfs_out (fuse_kstatfs): blocks, bfree, bavail, files, ffree, bsize, namelen,
#: frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

#: struct sizes of each opcode's body (what parse_body checks and unpacks)
_BODY = {
    C.GETATTR: GETATTR_IN,
    C.SETATTR: SETATTR_IN,
    C.OPEN: OPEN_IN,
    C.READ: READ_IN,
    C.WRITE: WRITE_IN,
    C.RELEASE: RELEASE_IN,
    C.FSYNC: FSYNC_IN,
    C.FLUSH: FLUSH_IN,
    C.FALLOCATE: FALLOCATE_IN,
    C.LSEEK: LSEEK_IN,
    C.INIT: INIT_IN,
}


def parse_header(buf, n: int) -> tuple:
    """``(opcode, unique, nodeid, uid, gid, pid)`` of the request in ``buf[:n]``.  Raises
    :class:`FuseProtocolError` when ``n`` is shorter than the header or differs from the
    header's ``len`` (then with ``unique`` set, so the request can still be answered)."""
    if n < IN_HEADER_SIZE:
        raise FuseProtocolError("truncated FUSE request: %d bytes" % n)
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf, 0)
    if length != n:
        raise FuseProtocolError("FUSE request length %d but %d bytes read" % (length, n),
                                unique, _errno.EIO)
    return opcode, unique, nodeid, uid, gid, pid


def parse_body(opcode: int, unique: int, body) -> tuple:
    """The fields of the operation struct at the start of ``body`` (the bytes after the
    header).  Raises :class:`FuseProtocolError` (with ``unique``, errno EINVAL) when the
    body is too short; opcodes without a struct give ``()``."""
    st = _BODY.get(opcode)
    if st is None:
        return ()
    if len(body) < st.size:
        raise FuseProtocolError("truncated body of FUSE opcode %d: %d bytes, need %d"
                                % (opcode, len(body), st.size), unique, _errno.EINVAL)
    return st.unpack_from(body, 0)


def pack_error(out, unique: int, err: int) -> int:
    """An error reply (``err`` a positive errno, 0 for success without data) into ``out``;
    returns its length."""
    OUT_HEADER.pack_into(out, 0, OUT_HEADER_SIZE, -err, unique)
    return OUT_HEADER_SIZE


def error_reply(unique: int, err: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER_SIZE, -err, unique)


def pack_attr(out, unique: int, valid_s: int, ino: int, size: int, blocks: int,
              now: int, mode: int, uid: int, gid: int, blksize: int) -> int:
    """A GETATTR/SETATTR reply (fuse_attr_out) into ``out``; returns its length."""
    n = OUT_HEADER_SIZE + ATTR_OUT.size
    OUT_HEADER.pack_into(out, 0, n, 0, unique)
    ATTR_OUT.pack_into(out, OUT_HEADER_SIZE, valid_s, 0, 0,
                       ino, size, blocks, now, now, now, 0, 0, 0,
                       mode, 1, uid, gid, 0, blksize, 0)
    return n


def pack_open(out, unique: int, open_flags: int, fh: int = 0) -> int:
    n = OUT_HEADER_SIZE + OPEN_OUT.size
    OUT_HEADER.pack_into(out, 0, n, 0, unique)
    OPEN_OUT.pack_into(out, OUT_HEADER_SIZE, fh, open_flags, 0)
    return n


def pack_write(out, unique: int, size: int) -> int:
    n = OUT_HEADER_SIZE + WRITE_OUT.size
    OUT_HEADER.pack_into(out, 0, n, 0, unique)
    WRITE_OUT.pack_into(out, OUT_HEADER_SIZE, size, 0)
    return n


def pack_lseek(out, unique: int, offset: int) -> int:
    n = OUT_HEADER_SIZE + LSEEK_OUT.size
    OUT_HEADER.pack_into(out, 0, n, 0, unique)
    LSEEK_OUT.pack_into(out, OUT_HEADER_SIZE, offset)
    return n


def pack_statfs(out, unique: int) -> int:
    """libfuse's default statfs answer (what QEMU's export gives): all counts 0, 512-byte
    blocks, 255-byte names."""
    n = OUT_HEADER_SIZE + STATFS_OUT.size
    OUT_HEADER.pack_into(out, 0, n, 0, unique)
    STATFS_OUT.pack_into(out, OUT_HEADER_SIZE, 0, 0, 0, 0, 0, 512, 255, 0, 0)
    return n


def pack_read_header(out, unique: int, size: int) -> None:
    """The header of a READ reply whose ``size`` data bytes follow (written separately)."""
    OUT_HEADER.pack_into(out, 0, OUT_HEADER_SIZE + size, 0, unique)


def negotiate_init(unique: int, body, *, max_write: int, max_readahead: int,
                   want_flags: int, max_background: int = 0,
                   congestion_threshold: int = 0) -> tuple[bytes, dict | None]:
    """Answer the kernel's INIT.  Returns ``(reply, params)``: ``params`` is None when the
    kernel must send INIT again (it offered a newer major version: we answer with ours), else
    ``{"minor", "flags", "max_write", "max_readahead", "max_pages"}`` as agreed.  Raises
    :class:`FuseProtocolError` (errno EPROTO) for an older major or a minor below
    :data:`~blockexport.fuse.constants.MIN_MINOR`."""
    if len(body) < INIT_IN.size:
        raise FuseProtocolError("truncated FUSE INIT: %d bytes" % len(body), unique,
                                _errno.EINVAL)
    major, minor, kernel_readahead, kernel_flags = INIT_IN.unpack_from(body, 0)
    if major > C.KERNEL_VERSION:
        # the kernel retries with our major when we answer with only the version
        out = bytearray(OUT_HEADER_SIZE + INIT_OUT.size)
        OUT_HEADER.pack_into(out, 0, len(out), 0, unique)
        INIT_OUT.pack_into(out, OUT_HEADER_SIZE, C.KERNEL_VERSION, C.KERNEL_MINOR_VERSION,
                           0, 0, 0, 0, 0, 0, 0, 0, 0)
        return bytes(out), None
    if major < C.KERNEL_VERSION or minor < C.MIN_MINOR:
        raise FuseProtocolError("unsupported FUSE protocol %d.%d (need %d.%d or later)"
                                % (major, minor, C.KERNEL_VERSION, C.MIN_MINOR), unique,
                                _errno.EPROTO)
    flags = kernel_flags & want_flags
    max_pages = 0
    if flags & C.MAX_PAGES:
        max_pages = min(0xFFFF, (max_write + 4095) // 4096)
    elif max_write > 32 * 4096:
        max_write = 32 * 4096           # the kernel's default page limit without MAX_PAGES
    readahead = min(kernel_readahead, max_readahead)
    out = bytearray(OUT_HEADER_SIZE + INIT_OUT.size)
    OUT_HEADER.pack_into(out, 0, len(out), 0, unique)
    INIT_OUT.pack_into(out, OUT_HEADER_SIZE, C.KERNEL_VERSION, C.KERNEL_MINOR_VERSION,
                       readahead, flags & 0xFFFFFFFF, max_background, congestion_threshold,
                       max_write, 1, max_pages, 0, 0)
    return bytes(out), {"minor": min(minor, C.KERNEL_MINOR_VERSION), "flags": flags,
                        "max_write": max_write, "max_readahead": readahead,
                        "max_pages": max_pages}
