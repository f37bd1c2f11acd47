"""The C library through ctypes, loaded once for every module that calls into it (the
fallocate, mount, fstatfs and AIO system calls Python's os module lacks).  ``errno`` is
kept for ``ctypes.get_errno()``; ctypes releases the GIL around each call."""
from __future__ import annotations

import ctypes

_libc = None


def libc():
    """The process's C library (its global symbols), or None where ctypes can't load it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:     # pragma: no cover - no dynamic loader
            _libc = False
    return _libc or None
