"""The ``file`` (regular file) and ``host_device`` (block/character device) protocol drivers.

I/O goes straight from/to the caller's buffers with ``os.preadv``/``os.pwritev`` (no copy) in
the calling thread; the GIL is released during each syscall.  With ``cache.direct=on`` the fd
is opened with O_DIRECT and requests that are not aligned to the probed request alignment go
through page-aligned per-thread bounce buffers (read-modify-write for writes), as QEMU's
generic block layer does.
"""

from __future__ import annotations

from bisect import bisect_right
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading

from blockexport.block import locking
from blockexport.block.serialise import Overlaps
from blockexport.block.node import (
    BS_ALLOCATED, BS_DATA, BS_ZERO, SECTOR_SIZE, ZERO_PAGES, BlockNode, zero_fill,
)
from blockexport.errors import Error
from blockexport.util import linux_aio, statfs
from blockexport.util.libc import libc
from blockexport.util.cutils import round_up

# ---- fallocate(2) via libc (Python only has posix_fallocate) ---------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:
    _c_fallocate = libc().fallocate
    _c_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    _c_fallocate.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - non-glibc platforms
    _c_fallocate = None


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_splice = getattr(os, "splice", None)
#: the most buffers one pwritev takes
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (ENOTSUP when unavailable).  The GIL is released."""
    if _c_fallocate is None:  # pragma: no cover
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
    if _c_fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        if e == errno.EOPNOTSUPP:
            e = errno.ENOTSUP
        raise OSError(e, os.strerror(e))


def _buffer_address(buf) -> int | None:
    """Address of a buffer's first byte, or None if it cannot be found cheaply."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        if type(buf) is bytes:
            return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
        return None


def _byte_view(buf) -> memoryview:
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


_BLKSSZGET = 0x1268
_MAX_ALIGN = max(4096, mmap.PAGESIZE)
#: Data extents the block-status cache keeps (a sparse read of a cached extent costs no
#: syscall; a miss costs two lseeks, and adding is a copy of these tuples)
BSC_EXTENTS = 1024
_ENOTSUP_SET = (errno.ENOTSUP, errno.EOPNOTSUPP)


class _Bounce(threading.local):
    buf: mmap.mmap | None = None

    def get(self, size: int) -> memoryview:
        b = self.buf
        if b is None or len(b) < size:
            if b is not None:
                b.close()
            b = self.buf = mmap.mmap(-1, round_up(max(size, 1 << 20), mmap.PAGESIZE))
        return memoryview(b)[:size]


