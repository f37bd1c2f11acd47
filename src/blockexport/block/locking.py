"""Image locking compatible with QEMU's file-posix driver.

QEMU publishes a node's permissions as shared (read) OFD locks on single bytes of the image:
byte ``100 + bit`` is locked while it *holds* permission ``bit``, byte ``200 + bit`` while it
does *not share* it.  Before taking a permission a process checks that nobody holds the
"unshared" byte for it; before unsharing one it checks that nobody holds its "perm" byte.  An
OFD lock test (F_OFD_GETLK) only reports locks of other open file descriptions, so two nodes of
one process on the same image conflict just as two processes do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from blockexport.errors import Error
from blockexport.block.node import PERM_ALL, perm_names

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_BITS = (1, 2, 4, 8)

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
_FLOCK = struct.Struct("@hhqqi4x")


def _flock(fd: int, cmd: int, ltype: int, start: int) -> bytes:
    return fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))


def lock_byte(fd: int, off: int) -> None:
    _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, off)


def unlock_byte(fd: int, off: int) -> None:
    _flock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, off)


def byte_locked_by_others(fd: int, off: int) -> bool:
    """Would an exclusive lock of byte ``off`` conflict with another open file's lock?"""
    res = _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, off)
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


_ofd_supported: bool | None = None


def has_ofd_locks() -> bool:
    """Whether the kernel supports OFD locks (probed once, like QEMU does)."""
    global _ofd_supported
    if _ofd_supported is None:
        try:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            _ofd_supported = False
            return False
        try:
            _flock(fd, _F_OFD_GETLK, fcntl.F_UNLCK, 0)
            _ofd_supported = True
        except OSError:
            _ofd_supported = False
        finally:
            os.close(fd)
    return _ofd_supported


class ImageLock:
    """The lock bytes one open file description holds for one image."""

    def __init__(self, fd: int, filename: str):
        self.fd = fd
        self.filename = filename
        self.perm = 0          # permission bytes currently locked
        self.unshared = 0      # "unshared" bytes currently locked

    def _error(self, text: str, exc: OSError | None = None) -> Error:
        if exc is not None and exc.errno not in (errno.EAGAIN, errno.EACCES):
            text = f"{text}: {os.strerror(exc.errno)}"
        # QEMU adds this hint (printed by its command-line tools, dropped by QMP).
        return Error(text, hint=f"Is another process using the image [{self.filename}]?")

    def apply(self, perm: int, unshared: int) -> None:
        """Hold exactly the lock bytes for ``perm`` and ``unshared``."""
        fd = self.fd
        for bit_index, bit in enumerate(_BITS):
            for want, have, base in ((perm, self.perm, LOCK_PERM_BASE),
                                     (unshared, self.unshared, LOCK_SHARED_BASE)):
                if want & bit and not have & bit:
                    try:
                        lock_byte(fd, base + bit_index)
                    except OSError as e:
                        raise self._error(f"Failed to lock byte {base + bit_index}", e) from None
                elif have & bit and not want & bit:
                    try:
                        unlock_byte(fd, base + bit_index)
                    except OSError as e:
                        raise self._error(f"Failed to unlock byte {base + bit_index}",
                                          e) from None
        self.perm = perm & PERM_ALL
        self.unshared = unshared & PERM_ALL

    def check(self, perm: int, shared: int) -> None:
        """Raise QEMU's error if another process prevents taking ``perm`` / unsharing
        ``~shared``."""
        fd = self.fd
        for bit_index, bit in enumerate(_BITS):
            if perm & bit:
                try:
                    busy = byte_locked_by_others(fd, LOCK_SHARED_BASE + bit_index)
                except OSError as e:
                    raise self._error(f'Failed to get "{perm_names(bit)}" lock', e) from None
                if busy:
                    raise self._error(f'Failed to get "{perm_names(bit)}" lock')
        for bit_index, bit in enumerate(_BITS):
            if not shared & bit:
                try:
                    busy = byte_locked_by_others(fd, LOCK_PERM_BASE + bit_index)
                except OSError as e:
                    raise self._error(f'Failed to get shared "{perm_names(bit)}" lock',
                                      e) from None
                if busy:
                    raise self._error(f'Failed to get shared "{perm_names(bit)}" lock')

    def change(self, perm: int, shared: int) -> None:
        """Move to (perm, shared) the way QEMU does: lock the union of old and new, check for
        other processes, then drop what is no longer needed.  On failure the old state is
        restored and the :class:`Error` raised."""
        old_perm, old_unshared = self.perm, self.unshared
        unshared = ~shared & PERM_ALL
        try:
            self.apply(old_perm | perm, old_unshared | unshared)
            self.check(perm, shared)
        except Error:
            try:
                self.apply(old_perm, old_unshared)
            except Error:  # pragma: no cover
                pass
            raise
        self.apply(perm, unshared)
