"""The ``raw`` format driver: a window ``[offset, offset + size)`` of its ``file`` child.

Without offset and size QEMU treats raw as a filter (permissions pass through unchanged) and
so do we; the hot methods are then the child's own functions, so a raw layer costs nothing
per request.  With offset/size the child is a data child: RESIZE is never shared on it.
"""

from __future__ import annotations

import errno
import os

from blockexport.block.node import (
    PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, SECTOR_SIZE, BlockNode,
)
from blockexport.block.probe import probe_format
from blockexport.block.serialise import Overlaps
from blockexport.errors import Error
from blockexport.util.cutils import round_up

def _no_file_range(offset, length):
    return None


def _einval():
    return OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class RawNode(BlockNode):
    driver = "raw"
    is_protocol = False

    def __init__(self, graph, node_name: str, options: dict):
        super().__init__(node_name, options)
        # The child is opened first (QEMU does the same, so its errors come first).
        child = graph.open_child(self, "file", options["file"], options)
        try:
            self._setup(child, options)
        except BaseException:
            graph.abandon_child(child)
            raise

    #: Opened with a probed format (qemu-nbd's FILE without -f): see :meth:`set_probed`.
    probed = False

    def set_probed(self) -> None:
        """The format was probed, not given: as QEMU, the node then works in 512-byte
        sectors (unaligned writes and write-zeroes are read-modify-writes of whole
        sectors) and refuses a write that would make sector 0 look like another format
        (EPERM), so a guest cannot turn its raw image into, say, a qcow2 header."""
        self.probed = True
        self.request_alignment = SECTOR_SIZE
        self._overlaps = Overlaps()
        self._rebind_io(lambda: self._bind(self.file))

    def _setup(self, child: BlockNode, options: dict) -> None:
        for key in ("offset", "size"):  # QAPI 'int'; QEMU re-reads them as sizes
            if options.get(key, 0) < 0:
                raise Error(f"Parameter '{key}' expects a non-negative number below 2^64")
        offset = options.get("offset", 0)
        self.has_size = "size" in options
        size = options.get("size", 0)
        real_size = child.length()
        if offset > real_size:
            raise Error(f"Offset ({offset}) cannot be greater than size of the containing "
                        f"file ({real_size})")
        if self.has_size and real_size - offset < size:
            raise Error(f"The sum of offset ({offset}) and size ({size}) has to be smaller or "
                        f"equal to the  actual size of the containing file ({real_size})")
        if self.has_size and size % 512:
            raise Error("Specified size is not multiple of 512")
        self.offset = offset
        self.size = size
        self.filename = child.filename
        self.is_filter = offset == 0 and not self.has_size
        self._add_child("file", child)
        self.file = child
        # QEMU 7.2 does not propagate the protocol node's request alignment through raw.
        self.request_alignment = 1
        self.max_transfer = child.max_transfer
        self._bind(child)

    # ---- hot paths -----------------------------------------------------------------------

    def memory_io(self) -> bool:
        return self._debug is None and self.file.memory_io()

    def memory_sync(self) -> bool:
        return self._debug is None and self.file.memory_sync()

    def _bind(self, child: BlockNode) -> None:
        off = self.offset
        child_read = child.read_into
        child_write = child.write
        # a node with a backing chain (qcow2) below raw answers for itself alone: QEMU's
        # raw passes block status down one layer (BDRV_BLOCK_RAW), not along the chain
        child_status = getattr(child, "layer_status", None) or child.block_status
        child_range = child.file_range
        child_cached = child.read_cached
        child_cache = child.cache
        self.flush = child.flush
        if off == 0 and not self.has_size:
            self.read_into = child_read
            write_data = child_write
            self.block_status = child_status
            self.file_range = child_range
            self.read_cached = child_cached
            self.cache = child_cache
        else:
            has_size = self.has_size
            size = self.size

            def read_into(offset, buf):
                if has_size and offset + len(buf) > size:
                    raise _einval()
                child_read(offset + off, buf)

            def write_data(offset, buf, fua=False):
                if has_size and offset + len(buf) > size:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                child_write(offset + off, buf, fua)

            def block_status(offset, length):
                if has_size and offset + length > size:
                    length = size - offset
                    if length <= 0:
                        raise _einval()
                return child_status(offset + off, length)

            def file_range(offset, length):
                return child_range(offset + off, length)

            read_cached = None
            if child_cached is not None:
                def read_cached(offset, buf):
                    if has_size and offset + len(buf) > size:
                        raise _einval()
                    child_cached(offset + off, buf)

            def cache(offset, length):
                child_cache(offset + off, length)

            self.read_into = read_into
            self.block_status = block_status
            self.file_range = file_range
            self.read_cached = read_cached
            self.cache = cache
        debug = getattr(child, "debug_event", None)
        self._debug = debug
        if debug is not None:
            read_into, write_data = self._debug_io(debug, self.read_into, write_data)
            self.read_into = read_into
            self.file_range = _no_file_range
            self.read_cached = None
        self._write_data_unlocked = write_data
        if self.probed:
            write_data = self._probed_write(write_data)
        self._write_data = write_data
        if self.read_only:
            self.write = self._write_read_only
        elif self.detect_zeroes != "off":
            self.write = self._detect_zeroes_write(write_data)
        else:
            self.write = write_data
        # the child's vectored and spliced writes serve ours when no write of ours has
        # work of its own to do (read-only refusal, zero detection, sector 0, blkdebug)
        passthrough = not (self.read_only or self.detect_zeroes != "off" or self.probed
                           or debug is not None)
        splice_write = child.splice_write
        if splice_write is None or not passthrough:
            splice_write = None
        elif off or self.has_size:
            child_splice = splice_write
            has_size, size = self.has_size, self.size

            def splice_write(offset, pipe_fd, n):
                if has_size and offset + n > size:
                    return 0     # write() gives the error
                return child_splice(offset + off, pipe_fd, n)
        self.splice_write = splice_write
        writev = child.writev
        if writev is None or not passthrough:
            writev = None
        elif off or self.has_size:
            child_writev = writev
            has_size, size = self.has_size, self.size
            write = self.write

            def writev(offset, bufs):
                if has_size and offset + sum(map(len, bufs)) > size:
                    return write(offset, b"".join(bufs))     # write() gives the error
                return child_writev(offset + off, bufs)
        self.writev = writev
        # the child's asynchronous O_DIRECT access: reads unless blkdebug sits below (its
        # events), writes where the spliced ones pass
        dio = child.direct_io if debug is None else None
        if dio is not None and (off or self.has_size or not passthrough):
            child_dio = dio
            has_size, size = self.has_size, self.size

            def dio(offset, buf, write, fua=False):
                if write and not passthrough:
                    return None
                if has_size and offset + len(buf) > size:
                    return None     # read_into()/write() give the error
                return child_dio(offset + off, buf, write, fua)
        self.direct_io = dio

    # ---- probed format: whole sectors, sector 0 protected ---------------------------------

    def _probed_write(self, write_data):
        node = self

        def write(offset, buf, fua=False):
            n = len(buf)
            if not n:
                return
            me = node._overlaps.begin_request(offset, n, SECTOR_SIZE)
            try:
                node._sector_write(write_data, offset, buf, fua)
            finally:
                node._overlaps.end(me)
        return write

    def _sector_write(self, write_data, offset: int, buf, fua: bool,
                      zero: bool = False) -> None:
        """Write ``buf`` (or ``len(buf)`` zeroes) padded to whole sectors; the caller holds
        its place in ``_overlaps``."""
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        start = offset - offset % SECTOR_SIZE
        end = round_up(offset + n, SECTOR_SIZE)
        if start != offset or end != offset + n:
            padded = bytearray(end - start)
            if start != offset:
                self.read_into(start, memoryview(padded)[:SECTOR_SIZE])
            if end != offset + n and (end - SECTOR_SIZE > start or start == offset):
                self.read_into(end - SECTOR_SIZE, memoryview(padded)[-SECTOR_SIZE:])
            padded[offset - start:offset - start + n] = bytes(n) if zero else mv
            mv = memoryview(padded)
        if start == 0 and probe_format(bytes(mv[:SECTOR_SIZE])) != "raw":
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        write_data(start, mv, fua)

    def _probed_write_zeroes(self, offset: int, length: int, may_unmap: bool, fast: bool,
                             fua: bool) -> None:
        me = self._overlaps.begin_request(offset, length, SECTOR_SIZE)
        try:
            end = offset + length
            head_end = min(round_up(offset, SECTOR_SIZE), end)
            if head_end > offset:       # an unaligned head is written as data
                if fast:
                    raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
                self._sector_write(self._write_data_unlocked, offset,
                                   bytes(head_end - offset), fua, zero=True)
                offset = head_end
            tail_start = max(end - end % SECTOR_SIZE, offset)
            if tail_start > offset:
                self._zero_child(offset, tail_start - offset, may_unmap, fast, fua)
            if end > tail_start:
                if fast:
                    raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
                self._sector_write(self._write_data_unlocked, tail_start,
                                   bytes(end - tail_start), fua, zero=True)
        finally:
            self._overlaps.end(me)

    # ---- over an error-injection child (blkdebug) ------------------------------------------

    def _debug_io(self, debug, read_into, write_data):
        """Over a child that takes debug events (blkdebug), do what QEMU's raw driver and
        generic block layer do around it: ``read_aio``/``write_aio`` before each read/write,
        FUA emulated by a flush, a write generation so that ``flush_to_disk`` fires only
        after writes."""
        self._gen = 0
        self._flushed_gen = 0
        node = self

        def debug_read(offset, buf):
            debug("read_aio")
            read_into(offset, buf)

        def debug_write(offset, buf, fua=False):
            debug("write_aio")
            try:
                write_data(offset, buf, False)
                if fua:
                    node.flush()
            finally:
                node._gen += 1

        self.flush = self._debug_flush
        return debug_read, debug_write

    def _debug_flush(self) -> None:
        if self.read_only:
            return
        debug = self._debug
        debug("flush_to_os")
        gen = self._gen
        if not self.no_flush and gen != self._flushed_gen:
            debug("flush_to_disk")
        att = self._child_atts.get("file")
        if att is not None and att.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED):
            self.file.flush()
        self._flushed_gen = gen

    @staticmethod
    def _write_read_only(offset, buf, fua=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def _child_io_changed(self, role: str, child: BlockNode) -> None:
        # The child (un)installed its dirty-bitmap wrappers: recapture its functions.
        self._rebind_io(lambda: self._bind(child))

    # ---- the rest --------------------------------------------------------------------------

    def length(self) -> int:
        if self.has_size:
            return self.size
        n = self.file.length() - self.offset
        return round_up(n, SECTOR_SIZE) if n > 0 else 0

    def truncate(self, length: int, prealloc: str = "off", zero_write: bool = True) -> None:
        if self.has_size:       # QEMU: "Cannot resize fixed-size raw disks"
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        self.file.truncate(length + self.offset, prealloc, zero_write)

    def _check(self, offset: int, length: int) -> None:
        if self.has_size and offset + length > self.size:
            raise _einval()

    def discard(self, offset: int, length: int) -> None:
        if self.discard_mode != "unmap" or self.read_only:
            return
        self._check(offset, length)
        me = self._overlaps.begin(offset, offset + length, False) if self.probed else None
        try:
            self.file.discard(offset + self.offset, length)
        finally:
            if me is not None:
                self._overlaps.end(me)
            if self._debug is not None:
                self._gen += 1

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if self.has_size and offset + length > self.size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.probed and length > 0:
            self._probed_write_zeroes(offset, length, may_unmap, fast, fua)
            return
        self._zero_child(offset, length, may_unmap, fast, fua)

    def _zero_child(self, offset: int, length: int, may_unmap: bool, fast: bool,
                    fua: bool) -> None:
        # qemu-nbd 7.2 (discard=ignore on the format node) still punches holes for a zero
        # request without NO_HOLE: the decision is the protocol node's (its discard=unmap
        # is the default for children), so may_unmap passes through unchanged.
        if self._debug is None:
            self.file.write_zeroes(offset + self.offset, length, may_unmap, fast, fua)
            return
        try:
            self.file.write_zeroes(offset + self.offset, length, may_unmap, fast, False)
            if fua:
                self.flush()
        finally:
            self._gen += 1

    def _child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        if self.is_filter:
            return perm, shared
        # A data child: nobody may resize the file under a window into it.
        return perm, shared & ~PERM_RESIZE
