"""Linux native asynchronous I/O (``io_setup``/``io_submit``/``io_getevents``) through ctypes.

For O_DIRECT files: a read or write submitted here runs on the device while the submitting
thread goes on, and completions are collected in batches by one thread.  With Python threads
doing the same (one blocking ``preadv`` per thread) each request costs several GIL hand-offs
and context switches.  On this project's 2-core VM (virtio disk), random 4 KiB O_DIRECT reads
at queue depth 32: about 10k IOPS at about 100 µs of server CPU each through the NBD server's
thread pool; a standalone Python loop submitting them here, 48k IOPS at 7.4 µs each
(BENCHMARKS.md, "O_DIRECT exports").

Only what the NBD data path needs: preallocated control blocks addressed by slot number
(no objects per request), ``IOCB_CMD_PREAD``/``PWRITE``, ``IOCB_CMD_FDSYNC`` (an fdatasync
the kernel runs, Linux 4.18 and newer), and ``IOCB_CMD_POLL`` on a pipe so that the thread
waiting in :meth:`AioContext.getevents` can be woken to stop.  ctypes releases the GIL
around each system call.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import select

from blockexport.util.libc import libc

# (io_setup, io_destroy, io_getevents, io_submit) by machine
_SYSCALLS = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "arm64": (0, 1, 4, 2),
    "ppc64le": (227, 228, 229, 230),
    "s390x": (243, 244, 245, 246),
    "riscv64": (0, 1, 4, 2),
}

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FDSYNC = 3
IOCB_CMD_POLL = 5


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h> (little-endian layout of aio_key/aio_rw_flags)
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


_lib = None
_nrs = None
_PTR = ctypes.sizeof(ctypes.c_void_p)


def _load():
    global _lib, _nrs
    if _lib is None:
        nrs = _SYSCALLS.get(platform.machine())
        if nrs is None or os.uname().sysname != "Linux" or platform.architecture()[0] != "64bit":
            _lib = False
            return False
        try:
            lib = libc()
            lib.syscall.restype = ctypes.c_long
        except AttributeError:      # no C library, or no syscall() in it
            _lib = False
            return False
        _nrs = nrs
        _lib = lib
    return _lib


def available() -> bool:
    """Whether the kernel takes native AIO here (tried once: a context set up and destroyed)."""
    global _available
    if _available is None:
        try:
            AioContext(1).close()
            _available = True
        except OSError:
            _available = False
    return _available


_available = None


def buffer_address(buf) -> int:
    """The address of a writable buffer (an mmap or bytearray; kept alive by the caller)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class AioContext:
    """An AIO context with ``slots`` control blocks, plus one for the stop poll.

    ``submit(slot, ...)`` starts one request on control block ``slot`` (0 <= slot < slots;
    the caller hands each slot to one request at a time), ``prepare()`` then
    ``submit_batch()`` several with one system call; ``getevents()`` waits for at least
    one completion and returns ``[(slot, res), ...]``, ``res`` the byte count or ``-errno``;
    slot ``STOP`` reports :meth:`wake`.  Thread-safe as the kernel calls are: one thread may
    submit while another waits."""

    def __init__(self, slots: int):
        lib = _load()
        if not lib:
            raise OSError(errno.ENOSYS, "native AIO is not available here")
        self._syscall = lib.syscall
        self._nr_setup, self._nr_destroy, self._nr_getevents, self._nr_submit = _nrs
        self.slots = slots
        self.STOP = slots
        self._ctx = ctypes.c_ulong(0)
        if self._syscall(self._nr_setup, slots + 1, ctypes.byref(self._ctx)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, "io_setup: " + os.strerror(e))
        self._cbs = (_Iocb * (slots + 1))()
        self._ptrs = (ctypes.POINTER(_Iocb) * (slots + 1))()
        for i in range(slots + 1):
            self._ptrs[i] = ctypes.pointer(self._cbs[i])
            self._cbs[i].data = i
        self._batch = (ctypes.POINTER(_Iocb) * (slots + 1))()
        self._events = (_Event * (slots + 1))()
        self._wake_r = self._wake_w = -1

    def prepare(self, slot: int, opcode: int, fd: int, addr: int, nbytes: int,
                offset: int) -> None:
        """Fill control block ``slot`` for a request (started by submit_batch()); for
        ``IOCB_CMD_FDSYNC`` only ``fd`` counts."""
        cb = self._cbs[slot]
        cb.opcode = opcode
        cb.fildes = fd
        cb.buf = addr
        cb.nbytes = nbytes
        cb.offset = offset

    def submit(self, slot: int, opcode: int, fd: int, addr: int, nbytes: int,
               offset: int) -> None:
        """Start one request; OSError if the kernel refused it (nothing started)."""
        self.prepare(slot, opcode, fd, addr, nbytes, offset)
        self.submit_batch((slot,))

    def submit_batch(self, slots, start: int = 0) -> int:
        """Start the prepared requests ``slots[start:]`` with one io_submit (the kernel then
        plugs the queue once for all of them); returns how many it started (at least one),
        in order; OSError if it refused the first (that one not started)."""
        count = len(slots) - start
        if count == 1:       # its pointer where it is
            array = ctypes.byref(self._ptrs, slots[start] * _PTR)
        else:
            array = self._batch
            ptrs = self._ptrs
            for i in range(count):
                array[i] = ptrs[slots[start + i]]
        while True:
            n = self._syscall(self._nr_submit, self._ctx, count, array)
            if n > 0:
                return n
            e = ctypes.get_errno() if n < 0 else errno.EAGAIN
            if e != errno.EINTR:
                raise OSError(e, "io_submit: " + os.strerror(e))

    def arm_wake(self) -> None:
        """Make :meth:`wake` possible: a poll on a pipe in the stop slot."""
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        cb = self._cbs[self.STOP]
        cb.opcode = IOCB_CMD_POLL
        cb.fildes = self._wake_r
        cb.buf = select.POLLIN
        cb.nbytes = cb.offset = 0
        self.submit_batch((self.STOP,))

    def wake(self) -> None:
        """Complete the stop slot (the thread in getevents() returns with it)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def getevents(self) -> list:
        events = self._events
        while True:
            got = self._syscall(self._nr_getevents, self._ctx, 1, self.slots + 1, events, None)
            if got >= 0:
                break
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, "io_getevents: " + os.strerror(e))
        return [(events[i].data, events[i].res) for i in range(got)]

    def close(self) -> None:
        """Destroy the context (waits for requests in flight: call when none are)."""
        if self._ctx.value:
            self._syscall(self._nr_destroy, self._ctx)
            self._ctx.value = 0
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
