"""Block nodes: the base class every driver subclasses, and permission negotiation.

I/O methods are synchronous and thread-safe (see docs/architecture.md).  Drivers are free to
replace the hot methods (``read_into``, ``write``, ``block_status``, ``file_range`` ...) by
plain functions stored as *instance attributes* in ``__init__``: ``node.read_into(off, buf)``
then costs one dict lookup and one call, with no bound-method object and no attribute chains.

Dirty bitmaps (``node.dirty_bitmaps``, see :mod:`blockexport.block.dirty_bitmap`): while a
node may be written (a user holds the write permission) or has an enabled bitmap, its
``write``/``write_zeroes``/``discard`` attributes are wrappers that call the driver's functions
and then, when the request *completes* (failed or not, as QEMU), mark the range widened to the
request alignment in the bitmaps enabled at that moment.  Marking on completion is what makes a
bitmap created (or cleared) while a write is in flight see that write: an incremental backup
must not miss it.  The wrappers are installed for writers, not only when a bitmap exists,
because a write that started before the first bitmap was added must still mark it.  Read-only
nodes keep the driver's own functions (no cost).  A driver that captures a child's hot methods (``raw``) must recapture them in
:meth:`BlockNode._child_io_changed`, which the child calls whenever it (un)installs its
wrappers; users such as exports must look ``node.write`` up per request, never cache it.

Permissions follow QEMU's model: every user of a node (an export, a parent node) holds an
:class:`Attachment` with the permissions it takes (``perm``) and the ones it lets others take
(``shared``).  A format node passes its users' cumulative permissions down to its children; a
``file`` node turns its cumulative permissions into OFD byte-range locks on the image so other
processes (QEMU's tools or another blockexport) see them.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Callable

from blockexport.errors import Error

# Block-status flags (QEMU's BDRV_BLOCK_*).
BS_DATA = 1
BS_ZERO = 2
BS_ALLOCATED = 4

# Permissions (QEMU's BLK_PERM_*).
PERM_CONSISTENT_READ = 1
PERM_WRITE = 2
PERM_WRITE_UNCHANGED = 4
PERM_RESIZE = 8
PERM_ALL = 15

_PERM_NAMES = (
    (PERM_CONSISTENT_READ, "consistent read"),
    (PERM_WRITE, "write"),
    (PERM_WRITE_UNCHANGED, "write unchanged"),
    (PERM_RESIZE, "resize"),
)

SECTOR_SIZE = 512

#: A shared all-zero buffer (1 MiB): zero-fill source and comparison reference.
ZEROS = bytes(1 << 20)
_ZLEN = len(ZEROS)
#: The same zeroes, page-aligned (a read-only anonymous mapping), to *write* zeroes from: a
#: write that faults on an untouched page and is then killed stops short on a page boundary,
#: never inside a sector (``bytes(1 << 20)`` starts 48 bytes past one: the crash test in
#: tests/qcow2_write_random saw a killed zero write leave a torn sector).
ZERO_PAGES = memoryview(mmap.mmap(-1, _ZLEN, prot=mmap.PROT_READ))


def perm_names(perm: int) -> str:
    """QEMU's wording of a permission set, e.g. ``"consistent read, write"``."""
    return ", ".join(name for bit, name in _PERM_NAMES if perm & bit)


def is_zero(buf) -> bool:
    """True when the bytes-like ``buf`` is all zeroes (memcmp speed)."""
    mv = memoryview(buf)
    if mv.itemsize != 1 or mv.ndim != 1:
        mv = mv.cast("B")
    n = len(mv)
    if n <= _ZLEN:
        return ZEROS.startswith(mv)
    startswith = ZEROS.startswith
    for pos in range(0, n, _ZLEN):
        if not startswith(mv[pos:pos + _ZLEN]):
            return False
    return True


def zero_fill(buf, start: int = 0) -> None:
    """Zero ``buf[start:]`` (a writable bytes-like object)."""
    mv = memoryview(buf)
    if mv.itemsize != 1 or mv.ndim != 1:
        mv = mv.cast("B")
    end = len(mv)
    while start < end:
        n = min(end - start, _ZLEN)
        mv[start:start + n] = ZEROS[:n]
        start += n


