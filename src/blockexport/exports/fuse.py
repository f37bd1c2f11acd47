"""The ``fuse`` export type: a node shown as one regular file, mounted over an existing regular
file (QEMU's ``block/export/fuse.c`` behaviour, QEMU 7.2).

Design (see docs/fuse.md for the measurements behind it):

* We speak the FUSE kernel protocol ourselves (``blockexport.fuse``: a sans-IO codec); no
  libfuse.  As root the file system is mounted with mount(2) (``fd=N,rootmode=100000,...``);
  otherwise ``fusermount3`` mounts it and passes the ``/dev/fuse`` fd back over
  ``_FUSE_COMMFD``.  The kernel's INIT is answered while ``block-export-add`` runs, so the
  file is usable when the command returns.
* Requests are served by worker threads, each on its own ``/dev/fuse`` fd cloned from the
  session fd (``FUSE_DEV_IOC_CLONE``).  A worker does a blocking ``os.readv`` of a request
  into two preallocated buffers (the 80 bytes of header + operation struct, then a page
  aligned data buffer, so WRITE data lands aligned), serves it on the block node straight
  from/into the data buffer and answers with one ``os.writev``.  No per-request objects.
* The export is deleted by unmounting (``umount2(MNT_DETACH)`` as root, else ``fusermount3
  -u -z``); files still open keep the connection, so each worker is then woken with a STATFS
  (through an O_PATH fd on the root), answers ENOTCONN and leaves; the last fd closed ends
  the connection and open files get ENOTCONN, as with QEMU.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time

from blockexport.block.node import BS_DATA, PERM_RESIZE
from blockexport.errors import Error
from blockexport.exports.base import BlockExport, ExportDriver
from blockexport.fuse import constants as C
from blockexport.fuse.errors import FuseProtocolError
from blockexport.fuse.wire import (
    IN_HEADER, IN_HEADER_SIZE, OUT_HEADER, OUT_HEADER_SIZE, READ_IN, WRITE_DATA_OFFSET,
    WRITE_IN, WRITE_OUT, negotiate_init, pack_attr, pack_error, pack_lseek, pack_open,
    pack_statfs, parse_body, parse_header,
)
from blockexport.util.libc import libc

log = logging.getLogger(__name__)

#: QEMU's FUSE_MAX_BOUNCE_BYTES: the max_read mount option (reads are cut to max_pages).
MAX_READ_OPTION = 64 * 1024 * 1024
#: What we offer for one READ or WRITE (the kernel's default max_pages limit: 256 pages).
MAX_IO = 1024 * 1024
#: Worker threads per export (each with its own cloned /dev/fuse fd);
#: BLOCKEXPORT_FUSE_WORKERS overrides it (for measurements).
WORKERS = int(os.environ.get("BLOCKEXPORT_FUSE_WORKERS", "4"))
#: INIT flags we ask for: async (parallel) reads and direct I/O, writes bigger than a page,
#: max_pages, page cache invalidated when the attributes change, and O_TRUNC left to OPEN
#: (which ignores it, as QEMU's export does: `> file` does not empty the image) — the last
#: two are libfuse defaults QEMU's export gets.
WANT_FLAGS = (C.ASYNC_READ | C.BIG_WRITES | C.MAX_PAGES | C.ASYNC_DIO | C.AUTO_INVAL_DATA
              | C.ATOMIC_O_TRUNC)
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
#: seconds the kernel may cache the attributes (QEMU: 1)
ATTR_VALID = 1
#: an O_DIRECT open gets direct I/O in the kernel too, with parallel writes (else the kernel
#: serialises direct writes on the inode lock)
DIRECT_OPEN_FLAGS = C.FOPEN_DIRECT_IO | C.FOPEN_PARALLEL_DIRECT_WRITES
INIT_TIMEOUT = 10.0
JOIN_TIMEOUT = 2.0

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

#: how the file system is mounted: "auto" (mount(2) as root, else fusermount3),
#: "fusermount" (always fusermount3; tests use it to cover that path as root)
MOUNT_METHOD = os.environ.get("BLOCKEXPORT_FUSE_MOUNT", "auto")

_S_RWXGO = 0o077
_S_WRITE = 0o222
_O_DIRECT = getattr(os, "O_DIRECT", 0o40000)

_libc = None

# Mount points of this process's FUSE exports (QEMU's check is by path string).
_mountpoints: set = set()


def _c():
    global _libc
    if _libc is None:
        _libc = libc()
        _libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p)
        _libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    return _libc


def _use_mount_syscall() -> bool:
    return MOUNT_METHOD != "fusermount" and os.geteuid() == 0


def _fusermount() -> str:
    return shutil.which("fusermount3") or "fusermount3"


def mount_fuse(path: str, options: str) -> int:
    """Mount a FUSE file system whose root is a regular file on ``path``; returns the
    session's /dev/fuse fd.  Raises OSError."""
    if _use_mount_syscall():
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = "fd=%d,rootmode=%o,user_id=%d,group_id=%d,%s" % (
            fd, C.S_IFREG, os.getuid(), os.getgid(), options)
        if _c().mount(b"/dev/fuse", os.fsencode(path), b"fuse", MS_NOSUID | MS_NODEV,
                      data.encode()) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err))
        return fd
    # fusermount3 mounts and sends the fd back over the socket named by _FUSE_COMMFD
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([_fusermount(), "-o", options, "--", path],
                                env=env, pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        theirs.close()
        ours.settimeout(INIT_TIMEOUT)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        try:
            _out, err = proc.communicate(timeout=INIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for fd in fds:
                os.close(fd)
            raise OSError(errno.ETIMEDOUT, "fusermount3 did not finish") from None
        if not fds:
            text = err.decode(errors="replace").strip()
            raise OSError(errno.EIO, text or "fusermount3 failed")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount_fuse(path: str) -> None:
    """Detach the mount on ``path`` (lazily: open files keep the connection until closed)."""
    if _use_mount_syscall():
        if _c().umount2(os.fsencode(path), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return
    subprocess.run([_fusermount(), "-u", "-q", "-z", "--", path], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def _check_regular_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        msg = "Failed to stat '%s': %s" % (path, os.strerror(e.errno))
        if e.errno == errno.ENOTCONN:
            # A FUSE mount whose daemon died (e.g. killed with SIGKILL) is still there.
            msg += (" (a FUSE mount whose server has gone is still on it; remove it with "
                    "'fusermount3 -u %s')" % path)
        raise Error(msg) from None
    if (st.st_mode & 0o170000) != C.S_IFREG:
        raise Error("'%s' is not a regular file" % path)


class FuseExportDriver(ExportDriver):
    type = "fuse"

    def create(self, env, opts: dict, node, attachment) -> "FuseExport":
        writable = opts.get("writable", False)
        growable = opts.get("growable", False)
        if writable or growable:
            # QEMU: writable and growable exports hold RESIZE for their lifetime
            attachment.set_perm(attachment.perm | PERM_RESIZE, attachment.shared)
        mountpoint = opts["mountpoint"]
        if mountpoint in _mountpoints:
            raise Error("There already is a FUSE export on '%s'" % mountpoint)
        _check_regular_file(mountpoint)
        export = FuseExport(self, opts["id"], node, attachment, mountpoint, writable,
                            growable, opts.get("writethrough", False))
        allow_other = opts.get("allow-other", "auto")
        try:
            if allow_other == "auto":
                try:
                    export.mount(True)
                except OSError:
                    export.mount(False)
            else:
                export.mount(allow_other == "on")
        except OSError as e:
            log.debug("FUSE mount of %s failed: %s", mountpoint, e)
            raise Error("Failed to mount FUSE session to export") from None
        _mountpoints.add(mountpoint)
        try:
            export.start()
        except BaseException as e:
            self.request_shutdown(export, True)
            self.delete(export)
            if isinstance(e, OSError):
                raise Error("Failed to mount FUSE session to export: %s"
                            % os.strerror(e.errno or errno.EIO)) from None
            raise
        return export

    def request_shutdown(self, export: "FuseExport", hard: bool) -> None:
        export.stopped = True
        _mountpoints.discard(export.mountpoint)

    def delete(self, export: "FuseExport") -> None:
        export.stopped = True
        _mountpoints.discard(export.mountpoint)
        export.unmount()


class FuseExport(BlockExport):
    def __init__(self, driver, export_id, node, attachment, mountpoint: str, writable: bool,
                 growable: bool, writethrough: bool):
        super().__init__(driver, export_id, node, attachment, writable, writethrough)
        self.mountpoint = mountpoint
        self.growable = growable
        self.allow_other = False
        self.st_mode = C.S_IFREG | 0o400 | (0o200 if writable else 0)
        self.st_uid = os.getuid()
        self.st_gid = os.getgid()
        self.session_fd = -1
        self.mounted = False
        self.stopped = False
        self.max_write = MAX_IO
        self.threads: list = []
        self._fds: list = []
        self._root_fd = -1

    # --- mount, INIT, workers ------------------------------------------------------------------
    def mount(self, allow_other: bool) -> None:
        options = "max_read=%d,default_permissions%s" % (
            MAX_READ_OPTION, ",allow_other" if allow_other else "")
        self.session_fd = mount_fuse(self.mountpoint, options)
        self.mounted = True
        self.allow_other = allow_other

    def start(self) -> None:
        """Answer the kernel's INIT, then start the workers."""
        fd = self.session_fd
        # the kernel refuses reads into less than FUSE_MIN_READ_BUFFER (and max_write + 80)
        buf = bytearray(C.MIN_READ_BUFFER + WRITE_DATA_OFFSET + MAX_IO)
        deadline = time.monotonic() + INIT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Error("Failed to mount FUSE session to export")
            n = os.readv(fd, [buf])
            try:
                opcode, unique = parse_header(buf, n)[:2]
            except FuseProtocolError as e:
                raise Error("Failed to mount FUSE session to export: %s" % e) from None
            if opcode != C.INIT:
                os.write(fd, OUT_HEADER.pack(OUT_HEADER_SIZE, -errno.EIO, unique))
                continue
            try:
                reply, params = negotiate_init(
                    unique, memoryview(buf)[IN_HEADER_SIZE:n], max_write=MAX_IO,
                    max_readahead=MAX_IO, want_flags=WANT_FLAGS,
                    max_background=MAX_BACKGROUND, congestion_threshold=CONGESTION_THRESHOLD)
            except FuseProtocolError as e:
                os.write(fd, OUT_HEADER.pack(OUT_HEADER_SIZE, -e.errno, unique))
                raise Error("Failed to mount FUSE session to export: %s" % e) from None
            os.write(fd, reply)
            if params is not None:
                break
        self.max_write = params["max_write"]
        for i in range(WORKERS):
            wfd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(wfd, C.DEV_IOC_CLONE, struct.pack("I", fd))
            except OSError:
                os.close(wfd)
                raise
            self._fds.append(wfd)
            t = threading.Thread(target=self._worker, args=(wfd,), daemon=True,
                                 name="fuse-%s-%d" % (self.id, i))
            self.threads.append(t)
            t.start()
        # a handle on the file system that outlives the mount (see unmount)
        self._root_fd = os.open(self.mountpoint, os.O_PATH | os.O_CLOEXEC)

    def unmount(self) -> None:
        """Unmount (lazily) and make the workers leave.  Files still open on the mount keep
        the connection alive after the unmount; so every worker is woken with a STATFS
        through ``_root_fd`` (an O_PATH fd on the root), answers it ENOTCONN and exits; the
        last one to close its fd ends the connection, and the open files get ENOTCONN (as
        when QEMU closes its session fd)."""
        self.stopped = True
        if self.session_fd >= 0:
            fd, self.session_fd = self.session_fd, -1
            os.close(fd)
        if self.mounted:
            self.mounted = False
            try:
                unmount_fuse(self.mountpoint)
            except (OSError, subprocess.CalledProcessError) as e:
                log.warning("unmounting %s failed: %s", self.mountpoint, e)
        root_fd, self._root_fd = self._root_fd, -1
        if root_fd < 0:
            return
        threads = self.threads

        def wake():
            try:
                for _ in threads:
                    if not any(t.is_alive() for t in threads):
                        break
                    try:
                        os.fstatvfs(root_fd)
                    except OSError:
                        pass
            finally:
                os.close(root_fd)

        waker = threading.Thread(target=wake, daemon=True, name="fuse-%s-stop" % self.id)
        waker.start()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for t in threads + [waker]:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- the data path -------------------------------------------------------------------------
    def _attr(self, out, unique: int) -> int:
        node = self.node
        length = node.length()
        allocated = node.allocated_size()
        if allocated <= 0:
            allocated = length
        return pack_attr(out, unique, ATTR_VALID, C.ROOT_ID, length, (allocated + 511) // 512,
                         int(time.time()), self.st_mode, self.st_uid, self.st_gid,
                         node.request_alignment)

    def _worker(self, fd: int) -> None:
        hdr = bytearray(WRITE_DATA_OFFSET)
        hmv = memoryview(hdr)
        data = mmap.mmap(-1, MAX_IO + 4096)
        dmv = memoryview(data)
        out = bytearray(256)
        omv = memoryview(out)
        head = omv[:OUT_HEADER_SIZE]
        write_reply = omv[:OUT_HEADER_SIZE + WRITE_OUT.size]
        iov = [hmv, dmv]
        read_reply = [head, head]       # [header, data view]: reused for every READ
        views: dict = {}                # size -> dmv[:size], so no view is made per request
        readv = os.readv
        writev = os.writev
        write = os.write
        unpack_header = IN_HEADER.unpack_from
        unpack_read = READ_IN.unpack_from
        unpack_write = WRITE_IN.unpack_from
        pack_header = OUT_HEADER.pack_into
        pack_write_out = WRITE_OUT.pack_into
        node = self.node
        max_read = len(dmv) - 4096
        READ, WRITE, NO_REPLY = C.READ, C.WRITE, C.NO_REPLY
        EIO, ENOTCONN, EINVAL = errno.EIO, errno.ENOTCONN, errno.EINVAL
        HS, DO = IN_HEADER_SIZE, WRITE_DATA_OFFSET
        OHS, WREPLY = OUT_HEADER_SIZE, OUT_HEADER_SIZE + WRITE_OUT.size
        try:
            while True:
                try:
                    n = readv(fd, iov)
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    break           # ENODEV: the file system is unmounted
                if n < HS:
                    if n == 0:
                        break       # not from /dev/fuse (which never ends a read empty)
                    log.warning("FUSE: dropped a truncated request (%d bytes)", n)
                    continue
                length, opcode, unique, _nodeid, _uid, _gid, _pid, _x, _p = \
                    unpack_header(hdr, 0)
                err = 0
                try:
                    if length != n:
                        err = EIO
                    elif self.stopped:
                        if opcode in NO_REPLY:
                            continue
                        err = ENOTCONN
                    elif opcode == READ:
                        if n < DO:
                            err = EINVAL
                        else:
                            _fh, offset, size, _rf, _lo, _fl, _pd = unpack_read(hdr, HS)
                            end = node.length()
                            if offset + size > end:
                                size = end - offset if offset < end else 0
                            if size > max_read:
                                err = EINVAL
                            else:
                                view = views.get(size)
                                if view is None:
                                    view = dmv[:size]
                                    if len(views) < 4096:
                                        views[size] = view
                                if size:
                                    node.read_into(offset, view)
                                pack_header(out, 0, OHS + size, 0, unique)
                                read_reply[1] = view
                                try:
                                    writev(fd, read_reply)
                                except OSError:
                                    pass        # interrupted or aborted: nobody waits
                                continue
                    elif opcode == WRITE:
                        if n < DO:
                            err = EINVAL
                        else:
                            _fh, offset, size, _wf, _lo, _fl, _pd = unpack_write(hdr, HS)
                            if not self.writable:
                                err = errno.EACCES
                            elif size != n - DO or size > self.max_write:
                                err = EINVAL
                            else:
                                end = node.length()
                                if offset + size > end:
                                    if self.growable:
                                        node.truncate(offset + size)
                                    else:
                                        size = end - offset if offset < end else 0
                                if size:
                                    view = views.get(size)
                                    if view is None:
                                        view = dmv[:size]
                                        if len(views) < 4096:
                                            views[size] = view
                                    node.write(offset, view)
                                    if self.writethrough:
                                        node.flush()
                                pack_header(out, 0, WREPLY, 0, unique)
                                pack_write_out(out, OHS, size, 0)
                                try:
                                    write(fd, write_reply)
                                except OSError:
                                    pass
                                continue
                    elif opcode in NO_REPLY:
                        continue
                    else:
                        k = self._other(opcode, unique, n, hdr, dmv, out)
                        try:
                            write(fd, omv[:k])
                        except OSError:
                            pass
                        continue
                except OSError as e:
                    err = e.errno or EIO
                except FuseProtocolError as e:
                    err = e.errno or EIO
                except Exception:       # a bug: the request fails, the export goes on
                    log.exception("FUSE request %d failed", opcode)
                    err = EIO
                pack_header(out, 0, OHS, -err, unique)
                try:
                    write(fd, head)
                except OSError:
                    pass
                if self.stopped:
                    break           # unmount() woke us: leave (see there)
        finally:
            read_reply[1] = None
            for view in views.values():
                view.release()
            dmv.release()
            data.close()
            try:
                self._fds.remove(fd)
            except ValueError:
                pass
            os.close(fd)

    def _other(self, opcode: int, unique: int, n: int, hdr, dmv, out):
        """The operations other than READ and WRITE.  Returns the length of the reply built
        in ``out``; raises OSError (or the codec's FuseProtocolError) for an error reply."""
        if opcode == C.GETATTR:
            return self._attr(out, unique)
        if opcode == C.FLUSH or opcode == C.FSYNC:
            self.node.flush()
            return pack_error(out, unique, 0)
        if opcode == C.RELEASE or opcode == C.DESTROY:
            return pack_error(out, unique, 0)
        if opcode == C.STATFS:
            return pack_statfs(out, unique)
        if opcode == C.LOOKUP:
            raise OSError(errno.ENOENT, "lookup")
        body = self._body(n, hdr, dmv)
        if opcode == C.OPEN:
            flags = parse_body(opcode, unique, body)[0]
            return pack_open(out, unique, DIRECT_OPEN_FLAGS if flags & _O_DIRECT else 0)
        if opcode == C.SETATTR:
            return self._setattr(unique, parse_body(opcode, unique, body), out)
        if opcode == C.FALLOCATE:
            _fh, offset, length, mode, _pad = parse_body(opcode, unique, body)
            self._fallocate(offset, length, mode)
            return pack_error(out, unique, 0)
        if opcode == C.LSEEK:
            _fh, offset, whence, _pad = parse_body(opcode, unique, body)
            return pack_lseek(out, unique, self._lseek(offset, whence))
        raise OSError(errno.ENOSYS, "opcode %d" % opcode)

    @staticmethod
    def _body(n: int, hdr, dmv) -> bytes:
        """The bytes after the header (they continue into the data buffer past 80)."""
        if n <= WRITE_DATA_OFFSET:
            return bytes(hdr[IN_HEADER_SIZE:n])
        return bytes(hdr[IN_HEADER_SIZE:]) + bytes(dmv[:n - WRITE_DATA_OFFSET])

    def _setattr(self, unique: int, fields: tuple, out) -> int:
        (valid, _pad, _fh, size, _lo, _at, _mt, _ct, _atn, _mtn, _ctn, mode, _u4, uid, gid,
         _u5) = fields
        valid &= C.FATTR_REQUESTS
        supported = C.FATTR_SIZE | C.FATTR_MODE
        if self.allow_other:
            supported |= C.FATTR_UID | C.FATTR_GID
        if valid & ~supported:
            raise OSError(errno.ENOTSUP, "setattr")
        if valid & C.FATTR_MODE:
            if not self.allow_other and mode & _S_RWXGO:
                raise OSError(errno.EPERM, "setattr")
            if not self.writable and mode & _S_WRITE:
                raise OSError(errno.EROFS, "setattr")
        if valid & C.FATTR_SIZE:
            if not self.writable:
                raise OSError(errno.EACCES, "setattr")
            self.node.truncate(size)
        if valid & C.FATTR_MODE:
            self.st_mode = (mode & 0o7777) | C.S_IFREG
        if valid & C.FATTR_UID:
            self.st_uid = uid
        if valid & C.FATTR_GID:
            self.st_gid = gid
        return self._attr(out, unique)

    def _fallocate(self, offset: int, length: int, mode: int) -> None:
        """QEMU's fuse_fallocate()."""
        if not self.writable:
            raise OSError(errno.EACCES, "fallocate")
        node = self.node
        end = node.length()
        if mode & C.FALLOC_FL_KEEP_SIZE:
            length = min(length, end - offset)
        if not mode:
            if offset < end:            # only at or after EOF (a truncate)
                raise OSError(errno.EOPNOTSUPP, "fallocate")
            if offset > end:
                node.truncate(offset)
            node.truncate(offset + length, "falloc")
        elif mode & C.FALLOC_FL_PUNCH_HOLE:
            if not mode & C.FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EINVAL, "fallocate")
            if length > 0:
                node.write_zeroes(offset, length, may_unmap=True, fast=True)
        elif mode & C.FALLOC_FL_ZERO_RANGE:
            if not mode & C.FALLOC_FL_KEEP_SIZE and offset + length > end:
                node.truncate(offset + length, zero_write=False)
            if length > 0:
                node.write_zeroes(offset, length)
        else:
            raise OSError(errno.EOPNOTSUPP, "fallocate")

    def _lseek(self, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE from block status (QEMU's fuse_lseek())."""
        if whence != C.SEEK_DATA and whence != C.SEEK_HOLE:
            raise OSError(errno.EINVAL, "lseek")
        node = self.node
        end = node.length()
        while True:
            if offset >= end:
                if offset > end or whence == C.SEEK_DATA:
                    raise OSError(errno.ENXIO, "lseek")
                return offset
            n, st = node.block_status(offset, end - offset)
            if st & BS_DATA:
                if whence == C.SEEK_DATA:
                    return offset
            elif whence == C.SEEK_HOLE:
                return offset
            if n <= 0:
                raise OSError(errno.ENXIO, "lseek")
            offset += n
