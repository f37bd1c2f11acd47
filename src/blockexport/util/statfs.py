"""The kind of file system a file descriptor lives on (``fstatfs``'s ``f_type``), through
ctypes: whether it keeps data only in memory, so that a sync of it waits on nothing.

Used by the file driver's ``memory_sync`` (block/node.py): on tmpfs or ramfs an fdatasync
returns at once, so a FLUSH or a FUA write may be served inline like any memory copy.
"""
from __future__ import annotations

import ctypes
import os

from blockexport.util.libc import libc

#: f_type values of <linux/magic.h> for file systems whose data lives only in memory
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FS = frozenset((TMPFS_MAGIC, RAMFS_MAGIC))

_fstatfs = None


def _load():
    global _fstatfs
    if _fstatfs is None:
        try:
            fn = libc().fstatfs
            fn.argtypes = (ctypes.c_int, ctypes.c_void_p)
            fn.restype = ctypes.c_int
            _fstatfs = fn
        except AttributeError:      # no C library, or no fstatfs in it
            _fstatfs = False
    return _fstatfs


_LINUX = os.uname().sysname == "Linux"


def fs_magic(fd: int):
    """The file system type of ``fd`` (``f_type``), or None where it can't be read (also
    off Linux: struct statfs is laid out differently there)."""
    fn = _load() if _LINUX else None
    if not fn:
        return None
    # struct statfs begins with f_type, a machine word on Linux; 256 bytes hold all of it
    buf = ctypes.create_string_buffer(256)
    if fn(fd, buf) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def memory_fs(fd: int) -> bool:
    """Whether ``fd`` is a file on a file system that keeps data only in memory."""
    return fs_magic(fd) in MEMORY_FS