# One lock for every permission change in the process: permission changes are rare
# (export creation, blockdev-add/del) and may walk several nodes.
_perm_lock = threading.RLock()


class Attachment:
    """One user's hold on a node (QEMU's BdrvChild).

    ``user`` describes the user in QEMU's words for error messages ("an unnamed block
    device", "block device 'x'", "node 'raw0'"); ``child_name`` is the role under which it
    uses the node (``"root"`` for exports, ``"file"`` for a format node's protocol child).
    ``parent`` is the parent :class:`BlockNode` for graph edges, ``None`` for users such as
    exports.
    """

    __slots__ = ("node", "user", "child_name", "parent", "perm", "shared", "attached")

    def __init__(self, node: "BlockNode", user: str, child_name: str, perm: int, shared: int,
                 parent: "BlockNode | None" = None):
        self.node = node
        self.user = user
        self.child_name = child_name
        self.parent = parent
        self.perm = perm
        self.shared = shared
        self.attached = False

    def set_perm(self, perm: int, shared: int) -> None:
        """Change this user's permissions (e.g. take RESIZE for a while); raises
        :class:`Error` and keeps the old permissions on a conflict."""
        with _perm_lock:
            if not self.attached:
                raise ValueError("attachment is detached")
            old = (self.perm, self.shared)
            if old == (perm, shared):
                return
            undo: list[Callable[[], None]] = []

            def restore():
                self.perm, self.shared = old
            self.perm, self.shared = perm, shared
            undo.append(restore)
            _apply(self.node, undo)

    def detach(self) -> None:
        """Release the hold; idempotent."""
        with _perm_lock:
            if not self.attached:
                return
            self.attached = False
            node = self.node
            node._parents.remove(self)
            try:
                _refresh(node, [])
            except Error:  # pragma: no cover - relaxing permissions cannot conflict
                pass

    def __repr__(self) -> str:
        return (f"<Attachment {self.user} as {self.child_name!r} on {self.node.node_name!r} "
                f"perm={self.perm:#x} shared={self.shared:#x}>")


def _apply(node: "BlockNode", undo: list) -> None:
    """Refresh permissions from ``node`` downwards; on failure undo everything."""
    try:
        _refresh(node, undo)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise


def _refresh(node: "BlockNode", undo: list) -> None:
    parents = node._parents
    for a in parents:
        for b in parents:
            if a is b:
                continue
            bad = b.perm & ~a.shared
            if bad:
                name = node.node_name
                raise Error(
                    f"Permission conflict on node '{name}': permissions '{perm_names(bad)}' are "
                    f"both required by {b.user} (uses node '{name}' as '{b.child_name}' child) "
                    f"and unshared by {a.user} (uses node '{name}' as '{a.child_name}' child).")
    perm, shared = node.cumulative_perms()
    if perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and node.read_only:
        raise Error("Block node is read-only")
    if (perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and not perm & PERM_RESIZE
            and node.request_alignment > 1 and node.length() % node.request_alignment):
        # Writes are padded to the alignment, which would need to grow the image.
        raise Error("Cannot get 'write' permission without 'resize': Image size is not a "
                    "multiple of request alignment")
    old = node._perm
    if old != (perm, shared):
        node._set_perm(perm, shared, undo)

        def restore(node=node, old=old):
            node._perm = old
            node._update_write_hooks()
        node._perm = (perm, shared)
        undo.append(restore)
        node._update_write_hooks()
    for role, att in node._child_atts.items():
        cperm, cshared = node._child_perm(role, perm, shared)
        if att.node.force_share:
            cshared = PERM_ALL
        if (att.perm, att.shared) != (cperm, cshared):
            def restore_child(att=att, old=(att.perm, att.shared)):
                att.perm, att.shared = old
            att.perm, att.shared = cperm, cshared
            undo.append(restore_child)
            _refresh(att.node, undo)


_WRITE_METHODS = ("write", "write_zeroes", "discard", "splice_write", "writev", "direct_io")


def _closed(*args, **kwargs):
    raise OSError(9, "Bad file descriptor")  # EBADF