class FileNode(BlockNode):
    """A host file (QEMU's ``file`` driver)."""

    driver = "file"

    def __init__(self, graph, node_name: str, options: dict):
        super().__init__(node_name, options)
        filename = options["filename"]
        self.filename = filename
        self.aio = options.get("aio", "threads")
        locking_opt = options.get("locking", "auto")
        self.use_lock = locking_opt == "on" or (locking_opt == "auto"
                                                and locking.has_ofd_locks())
        pr_manager = options.get("pr-manager")
        if pr_manager is not None:     # no pr-manager object types (yet)
            objects = getattr(graph, "objects", None)
            if objects is None or objects.get(pr_manager) is None:
                raise Error(f"No persistent reservation manager with id '{pr_manager}'")
            raise Error(f"Object with id '{pr_manager}' is not a persistent reservation "
                        "manager")
        self._fd = self._open(filename)
        try:
            if self.aio == "native" and not self.cache_direct:   # checked after the open
                raise Error("aio=native was specified, but it requires cache.direct=on, "
                            "which was not specified.")
            st = os.fstat(self._fd)
            self._check_type(st)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self._size = self._initial_size(st)
            self._size_lock = threading.Lock()
            self._overlaps = Overlaps()    # O_DIRECT write serialisation
            self._bounce = _Bounce()
            self._has_zero_range = True
            self._has_punch = True
            self._has_fallocate = True
            self._has_dsync = hasattr(os, "RWF_DSYNC")
            #: errno of a failed fdatasync on a buffered file: every later flush fails (in a
            #: one-int buffer, which share_state() moves to memory other processes map)
            self._flush_err = memoryview(bytearray(4)).cast("i")
            self._state_fd = -1
            # block-status cache: the last data extent hit [start, end), and up to
            # BSC_EXTENTS known data extents (sorted starts, their ends), swapped whole
            self._bsc = (0, 0)
            self._bsm = ((), ())
            if self.cache_direct:
                self.request_alignment, self._buf_align = self._probe_alignment()
            else:
                self._buf_align = 1
            self._lock = locking.ImageLock(self._fd, filename) if self.use_lock else None
            self._bind()
        except BaseException:
            os.close(self._fd)
            raise

    # ---- open --------------------------------------------------------------------------

    def _open(self, filename: str) -> int:
        flags = os.O_CLOEXEC | (os.O_RDONLY if self.read_only else os.O_RDWR)
        if self.cache_direct:
            flags |= os.O_DIRECT
        try:
            return os.open(filename, flags)
        except OSError as e:
            err = e
        if (not self.read_only and self.auto_read_only
                and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM)):
            try:
                fd = os.open(filename, flags & ~os.O_RDWR | os.O_RDONLY)
                self.read_only = True
                return fd
            except OSError as e:
                err = e
        if err.errno == errno.EINVAL and flags & os.O_DIRECT:
            try:
                os.close(os.open(filename, flags & ~os.O_DIRECT))
            except OSError:
                pass
            else:
                raise Error(f"Could not open '{filename}': filesystem does not support "
                            f"O_DIRECT") from None
        raise Error(f"Could not open '{filename}': {os.strerror(err.errno)}") from None

    def _check_type(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise Error(f"'{self.driver}' driver requires '{self.filename}' to be a regular "
                        f"file")

    def _initial_size(self, st: os.stat_result) -> int:
        return st.st_size

    def _probe_alignment(self) -> tuple[int, int]:
        """O_DIRECT request and memory alignment, probed like QEMU does."""
        fd = self._fd
        req = 0
        if self.is_block_device:
            try:
                res = fcntl.ioctl(fd, _BLKSSZGET, b"\0\0\0\0")
                req = int.from_bytes(res, "little")
            except OSError:
                req = 0
        buf = mmap.mmap(-1, 2 * _MAX_ALIGN)
        try:
            mv = memoryview(buf)

            def works(view) -> bool:
                try:
                    os.preadv(fd, (view,), 0)
                    return True
                except OSError as e:
                    return e.errno != errno.EINVAL

            mem = 0
            for align in (1, 512, 1024, 2048, 4096):
                if works(mv[align:align + _MAX_ALIGN]):
                    mem = align if align != 1 else _MAX_ALIGN
                    break
            if not req:
                for align in (1, 512, 1024, 2048, 4096):
                    if works(mv[:align]):
                        req = align if align != 1 else _MAX_ALIGN
                        break
            mv.release()
        finally:
            buf.close()
        if not req or not mem:
            raise Error("Could not find working O_DIRECT alignment", hint="Try cache.direct=off")
        return req, mem

    # ---- hot paths (plain functions bound as instance attributes) ---------------------

    def _bind(self) -> None:
        fd = self._fd
        node = self
        preadv = os.preadv
        pwritev = os.pwritev

        def grow(end):
            with node._size_lock:
                if end > node._size:
                    node._size = end

        self._grow = grow

        if self.cache_direct:
            read_into = self._direct_read_into
            write_data = self._direct_write
        else:
            def read_into(offset, buf):
                n = preadv(fd, (buf,), offset)
                if n != len(buf):
                    node._read_rest(offset, buf, n)

            dsync = getattr(os, "RWF_DSYNC", 0)
            no_flush = self.no_flush

            def write_data(offset, buf, fua=False):
                if fua and not no_flush:
                    return node._write_fua(offset, buf)
                n = pwritev(fd, (buf,), offset)
                if n != len(buf):
                    n = node._write_rest(offset, buf, n)
                end = offset + n
                if end > node._size:
                    grow(end)

            def file_range(offset, length):
                if offset + length <= node._size:
                    return fd, offset
                return None

            nowait = [_RWF_NOWAIT]

            def read_cached(offset, buf):
                flag = nowait[0]
                if flag:
                    try:
                        n = preadv(fd, (buf,), offset, flag)
                    except OSError as exc:
                        if exc.errno != errno.EOPNOTSUPP:
                            raise
                        nowait[0] = 0     # e.g. tmpfs: its pages are memory
                    else:
                        if n != len(buf):   # partly cached, or past the end: read_into
                            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                        return
                read_into(offset, buf)

            self.read_cached = read_cached

            self.file_range = file_range
            self._dsync_flag = dsync

        self._write_data = write_data
        self.read_into = read_into
        if self.read_only:
            self.write = self._write_read_only
        elif self.detect_zeroes != "off":
            self.write = self._detect_zeroes_write(write_data)
        else:
            self.write = write_data
        splice_write = None
        if _splice is not None and not self.cache_direct and not self.read_only \
                and self.detect_zeroes == "off":
            def splice_write(offset, pipe_fd, n):
                end = offset + n
                while offset < end:
                    k = _splice(pipe_fd, fd, end - offset, offset_dst=offset)
                    if k <= 0:
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    offset += k
                if end > node._size:
                    grow(end)
                return n
        self.splice_write = splice_write
        writev = None
        if not self.cache_direct and not self.read_only and self.detect_zeroes == "off":
            def writev(offset, bufs):
                if len(bufs) > _IOV_MAX:
                    return write_data(offset, b"".join(bufs))
                total = sum(map(len, bufs))
                n = pwritev(fd, bufs, offset)
                if n != total:      # short: the rest as one buffer (rare)
                    return write_data(offset + n, b"".join(bufs)[n:])
                if offset + total > node._size:
                    grow(offset + total)
        self.writev = writev
        self.direct_io = self._direct_io_fn() if self.cache_direct else None

    def _direct_io_fn(self):
        """The node's ``direct_io`` (see BlockNode): aligned requests and buffers of an
        O_DIRECT file, if the kernel has native AIO; writes while the node writes plainly."""
        if not linux_aio.available():
            return None
        fd = self._fd
        node = self
        a = self.request_alignment
        aligned_buf = self._aligned_buf
        overlaps = self._overlaps
        writes = not self.read_only and self.detect_zeroes == "off"
        # FUA made durable by the caller's fdatasync; with cache.no-flush=on FUA is a plain
        # write, which the pool path does
        fua_ok = not self.no_flush

        def nothing():
            pass

        def direct_io(offset, buf, write, fua=False):
            n = len(buf)
            if offset % a or n % a or not n or not aligned_buf(buf):
                return None
            if not write:
                return fd, offset, nothing
            if not writes or (fua and not fua_ok):
                return None
            # never waits (the caller's own requests may be what it would wait for):
            # next to a read-modify-write in flight, the plain write() waits in a pool thread
            me = overlaps.try_begin(offset, offset + n)
            if me is None:
                return None

            def done():
                overlaps.end(me)
                if offset + n > node._size:
                    node._grow(offset + n)
            return fd, offset, done
        return direct_io

    def _read_rest(self, offset: int, buf, n: int) -> None:
        """Finish a short read: read on until EOF, then zero-fill the rest."""
        mv = _byte_view(buf)
        total = len(mv)
        while 0 < n < total:
            got = os.preadv(self._fd, (mv[n:],), offset + n)
            if got <= 0:
                break
            n += got
        if n < total:
            zero_fill(mv, max(n, 0))

    def _write_rest(self, offset: int, buf, n: int) -> int:
        mv = _byte_view(buf)
        total = len(mv)
        while n < total:
            got = os.pwritev(self._fd, (mv[n:],), offset + n)
            if got <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            n += got
        return n

    @property
    def _flush_error(self) -> int:
        return self._flush_err[0]

    @_flush_error.setter
    def _flush_error(self, err: int) -> None:
        self._flush_err[0] = err

    def share_state(self) -> int:
        """A descriptor of a shared page holding the state that must be one for every
        process writing this file (the failed-flush errno), for :meth:`adopt_state` in an
        NBD worker process; the node uses that page from now on.  Stays ours (closed with
        the node)."""
        if self._state_fd < 0:
            fd = os.memfd_create("blockexport-file-state", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, mmap.PAGESIZE)
                self._adopt(fd)
            except BaseException:
                os.close(fd)
                raise
        return self._state_fd

    def adopt_state(self, fd: int) -> None:
        """Use the shared state page ``fd`` (from :meth:`share_state`); the node owns
        ``fd`` from now on."""
        self._adopt(fd, keep=False)

    def _adopt(self, fd: int, keep: bool = True) -> None:
        page = mmap.mmap(fd, mmap.PAGESIZE)
        view = memoryview(page)[:4].cast("i")
        if keep and self._flush_err[0]:
            view[0] = self._flush_err[0]
        self._flush_err = view
        self._state_fd = fd

    def _write_fua(self, offset: int, buf) -> None:
        if self._has_dsync and not self._flush_error:
            try:
                n = os.pwritev(self._fd, (buf,), offset, self._dsync_flag)
            except OSError as e:
                if e.errno == errno.EIO:
                    # the write-back of this write (or of earlier ones) failed: the page
                    # cache may hold data the disk lost, as after a failed fdatasync
                    self._flush_error = e.errno
                if e.errno not in _ENOTSUP_SET:
                    raise
                self._has_dsync = False
            else:
                if n != len(buf):
                    n = self._write_rest(offset, buf, n)
                    self._sync()
                end = offset + n
                if end > self._size:
                    self._grow(end)
                return
        n = os.pwritev(self._fd, (buf,), offset)
        if n != len(buf):
            n = self._write_rest(offset, buf, n)
        end = offset + n
        if end > self._size:
            self._grow(end)
        self._sync()

    def _sync(self) -> None:
        """fdatasync(), failing for good once it failed on a buffered file (QEMU's
        file-posix: the kernel may have dropped the dirty pages and marked them clean, so a
        later fdatasync could succeed without the data being on disk; we must never
        acknowledge that).  O_DIRECT bypasses the page cache: no such state."""
        err = self._flush_error
        if err:
            raise OSError(err, os.strerror(err))
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            if not self.cache_direct:
                self._flush_error = e.errno
            raise

    def _write_read_only(self, offset, buf, fua=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # ---- O_DIRECT ------------------------------------------------------------------------

    def _aligned_buf(self, buf) -> bool:
        if self._buf_align == 1:
            return True
        addr = _buffer_address(buf)
        return addr is not None and addr % self._buf_align == 0

    def _pread_full(self, view, offset: int) -> int:
        """Read into ``view`` until full or EOF; returns bytes read."""
        total = len(view)
        n = 0
        while n < total:
            got = os.preadv(self._fd, (view[n:],), offset + n)
            if got <= 0:
                break
            n += got
        return n

    def _direct_read_into(self, offset: int, buf) -> None:
        a = self.request_alignment
        mv = _byte_view(buf)
        n = len(mv)
        if n == 0:
            return
        if not (offset % a or n % a) and self._aligned_buf(mv):
            got = self._pread_full(mv, offset)
            if got < n:
                zero_fill(mv, got)
            return
        start = offset - offset % a
        end = round_up(offset + n, a)
        b = self._bounce.get(end - start)
        got = self._pread_full(b, start)
        if got < end - start:
            zero_fill(b, got)
        mv[:] = b[offset - start:offset - start + n]

    def _serialise(self, offset: int, length: int, rmw: bool) -> list:
        if rmw:
            a = self.request_alignment
            return self._overlaps.begin(offset - offset % a, round_up(offset + length, a), True)
        return self._overlaps.begin(offset, offset + length, False)

    def _direct_write(self, offset: int, buf, fua: bool = False) -> None:
        n = len(buf) if isinstance(buf, (bytes, bytearray)) else _byte_view(buf).nbytes
        if n == 0:
            return
        a = self.request_alignment
        me = self._serialise(offset, n, bool(offset % a or n % a))
        try:
            self._direct_write_locked(offset, buf, fua)
        finally:
            self._overlaps.end(me)

    def _direct_write_locked(self, offset: int, buf, fua: bool = False) -> None:
        """The write itself; the caller holds its place in ``_overlaps``."""
        a = self.request_alignment
        mv = _byte_view(buf)
        n = len(mv)
        if n == 0:
            return
        if not (offset % a or n % a):
            if self._aligned_buf(mv):
                self._pwrite_all(mv, offset, fua)
            else:
                b = self._bounce.get(n)
                b[:] = mv
                self._pwrite_all(b, offset, fua)
            end = offset + n
        else:
            start = offset - offset % a
            end = round_up(offset + n, a)
            b = self._bounce.get(end - start)
            if start != offset:
                got = self._pread_full(b[:a], start)
                if got < a:
                    zero_fill(b[:a], got)
            if end != offset + n and (end - a >= start + a or start == offset):
                tail = b[end - a - start:end - start]
                got = self._pread_full(tail, end - a)
                if got < a:
                    zero_fill(tail, got)
            b[offset - start:offset - start + n] = mv
            self._pwrite_all(b, start, fua)
        if end > self._size:
            self._grow(end)

    def _pwrite_all(self, view, offset: int, fua: bool) -> None:
        fd = self._fd
        flags = 0
        if fua and not self.no_flush:
            flags = self._dsync_flag if self._has_dsync else 0
        total = len(view)
        n = 0
        while n < total:
            got = os.pwritev(fd, (view[n:],), offset + n, flags) if flags else \
                os.pwritev(fd, (view[n:],), offset + n)
            if got <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            n += got
        if fua and not self.no_flush and not flags:
            self._sync()

    _dsync_flag = getattr(os, "RWF_DSYNC", 0)

    # ---- the rest of the node API --------------------------------------------------------

    def length(self) -> int:
        return round_up(self._size, SECTOR_SIZE)

    def flush(self) -> None:
        if not self.no_flush:
            self._sync()

    def memory_sync(self) -> bool:
        """cache.no-flush=on (flush is nothing, FUA a plain write), or a file on tmpfs or
        ramfs (fdatasync returns at once)."""
        return self.no_flush or statfs.memory_fs(self._fd)

    def truncate(self, length: int, prealloc: str = "off", zero_write: bool = True) -> None:
        if self.read_only:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        if length < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        fd = self._fd
        with self._size_lock:
            current = os.fstat(fd).st_size
            if prealloc == "falloc" and length > current:
                os.posix_fallocate(fd, current, length - current)
            elif prealloc != "off" and length > current:
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
            os.ftruncate(fd, length)
            self._size = length
        self._invalidate_status()

    def allocated_size(self) -> int:
        try:
            return os.fstat(self._fd).st_blocks * 512
        except OSError:
            return -1

    def discard(self, offset: int, length: int) -> None:
        if self.discard_mode != "unmap" or length <= 0 or self.read_only:
            return
        if not self._has_punch:
            return
        me = self._serialise(offset, length, False) if self.cache_direct else None
        self._invalidate_status()
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            # Like QEMU: an unsupported discard is not an error (discard is advisory).
            if e.errno in _ENOTSUP_SET:
                self._has_punch = False
                return
            raise
        finally:
            # also drop what a concurrent block_status cached meanwhile
            self._invalidate_status()
            if me is not None:
                self._overlaps.end(me)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if length <= 0:
            return
        me = None
        if self.cache_direct:
            # unaligned: the zero buffers written as a fallback are read-modify-writes
            a = self.request_alignment
            me = self._serialise(offset, length, bool(offset % a or length % a))
        self._invalidate_status()
        try:
            self._write_zeroes(offset, length, may_unmap, fast, fua)
        finally:
            self._invalidate_status()
            if me is not None:
                self._overlaps.end(me)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fast: bool,
                      fua: bool) -> None:
        fd = self._fd
        done = False
        if may_unmap and self.discard_mode == "unmap" and self._has_punch:
            # Zero and deallocate at once.
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                done = True
            except OSError as e:
                if e.errno in _ENOTSUP_SET:
                    self._has_punch = False
                elif e.errno not in (errno.EINVAL, errno.EBUSY):
                    raise
            # (Like QEMU, a punched range does not extend the file: the tail up to the
            # 512-byte rounded length reads as zeroes anyway.)
        if not done:
            done = self._zero_allocated(offset, length)
        if not done:
            if fast:
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
            self._write_zero_buffers(offset, length)
            if fua:
                self.flush()
            return
        if fua and not self.no_flush:
            self._sync()

    def _zero_allocated(self, offset: int, length: int) -> bool:
        """Zero a range without leaving a hole, without writing data.  False if the file
        system cannot (the caller then writes zero buffers or refuses a fast zero)."""
        fd = self._fd
        end = offset + length
        if self._has_fallocate and offset >= self._size and self._allocate(offset, length):
            # Extending the file: a fresh allocation reads as zeroes (one call, where
            # zeroing a range inside the file may take two).
            return True
        if self._has_zero_range:
            try:
                fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)
                if end > self._size:
                    self._grow(end)
                return True
            except OSError as e:
                if e.errno in _ENOTSUP_SET:
                    self._has_zero_range = False
                elif e.errno != errno.EINVAL:
                    raise
        if self._has_punch and self._has_fallocate:
            # Punch, then allocate again: the range reads as zeroes and stays allocated.
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:
                if e.errno in _ENOTSUP_SET:
                    self._has_punch = False
                elif e.errno != errno.EINVAL:
                    raise
            else:
                return self._allocate(offset, length)
        return False

    def _allocate(self, offset: int, length: int) -> bool:
        """fallocate(2) mode 0 over a range that reads zeroes (a hole, or past the end),
        growing the file to cover it; False (and never again) where unsupported."""
        try:
            fallocate(self._fd, 0, offset, length)
        except OSError as e:
            if e.errno not in _ENOTSUP_SET:
                raise
            self._has_fallocate = False
            return False
        if offset + length > self._size:
            self._grow(offset + length)
        return True

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        chunk = len(ZERO_PAGES)
        # (O_DIRECT: write_zeroes already holds its place in _overlaps)
        write = self._direct_write_locked if self.cache_direct else self._write_data
        zmv = ZERO_PAGES
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            write(offset + pos, zmv[:n])
            pos += n

    def block_status(self, offset: int, length: int) -> tuple[int, int]:
        # One cached data extent, like QEMU's block-status cache: SEEK_HOLE can cost a scan
        # of the whole extent (e.g. hundreds of µs on a fully allocated tmpfs file), and the
        # NBD server asks for block status on every structured read.
        start, end = self._bsc
        if start <= offset < end:
            n = end - offset
            return (n if n < length else length), BS_DATA | BS_ALLOCATED
        starts, ends = self._bsm
        if starts:
            i = bisect_right(starts, offset) - 1
            if i >= 0 and offset < ends[i]:
                end = ends[i]
                self._bsc = (starts[i], end)
                n = end - offset
                return (n if n < length else length), BS_DATA | BS_ALLOCATED
        if offset >= self._size:
            return length, BS_ZERO | BS_ALLOCATED
        fd = self._fd
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # trailing hole
                return length, BS_ZERO | BS_ALLOCATED
            return length, BS_DATA | BS_ALLOCATED  # no information: pretend data
        if data > offset:
            n = data - offset
            flags = BS_ZERO | BS_ALLOCATED
        else:
            try:
                hole = os.lseek(fd, offset, os.SEEK_HOLE)
            except OSError:
                return length, BS_DATA | BS_ALLOCATED
            n = hole - offset
            if n <= 0:  # raced with a concurrent change
                return length, BS_DATA | BS_ALLOCATED
            a = self.request_alignment
            if a > 1 and n % a:
                n = round_up(n, a)
            # Only data is cached: reporting data for what became zeroes is always safe.
            self._bsc = (offset, offset + n)
            self._cache_extent(offset, offset + n)
            flags = BS_DATA | BS_ALLOCATED
        return (n if n < length else length), flags

    def _cache_extent(self, start: int, end: int) -> None:
        """Remember a data extent (a new sorted copy, swapped in whole, so that readers on
        other threads never see the lists half updated); full: start over.  Only data is
        cached: writes never turn data into a hole, and reporting data for what another
        process punched out meanwhile is always safe."""
        starts, ends = self._bsm
        if len(starts) >= BSC_EXTENTS:
            starts, ends = (), ()
        i = bisect_right(starts, start)
        self._bsm = (starts[:i] + (start,) + starts[i:], ends[:i] + (end,) + ends[i:])

    def _invalidate_status(self) -> None:
        self._bsc, self._bsm = (0, 0), ((), ())

    def cache(self, offset: int, length: int) -> None:
        if self.cache_direct:
            return
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def file_range(self, offset: int, length: int):
        return None  # replaced in _bind() when sendfile is possible

    # ---- permissions and locks ----------------------------------------------------------

    def _set_perm(self, perm: int, shared: int, undo: list) -> None:
        lock = self._lock
        if lock is None:
            return
        old_perm, old_unshared = lock.perm, lock.unshared
        lock.change(perm, shared)
        undo.append(lambda: lock.apply(old_perm, old_unshared))

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # also drops the OFD locks
        state_fd, self._state_fd = self._state_fd, -1
        if state_fd >= 0:
            os.close(state_fd)   # the page stays mapped while views of it live
        bounce = self._bounce
        if bounce.buf is not None:
            try:
                bounce.buf.close()
            except BufferError:
                pass

    @property
    def fd(self) -> int:
        return self._fd


class HostDeviceNode(FileNode):
    """A host block or character device (QEMU's ``host_device`` driver)."""

    driver = "host_device"

    def _check_type(self, st: os.stat_result) -> None:
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise Error(f"'{self.driver}' driver requires '{self.filename}' to be either a "
                        f"character or block device")

    def _initial_size(self, st: os.stat_result) -> int:
        try:
            return os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            return 0

    def block_status(self, offset: int, length: int) -> tuple[int, int]:
        return length, BS_DATA | BS_ALLOCATED

    def truncate(self, length: int, prealloc: str = "off", zero_write: bool = True) -> None:
        # QEMU: a device cannot grow; shrinking it is not possible either.
        if length > self.length():
            raise OSError(errno.EINVAL, "Cannot grow device files")
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    def allocated_size(self) -> int:
        return -1