class BlockNode:
    """Base class of every block driver node.

    Subclasses set ``driver`` and implement the I/O methods.  The common options
    (``read-only``, ``discard``, ``detect-zeroes``, ``cache``, ``force-share``) are read by
    this constructor from the validated QAPI options dict.
    """

    driver = ""
    #: Whether the node is a "protocol" (bottom) node; format nodes have a "file" child.
    is_protocol = True

    def __init__(self, node_name: str, options: dict | None = None):
        options = options or {}
        self.node_name = node_name
        self.options = options
        self.read_only: bool = bool(options.get("read-only", False))
        self.auto_read_only: bool = bool(options.get("auto-read-only", False))
        self.force_share: bool = bool(options.get("force-share", False))
        self.discard_mode: str = options.get("discard", "ignore")
        self.detect_zeroes: str = options.get("detect-zeroes", "off")
        cache = options.get("cache") or {}
        self.cache_direct: bool = bool(cache.get("direct", False))
        self.no_flush: bool = bool(cache.get("no-flush", False))
        self.children: dict[str, BlockNode] = {}
        self.request_alignment: int = 1
        self.max_transfer: int = 0
        #: A human-readable image name (QEMU's bs->filename), used in lock hints.
        self.filename: str = ""
        #: Set by the graph: added by blockdev-add (True) or created implicitly (False).
        self.monitor_owned: bool = False
        self._parents: list[Attachment] = []
        self._child_atts: dict[str, Attachment] = {}
        self._perm = (0, PERM_ALL)
        self.closed = False
        #: Dirty bitmaps by name, oldest first (see blockexport.block.dirty_bitmap).
        self.dirty_bitmaps: dict = {}
        self._recording: tuple = ()  # the enabled bitmaps, read by the marking wrappers
        self._unhooked: dict | None = None  # the driver's functions while wrapped
        self._wrappers: tuple = ()
        #: Called (no arguments) whenever the set of enabled bitmaps changes: writers that
        #: bypass this process's wrappers (the NBD worker processes) start or stop
        #: reporting their writes.
        self.bitmap_listeners: list = []

    # ---- I/O (to be overridden) --------------------------------------------------------

    def length(self) -> int:
        raise NotImplementedError

    def read_into(self, offset: int, buf) -> None:
        raise NotImplementedError

    def write(self, offset: int, buf, fua: bool = False) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fast: bool = False, fua: bool = False) -> None:
        raise NotImplementedError

    def block_status(self, offset: int, length: int) -> tuple[int, int]:
        return length, BS_DATA | BS_ALLOCATED

    def allocation_depth(self, offset: int, length: int) -> tuple[int, int]:
        """``(n, depth)`` for ``[offset, offset + n)``: where in the backing chain the data
        comes from (QEMU's ``bdrv_is_allocated_above``): 1 for this node, 2 for its backing
        node and so on, 0 when no node of the chain allocates it.  Nodes without a backing
        chain derive it from :meth:`block_status`."""
        n, st = self.block_status(offset, length)
        return n, (1 if st & BS_ALLOCATED else 0)

    def cache(self, offset: int, length: int) -> None:
        pass

    def truncate(self, length: int, prealloc: str = "off", zero_write: bool = True) -> None:
        """Resize the node to ``length`` bytes (QEMU's ``bdrv_co_truncate``, exact): growth
        reads as zeroes; ``prealloc`` ``"falloc"`` allocates the new tail.  Raises
        ``OSError(ENOTSUP)`` where the driver cannot resize (QEMU's "Image format driver does
        not support resize").  The caller holds the RESIZE permission."""
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    def allocated_size(self) -> int:
        """Bytes the node takes on the host (QEMU's ``bdrv_get_allocated_file_size``): a
        format node answers with its file child's, a protocol node from the host; -1 when
        unknown."""
        child = self.children.get("file")
        return child.allocated_size() if child is not None else -1

    def file_range(self, offset: int, length: int):
        return None

    #: ``read_cached(offset, buf) -> None`` or None: ``read_into`` that won't wait on the
    #: disk: it raises BlockingIOError when the bytes are not all in the page cache (a
    #: preadv2 RWF_NOWAIT; on a file system without the flag, tmpfs, a plain read), and may
    #: have filled part of ``buf`` then.  Offered by a buffered plain file and raw over one;
    #: the NBD data path serves small reads inline with it and hands misses to its pool.
    read_cached = None

    #: ``splice_write(offset, pipe_fd, n) -> int`` or None.  When a driver offers it, it
    #: moves up to ``n`` bytes (all of them already in the pipe) from the pipe into the node
    #: at ``offset`` with ``os.splice`` (no copy through user space), as a plain ``write`` of
    #: those bytes would, and returns how many it moved: fewer than ``n`` where the range
    #: stops being directly writable (0: nothing written; the caller reads the bytes out of
    #: the pipe and uses ``write``).  Offered only where ``write`` would be a plain buffered
    #: write of the bytes as they are (not read-only, detect-zeroes off, no O_DIRECT, no
    #: probed-raw sector-0 check, no blkdebug).  The dirty-bitmap wrappers mark what it
    #: wrote.  The NBD data path uses it for large writes (exports/nbd_conn.py).
    splice_write = None

    #: ``writev(offset, bufs) -> None`` or None: the bytes of ``bufs`` (a list of buffers)
    #: written at ``offset`` with one ``pwritev``, as ``write`` of their concatenation would
    #: (no gathering copy).  Offered where ``splice_write`` is (a plain buffered write);
    #: the dirty-bitmap wrappers mark what it wrote.  The vhost-user-blk export uses it for
    #: requests spread over several guest buffers.
    writev = None

    #: ``direct_io(offset, buf, write, fua=False) -> (fd, file_offset, done) | None``, or
    #: None.  When a driver offers it, the bytes of ``offset`` .. ``offset + len(buf)`` of
    #: the node are bytes ``file_offset`` .. of the O_DIRECT file ``fd`` as they are, and the
    #: caller may move them with its own asynchronous read or write of ``buf`` (native AIO,
    #: which takes ``buf`` as it is: it must stay alive and unchanged until then), then calls
    #: ``done()`` once it finished (whether it succeeded or not) and before it tells anyone.
    #: It never waits (a write next to a read-modify-write in flight is declined).  None
    #: (for this request): use ``read_into``/``write``.  Offered for O_DIRECT files and raw
    #: over one; writes only where ``write`` would be a plain write of the bytes (as for
    #: ``splice_write``) and only for requests and buffers aligned as O_DIRECT needs.  The
    #: dirty-bitmap wrappers mark a write in its ``done``; the file's own ``done`` ends the
    #: write's place among overlapping requests.  A FUA write (``fua``) taken is the
    #: caller's to make durable before it tells anyone: ``fdatasync(fd)`` after it finished
    #: (one may cover several).  Not ``RWF_DSYNC`` on an asynchronous write: some file
    #: systems ignore it there (FUSE, Linux 6.18).  The NBD data path uses it
    #: (exports/nbd_conn.py).
    direct_io = None

    def memory_io(self) -> bool:
        """Whether reads and writes are memory copies (page cache, no waiting on a device or
        the network), so a data path may serve them inline instead of handing them to a
        thread: true for a buffered plain file (one that offers ``file_range``)."""
        return self.file_range(0, 0) is not None

    def memory_sync(self) -> bool:
        """Whether ``flush`` and FUA writes wait on nothing (no device cache to empty: the
        node's data lives in memory, or ``cache.no-flush=on``), so a data path may serve
        them inline like memory copies.  False unless a driver knows better."""
        return False

    # ---- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Release the node's resources (fds, locks) and its holds on its children.  The
        graph calls it on blockdev-del; the hot methods raise EBADF afterwards."""
        if self.closed:
            return
        self.closed = True
        for att in list(self._child_atts.values()):
            att.detach()
        self._close()
        self._unhooked = None
        self._recording = ()
        for name in ("read_into", "write", "write_zeroes", "discard", "flush",
                     "block_status", "allocation_depth", "cache"):
            setattr(self, name, _closed)
        self.file_range = lambda offset, length: None
        self.splice_write = None
        self.direct_io = None

    def _close(self) -> None:
        """Driver hook: release fds etc."""

    # ---- dirty bitmaps ---------------------------------------------------------------------

    def find_dirty_bitmap(self, name: str):
        return self.dirty_bitmaps.get(name)

    def _dirty_bitmaps_changed(self) -> None:
        """Call after adding, removing, enabling or disabling a bitmap of this node."""
        self._recording = tuple(bm for bm in self.dirty_bitmaps.values() if bm.enabled)
        self._update_write_hooks()
        for listener in tuple(self.bitmap_listeners):
            listener()

    def _update_write_hooks(self) -> None:
        """Install or remove the marking wrappers: wanted while the node has enabled bitmaps
        or a user that may write (so that a write in flight when a bitmap appears marks it)."""
        if self.closed:
            return
        want = bool(self._recording) or bool(self._perm[0] & (PERM_WRITE | PERM_WRITE_UNCHANGED))
        if want and self._unhooked is None:
            self._hook_writes()
        elif not want and self._unhooked is not None:
            self._unhook_writes()
        else:
            return
        self._notify_io_changed()

    def _hook_writes(self) -> None:
        node = self
        unhooked = {}
        for name in _WRITE_METHODS:
            unhooked[name] = (getattr(self, name), name in self.__dict__)
        write_data = unhooked["write"][0]
        zero_data = unhooked["write_zeroes"][0]
        discard_data = unhooked["discard"][0]
        splice_data = unhooked["splice_write"][0]
        writev_data = unhooked["writev"][0]
        direct_data = unhooked["direct_io"][0]

        def mark(offset, length):
            # The request as the driver performs it: padded to the alignment (QEMU marks the
            # aligned request too).
            align = node.request_alignment
            if align > 1:
                end = -(-(offset + length) // align) * align
                offset -= offset % align
                length = end - offset
            for bm in node._recording:
                bm.mark(offset, length)

        def write(offset, buf, fua=False):
            n = len(buf)
            try:
                return write_data(offset, buf, fua)
            finally:
                if node._recording:
                    mark(offset, n)

        def write_zeroes(offset, length, may_unmap=False, fast=False, fua=False):
            try:
                return zero_data(offset, length, may_unmap, fast, fua)
            finally:
                if node._recording:
                    mark(offset, length)

        def discard(offset, length):
            try:
                return discard_data(offset, length)
            finally:
                # Like QEMU: a discard the node ignores (discard=ignore) changes nothing.
                if node._recording and node.discard_mode == "unmap" and not node.read_only:
                    for bm in node._recording:
                        bm.mark(offset, length)

        if splice_data is not None:
            def splice_write(offset, pipe_fd, n):
                try:
                    done = splice_data(offset, pipe_fd, n)
                except BaseException:
                    # a failed splice may have written part of it: mark it all, as write()
                    if node._recording:
                        mark(offset, n)
                    raise
                if done and node._recording:
                    mark(offset, done)
                return done
        else:
            splice_write = None

        if writev_data is not None:
            def writev(offset, bufs):
                try:
                    return writev_data(offset, bufs)
                finally:
                    if node._recording:
                        mark(offset, sum(map(len, bufs)))
        else:
            writev = None

        if direct_data is not None:
            def direct_io(offset, buf, write, fua=False):
                target = direct_data(offset, buf, write, fua)
                if target is None or not write:
                    return target
                fd, file_offset, inner_done = target
                n = len(buf)

                def done():
                    try:
                        inner_done()
                    finally:
                        if node._recording:
                            mark(offset, n)
                return fd, file_offset, done
        else:
            direct_io = None

        self._wrappers = (write, write_zeroes, discard, splice_write, writev, direct_io)
        self.write = write
        self.write_zeroes = write_zeroes
        self.discard = discard
        if splice_write is not None:
            self.splice_write = splice_write
        if writev is not None:
            self.writev = writev
        if direct_io is not None:
            self.direct_io = direct_io
        self._unhooked = unhooked

    def _unhook_writes(self) -> None:
        unhooked, self._unhooked = self._unhooked, None
        for name, wrapper in zip(_WRITE_METHODS, self._wrappers):
            if wrapper is None or self.__dict__.get(name) is not wrapper:
                continue  # none installed, or replaced meanwhile (e.g. closed)
            fn, was_attr = unhooked[name]
            if was_attr:
                setattr(self, name, fn)
            else:
                delattr(self, name)
        self._wrappers = ()

    def _rebind_io(self, bind: Callable[[], None]) -> None:
        """Run ``bind()``, which reassigns this node's hot methods, keeping the dirty-bitmap
        wrappers on top; then tell the parents."""
        hooked = self._unhooked is not None
        if hooked:
            self._unhook_writes()
        bind()
        if hooked:
            self._hook_writes()
        self._notify_io_changed()

    def _notify_io_changed(self) -> None:
        for att in list(self._parents):
            if att.parent is not None:
                att.parent._child_io_changed(att.child_name, self)

    def _child_io_changed(self, role: str, child: "BlockNode") -> None:
        """Driver hook: ``child``'s hot methods changed; recapture them if they were
        captured (use :meth:`_rebind_io`)."""

    # ---- permissions -------------------------------------------------------------------

    @property
    def parents(self) -> list[Attachment]:
        """Current holders of this node (users and parent nodes), newest first."""
        return list(self._parents)

    @property
    def users(self) -> list[Attachment]:
        """Holders that are not parent nodes (exports and other block backends)."""
        return [a for a in self._parents if a.parent is None]

    def cumulative_perms(self) -> tuple[int, int]:
        perm = 0
        shared = PERM_ALL
        for a in self._parents:
            perm |= a.perm
            shared &= a.shared
        return perm, shared

    def attach(self, user: str, perm: int, shared: int, child_name: str = "root") -> Attachment:
        """Take ``perm`` on this node, allowing others ``shared``.

        ``user`` is QEMU's description of the user for error messages; an export passes
        ``"an unnamed block device"`` as QEMU 7.2 does for its BlockBackend.  Raises
        :class:`blockexport.errors.Error` with QEMU's text on a conflict (another user does
        not share what we need, or we unshare what another user holds), on a read-only node
        asked for WRITE, or when another process holds a conflicting image lock.
        """
        return self._attach(Attachment(self, user, child_name, perm & PERM_ALL,
                                       shared & PERM_ALL))

    def _attach(self, att: Attachment) -> Attachment:
        with _perm_lock:
            if self.closed:
                raise Error(f"Node '{self.node_name}' is closed")
            self._parents.insert(0, att)
            att.attached = True

            def unlink():
                att.attached = False
                self._parents.remove(att)
            _apply(self, [unlink])
            return att

    def _add_child(self, role: str, child: "BlockNode") -> Attachment:
        """Make ``child`` this node's ``role`` child, taking the permissions
        :meth:`_child_perm` derives from this node's current users."""
        perm, shared = self.cumulative_perms()
        cperm, cshared = self._child_perm(role, perm, shared)
        if child.force_share:
            cshared = PERM_ALL  # QEMU: a force-share child is shared entirely by its parents
        att = Attachment(child, f"node '{self.node_name}'", role, cperm, cshared, parent=self)
        child._attach(att)
        self._child_atts[role] = att
        self.children[role] = child
        return att

    def _child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        """Permissions this node needs on its ``role`` child given its users' cumulative
        ``perm``/``shared``.  Default: a filter (pass everything through)."""
        return perm, shared

    def _set_perm(self, perm: int, shared: int, undo: list) -> None:
        """Driver hook: the node's cumulative permissions change to (perm, shared).  Raise
        :class:`Error` to refuse; append a callable to ``undo`` to revert on a later failure.
        """

    # ---- helpers for drivers ---------------------------------------------------------

    def _detect_zeroes_write(self, write_data):
        """Wrap ``write_data(offset, buf, fua)`` with this node's detect-zeroes policy (only
        call when detect_zeroes != "off")."""
        may_unmap = self.detect_zeroes == "unmap"
        node = self

        def write(offset, buf, fua=False):
            if len(buf) and is_zero(buf):
                node.write_zeroes(offset, len(buf), may_unmap, False, fua)
            else:
                write_data(offset, buf, fua)
        return write

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r} driver={self.driver!r}>"
