"""The qcow2 format node: read and write paths, block status, allocation depth, backing
chains.

Written from the published qcow2 specification (QEMU's ``docs/interop/qcow2.txt``).

Cluster mapping
---------------
Everything the data path does starts with :meth:`Qcow2Node.map` (a closure stored as an
instance attribute, like the other hot methods)::

    n, kind, host = node.map(offset, length)

the longest run ``[offset, offset + n)`` (``0 < n <= length``, never crossing the end of one
cached L2 slice) whose (sub)clusters have the same ``kind``:

* ``K_NORMAL``: data at ``host`` in the ``file`` child, contiguous for the whole run;
* ``K_ZERO``: reads as zeroes (zero flag or zero subclusters, preallocated or not);
* ``K_UNALLOC``: not allocated here: the backing file, or zeroes (``host`` is the
  preallocated host offset of an extended-L2 "unallocated, allocated" subcluster, else 0);
* ``K_COMPRESSED``: one compressed cluster, ``host`` is its raw L2 entry (use
  :meth:`Qcow2Node.read_compressed_cluster`);
* ``K_PAST_END``: past the virtual size (zeroes).

Damaged metadata (an L2 table offset unaligned or past the end of the file, a data cluster
offset unaligned or past the end, invalid extended-L2 bitmaps) raises ``OSError(EIO)`` for
that range only; the rest of the image stays readable.

L1 is an ``array('Q')`` in memory (:attr:`Qcow2Node.l1`, host byte order, entries as on
disk); L2 tables are loaded by slice through
:class:`~blockexport.block.drivers.qcow2.l2cache.L2Cache` (:meth:`Qcow2Node.l2_slice`).

Write path (writable nodes; docs/block-layer.md has the full ordering)
---------------------------------------------------------------------
* ``write``: runs of COPIED (refcount 1) data clusters are overwritten in place with no
  metadata and no lock but the direct-write gate (:meth:`Qcow2Node._drain` waits for the
  writes in flight before a cluster is freed); the rest goes to :meth:`_write_slow` under
  :attr:`meta_lock`: allocate (``RefcountManager.allocate``, increases written at once) and
  mark the guest clusters in flight (``_inflight``; other metadata changes on them wait in
  :meth:`_wait_inflight`), write data and COW without the lock, then set the L2 entries
  (:meth:`_set_entries`) and free what they no longer name under it again.
* L2 updates never modify a cached slice: a new array goes into the cache and into
  ``_l2_dirty`` (pending; :meth:`l2_slice` serves it after an eviction), written back by
  :meth:`_writeback_l2` after a file flush (data and refcounts before L2 entries) at
  ``flush()``, before a refcount decrease is written, or when too many are pending.  A cache
  fill racing with an update is detected by ``_l2_version`` and retried.
* New L2 tables: written and flushed before the L1 entry (``l1`` is updated in place; a new
  L1 or size would need ``self._rebind_io(self._bind)``: :meth:`rewrite_header` does it).
* Public for the other qcow2 code: :attr:`refcounts` (the RefcountManager, None when
  read-only; call it holding :attr:`meta_lock`), :attr:`meta_lock`, :meth:`rewrite_header`,
  :attr:`close_hooks` (run at the start of a clean close, under meta_lock).
* Refcounts are always exact: the dirty bit is never set (lazy_refcounts or not); a dirty
  image is repaired on a writable open.
"""
from __future__ import annotations

import array
import dataclasses
import errno
import os
import struct
import sys
import threading
import zlib

from blockexport.block.drivers.qcow2 import bitmap_glue
from blockexport.block.drivers.qcow2.check import repair_refcounts
from blockexport.block.drivers.qcow2.header import (
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPRESSION_NAMES, COMPRESSION_ZSTD,
    INCOMPAT_DIRTY, OFFSET_MASK, BitmapsExtension, Qcow2Header, header_bytes_needed,
    parse_header, serialize_header,
)
from blockexport.block.drivers.qcow2.l2cache import L2Cache
from blockexport.block.drivers.qcow2.snapshots import (
    Snapshot, find_snapshot_to_load, read_l1_table, read_snapshot_table,
)
from blockexport.block.drivers.qcow2.refcount import RefcountError, RefcountManager
from blockexport.block.node import (
    BS_ALLOCATED, BS_DATA, BS_ZERO, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE,
    PERM_WRITE_UNCHANGED, ZERO_PAGES, BlockNode, is_zero, zero_fill,
)
from blockexport.block.probe import PROBE_BUF_SIZE, probe_format, protocol_options
from blockexport.errors import Error
from blockexport.util.cutils import SIZE_HINT

K_NORMAL = 0
K_ZERO = 1
K_UNALLOC = 2
K_COMPRESSED = 3
K_PAST_END = 4

KIND_NAMES = ("normal", "zero", "unallocated", "compressed", "past-end")

L2E_COMPRESSED = 1 << 62
L2E_COPIED = 1 << 63
L2E_ZERO = 1

#: QEMU's defaults (block/qcow2.h): the L2 cache covers the whole disk up to 32 MiB of it.
DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024
MIN_L2_CACHE_SIZE = 2           # slices
MIN_REFCOUNT_CACHE_SIZE = 4     # clusters

#: pending (not yet written) L2 slices before a write-back is forced
MAX_DIRTY_L2_SLICES = 32
_SKIP = object()                # a COW piece whose data is in place already

_LITTLE = sys.byteorder == "little"
_opening = threading.local()    # realpaths of the qcow2 images being opened (cycle check)


def _eio(msg: str = "") -> OSError:
    return OSError(errno.EIO, msg or os.strerror(errno.EIO))


def _run_of_ones(m: int) -> int:
    """Number of consecutive 1 bits at the bottom of ``m``."""
    return ((~m) & (m + 1)).bit_length() - 1


class Qcow2Node(BlockNode):
    driver = "qcow2"
    is_protocol = False

    def __init__(self, graph, node_name: str, options: dict):
        super().__init__(node_name, options)
        child = graph.open_child(self, "file", options["file"], options)
        if not self.read_only and child.read_only and self.auto_read_only:
            self.read_only = True       # the file fell back to read-only: so do we
        self._add_child("file", child)
        self.file = child
        self.filename = child.filename
        self.backing = None
        #: the backing node came from the image header (not from the ``backing`` option)
        self.backing_from_header = False
        #: serialises metadata changes (allocation, freeing, L1/L2 and header updates)
        self.meta_lock = threading.RLock()
        #: run in order at the start of a clean close of a writable node (under meta_lock)
        self.close_hooks: list = []
        #: the RefcountManager of a writable node, None when read-only
        self.refcounts = None
        self._l2_dirty: dict = {}       # slice key -> [array, lo, hi]: L2 updates to write
        self._l2_lock = threading.Lock()  # orders cache fills against L2 updates
        self.header: Qcow2Header = self._read_header(child)
        self._check_options(options)
        self._setup_geometry()
        self._read_l1()
        self._read_snapshots()
        graph.mark_named()
        self._open_backing(graph, options)
        self._md_prealloc = None        # metadata preallocation, detected on first use
        self._corruption_reported = False
        if not self.read_only:
            self._open_writable()
        self._bind()
        bitmap_glue.attach(self)        # persistent dirty bitmaps (after the node is set up)

    # ---- open ---------------------------------------------------------------------------

    def _read_header(self, child: BlockNode) -> Qcow2Header:
        flen = child.length()
        self._file_length = flen
        try:
            first = bytearray(min(flen, 4096))
            child.read_into(0, memoryview(first))
            need = min(max(header_bytes_needed(first), len(first)), flen)
            if need > len(first):
                buf = bytearray(need)
                child.read_into(0, memoryview(buf))
                first = buf
        except OSError as e:
            raise Error("Could not read qcow2 header: %s" % os.strerror(e.errno)) from None
        self._header_used = len(first)
        return parse_header(bytes(first), flen, writable=not self.read_only)

    def _check_options(self, options: dict) -> None:
        h = self.header
        if "encrypt" in options:
            if not h.crypt_method:
                raise Error("No encryption in image header, but options specified format "
                            "'%s'" % options["encrypt"]["format"])
            raise Error("qcow2 encryption is not supported")
        if "data-file" in options:
            raise Error("'data-file' can only be set for images with an external data file")
        if h.compression_type == COMPRESSION_ZSTD:
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise Error("qcow2: zstd compression needs the Python package 'zstandard', "
                            "which is not installed") from None
        if options.get("lazy-refcounts") and h.version < 3:
            raise Error("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                        "compatibility level")
        cs = h.cluster_size
        interval = options.get("cache-clean-interval", 600)
        if interval < 0 or interval > 0xFFFFFFFF:
            raise Error("Cache clean interval too big")
        entry_size = options.get("l2-cache-entry-size", cs)
        if entry_size < 512 or entry_size > cs or entry_size & (entry_size - 1):
            raise Error("L2 cache entry size must be a power of two between 512 and the "
                        "cluster size (%d)" % cs)
        l2e = 16 if h.extended_l2 else 8
        max_l2_entries = -(-h.size // cs)
        max_l2_cache = -(-(max_l2_entries * l2e) // cs) * cs
        combined = options.get("cache-size")
        l2_set = "l2-cache-size" in options
        rc_set = "refcount-cache-size" in options
        l2_max_setting = options.get("l2-cache-size", DEFAULT_L2_CACHE_MAX_SIZE)
        refcount = options.get("refcount-cache-size", 0)
        for key in ("cache-size", "l2-cache-size", "refcount-cache-size"):
            if options.get(key, 0) < 0:
                raise Error("Parameter '%s' expects a non-negative number below 2^64" % key,
                            hint=SIZE_HINT)
        l2_size = min(max_l2_cache, l2_max_setting)
        min_refcount = MIN_REFCOUNT_CACHE_SIZE * cs
        if combined is not None:
            if l2_set and rc_set:
                raise Error("cache-size, l2-cache-size and refcount-cache-size may not be set "
                            "at the same time")
            if l2_set and l2_max_setting > combined:
                raise Error("l2-cache-size may not exceed cache-size")
            if refcount > combined:
                raise Error("refcount-cache-size may not exceed cache-size")
            if l2_set:
                refcount = combined - l2_size
            elif rc_set:
                l2_size = combined - refcount
            elif combined >= max_l2_cache + min_refcount:
                l2_size = max_l2_cache
                refcount = combined - l2_size
            else:
                refcount = min(combined, min_refcount)
                l2_size = combined - refcount
        slices = max(MIN_L2_CACHE_SIZE, l2_size // entry_size)
        if slices > 0x7FFFFFFF:
            raise Error("L2 cache size too big")
        self.l2_cache_entry_size = entry_size
        self.l2_cache_size = slices * entry_size
        self.l2_cache = L2Cache(slices)

    def _setup_geometry(self) -> None:
        h = self.header
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = 1 << cb
        self.size = h.size
        self.extended_l2 = h.extended_l2
        self.l2_entry_size = 16 if h.extended_l2 else 8
        self.l2_bits = cb - (4 if h.extended_l2 else 3)       # entries per L2 table, log2
        slice_entries = self.l2_cache_entry_size // self.l2_entry_size
        self.slice_bits = slice_entries.bit_length() - 1       # entries per slice, log2
        self.subcluster_bits = cb - 5 if h.extended_l2 else cb
        self.compression_type = COMPRESSION_NAMES[h.compression_type]

    def _read_l1(self) -> None:
        h = self.header
        n = h.l1_size
        buf = bytearray(n * 8)
        if n:
            try:
                self.file.read_into(h.l1_table_offset, memoryview(buf))
            except OSError as e:
                raise Error("Could not read L1 table: %s" % os.strerror(e.errno)) from None
        l1 = array.array("Q", buf)
        if _LITTLE:
            l1.byteswap()
        self.l1 = l1

    def _read_file(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.file.read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_snapshots(self) -> None:
        h = self.header
        try:
            self.snapshots = read_snapshot_table(self._read_file, h.snapshots_offset,
                                                 h.nb_snapshots, self._file_length, h.size)
        except OSError as e:
            raise Error("Failed to read snapshot table: %s" % os.strerror(e.errno)) from None

    def load_snapshot(self, snapshot_id: str | None = None, name: str | None = None, *,
                      id_or_name: str | None = None) -> Snapshot:
        """Serve the internal snapshot instead of the active image from now on (QEMU's
        bdrv_snapshot_load_tmp, what ``qemu-nbd -l`` does): the node must be read-only;
        its L1 table is switched to the snapshot's.  As in QEMU the virtual size stays the
        image's current one (a snapshot taken before a resize reads as unallocated past its
        own L1 table).  Raises :class:`Error` with QEMU's messages."""
        if id_or_name is None and snapshot_id is None and name is None:
            raise Error("snapshot_id and name are both NULL")
        if not self.read_only:
            raise Error("Device is not readonly")
        sn = find_snapshot_to_load(self.snapshots, snapshot_id, name, self.cluster_size,
                                   self.file.length(), id_or_name=id_or_name)
        needed = -(-self.size // (1 << (self.cluster_bits + self.l2_bits)))
        self.l1 = read_l1_table(self._read_file, sn, needed)
        self.loaded_snapshot = sn
        self._bind()
        return sn

    loaded_snapshot = None

    # ---- backing chain --------------------------------------------------------------------

    def _open_backing(self, graph, options: dict) -> None:
        if "backing" in options:
            ref = options["backing"]
            if ref is None:
                return
            if isinstance(ref, dict):
                ref = dict(ref)
                ref.setdefault("read-only", True)
            try:
                child = graph.open_child(self, "backing", ref, options)
            except Error as e:
                raise Error("Could not open backing file: %s" % e, e.qmp_class) from None
            self._attach_backing(child)
            return
        name = self.header.backing_file
        if name is None:
            return
        full = self.full_backing_filename()
        stack = getattr(_opening, "paths", None)
        if stack is None:
            stack = _opening.paths = []
        me = self._real_path()
        if me is not None:
            stack.append(me)
        try:
            real = os.path.realpath(full) if not _has_protocol(full) else None
            if real is not None and real in stack:
                raise Error("Backing file '%s' of '%s' creates a loop in the backing chain"
                            % (name, self.filename))
            fmt = self.header.backing_format
            proto = protocol_options(full)
            if fmt is None:
                fmt = _probe_file(proto)
            opts = {"driver": fmt, "file": proto, "read-only": True}
            try:
                child = graph.open_child(self, "backing", opts, {
                    k: v for k, v in options.items()
                    if k in ("cache", "force-share", "auto-read-only")})
            except Error as e:
                raise Error("Could not open backing file: %s" % e, e.qmp_class) from None
        finally:
            if me is not None:
                stack.pop()
        self._attach_backing(child)
        self.backing_from_header = True

    def _attach_backing(self, child: BlockNode) -> None:
        self._add_child("backing", child)
        self.backing = child

    def _real_path(self):
        f = _bottom_file(self.file)
        if f is not None and f.filename:
            return os.path.realpath(f.filename)
        return None

    def full_backing_filename(self) -> str | None:
        """The header's backing file name resolved as QEMU does: relative to the directory
        of this image's file name, unless absolute or with a protocol prefix."""
        name = self.header.backing_file
        if name is None:
            return None
        if os.path.isabs(name) or _has_protocol(name):
            return name
        # QEMU's bdrv_dirname(): down the file (blkdebug: image) children to a file node
        f = _bottom_file(self.file)
        if f is None or _has_protocol(f.filename or ""):
            raise Error("Cannot generate a base directory for %s nodes" % self.file.driver)
        return os.path.join(os.path.dirname(f.filename), name)

    # ---- permissions --------------------------------------------------------------------

    def _child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        if role == "backing":
            # QEMU's COW child: consistent read if the parent reads; writes shared only
            # when the parent shares them.
            perm &= PERM_CONSISTENT_READ
            nshared = (PERM_WRITE | PERM_RESIZE) if shared & PERM_WRITE else 0
            return perm, nshared | PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
        # metadata and data child: always consistent read; never shared for writing or
        # resizing.  A writable node takes WRITE | RESIZE: QEMU's format drivers may update
        # metadata without a guest write.
        if not self.read_only:
            perm |= PERM_WRITE | PERM_RESIZE
        if perm & PERM_WRITE_UNCHANGED:
            perm |= PERM_WRITE
        if perm & PERM_WRITE:
            perm |= PERM_RESIZE
        return perm | PERM_CONSISTENT_READ, shared & ~(PERM_WRITE | PERM_RESIZE)

    # ---- metadata access -------------------------------------------------------------------

    def _corruption(self, msg: str) -> OSError:
        if not self._corruption_reported:
            self._corruption_reported = True
            sys.stderr.write("qcow2: Image is corrupt: %s; further non-fatal corruption "
                             "events will be suppressed\n" % msg)
            sys.stderr.flush()
        return _eio(msg)

    def l2_slice(self, l2_offset: int, slice_index: int, l1_index: int = -1):
        """Slice ``slice_index`` of the L2 table at ``l2_offset`` (an ``array('Q')`` of the
        entries in host order, never modified once cached: replace it; with
        extended L2 entries, entry and bitmap interleaved).  EIO when the table offset is
        unaligned or past the end of the file."""
        key = l2_offset + slice_index * self.l2_cache_entry_size
        t = self.l2_cache.get(key)
        if t is not None:
            return t
        d = self._l2_dirty.get(key)
        if d is not None:               # updated, not written yet, evicted from the cache
            t = d[0]
            self.l2_cache.put(key, t)
            return t
        if l2_offset & (self.cluster_size - 1):
            raise self._corruption("L2 table offset %#x unaligned (L1 index: %#x)"
                                   % (l2_offset, l1_index))
        size = self.l2_cache_entry_size
        if key + size > self.file.length():
            raise self._corruption("L2 table offset %#x past the end of the image file "
                                   "(L1 index: %#x)" % (l2_offset, l1_index))
        while True:
            version = self._l2_version
            buf = bytearray(size)
            debug = getattr(self.file, "debug_event", None)
            if debug is not None:
                debug("l2_load")
            self.file.read_into(key, memoryview(buf))
            # an array of 64-bit ints: as compact as the table on disk (a tuple of Python
            # ints would take five times the memory the cache size promises)
            t = array.array("Q", buf)
            if _LITTLE:
                t.byteswap()
            with self._l2_lock:
                if self._l2_version == version:
                    self.l2_cache.put(key, t)
                    return t
                # an L2 update ran meanwhile: what we read may be stale
                d = self._l2_dirty.get(key)
                if d is not None:
                    return d[0]
                t = self.l2_cache.get(key)
                if t is not None:
                    return t

    _l2_version = 0

    def read_compressed_cluster(self, entry: int) -> bytes:
        """The decompressed contents (one cluster) of the compressed cluster whose L2 entry
        is ``entry``."""
        last = self._last_compressed
        if last[0] == entry:
            return last[1]
        cb = self.cluster_bits
        x = 62 - (cb - 8)
        coff = entry & ((1 << x) - 1)
        nsec = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
        csize = nsec * 512 - (coff & 511)
        flen = self.file.length()
        if coff >= flen:
            raise self._corruption("Compressed cluster at %#x past the end of the image file"
                                   % coff)
        csize = min(csize, flen - coff)
        buf = bytearray(csize)
        debug = getattr(self.file, "debug_event", None)
        if debug is not None:
            debug("read_compressed")
        self.file.read_into(coff, memoryview(buf))
        cs = self.cluster_size
        try:
            if self.compression_type == "zstd":
                import zstandard
                out = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(buf))
            else:
                out = zlib.decompressobj(-12).decompress(bytes(buf), cs)
        except Exception:
            raise _eio("could not decompress the cluster at %#x" % coff) from None
        if len(out) < cs:
            raise _eio("could not decompress the cluster at %#x" % coff)
        out = out[:cs]
        self._last_compressed = (entry, out)
        return out

    _last_compressed = (-1, b"")

    # ---- hot paths ----------------------------------------------------------------------

    def _bind(self) -> None:
        node = self
        size = self.size
        cb = self.cluster_bits
        cs = 1 << cb
        cmask = cs - 1
        l1 = self.l1
        l1_shift = cb + self.l2_bits
        slice_bits = self.slice_bits
        slice_shift = cb + slice_bits
        slice_mask = (1 << slice_bits) - 1
        slices_mask = (1 << (self.l2_bits - slice_bits)) - 1
        cache_get = self.l2_cache.get
        l2_slice = self.l2_slice
        file = self.file
        extended = self.extended_l2
        sc_bits = self.subcluster_bits
        OFF = OFFSET_MASK
        COMP = L2E_COMPRESSED

        def check_host(host, offset):
            if host & cmask:
                raise node._corruption("Cluster allocation offset %#x unaligned (guest "
                                       "offset %#x)" % (host, offset))
            if host >= file.length():
                raise node._corruption("Cluster allocation offset %#x past the end of the "
                                       "image file (guest offset %#x)" % (host, offset))

        def map_standard(offset, length):
            if offset >= size:
                return length, K_PAST_END, 0
            end = offset + length
            if end > size:
                end = size
            l1i = offset >> l1_shift
            slice_end = ((offset >> slice_shift) + 1) << slice_shift
            if end > slice_end:
                end = slice_end
            l2off = l1[l1i] & OFF
            if not l2off:
                return end - offset, K_UNALLOC, 0
            sidx = (offset >> slice_shift) & slices_mask
            t = cache_get(l2off + (sidx << (slice_bits + 3)))
            if t is None:
                t = l2_slice(l2off, sidx, l1i)
            i = (offset >> cb) & slice_mask
            e = t[i]
            in_cl = offset & cmask
            pos = offset - in_cl + cs
            if e & COMP:
                return (pos if pos < end else end) - offset, K_COMPRESSED, e
            host = e & OFF
            if e & L2E_ZERO:
                while pos < end:
                    i += 1
                    e = t[i]
                    if e & COMP or not e & L2E_ZERO:
                        break
                    pos += cs
                return (pos if pos < end else end) - offset, K_ZERO, 0
            if not host:
                while pos < end:
                    i += 1
                    if t[i] & (COMP | L2E_ZERO | OFF):
                        break
                    pos += cs
                return (pos if pos < end else end) - offset, K_UNALLOC, 0
            check_host(host, offset)
            expect = host
            while pos < end:
                i += 1
                e = t[i]
                expect += cs
                if e & (COMP | L2E_ZERO) or e & OFF != expect:
                    break
                pos += cs
            n = (pos if pos < end else end) - offset
            if pos > offset + cs:
                check_host(host + ((n + in_cl - 1) & ~cmask), offset)
            return n, K_NORMAL, host + in_cl

        def sc_kind(e, b, offset):
            """(kind, run-bitmask of the kind's subclusters) of a standard extended entry."""
            host = e & OFF
            alloc = b & 0xFFFFFFFF
            zero = b >> 32
            if alloc & zero or (alloc and not host):
                raise node._corruption("Invalid cluster entry found (L2 entry %#x, bitmap "
                                       "%#x, guest offset %#x)" % (e, b, offset))
            return host, alloc, zero

        def map_extended(offset, length):
            if offset >= size:
                return length, K_PAST_END, 0
            end = offset + length
            if end > size:
                end = size
            l1i = offset >> l1_shift
            slice_end = ((offset >> slice_shift) + 1) << slice_shift
            if end > slice_end:
                end = slice_end
            l2off = l1[l1i] & OFF
            if not l2off:
                return end - offset, K_UNALLOC, 0
            sidx = (offset >> slice_shift) & slices_mask
            t = cache_get(l2off + (sidx << (slice_bits + 4)))
            if t is None:
                t = l2_slice(l2off, sidx, l1i)
            i = ((offset >> cb) & slice_mask) << 1
            e = t[i]
            b = t[i + 1]
            in_cl = offset & cmask
            if e & COMP:
                if b:
                    raise node._corruption("Invalid cluster entry found (L2 entry %#x, "
                                           "bitmap %#x)" % (e, b))
                pos = offset - in_cl + cs
                return (pos if pos < end else end) - offset, K_COMPRESSED, e
            host, alloc, zero = sc_kind(e, b, offset)
            sci = in_cl >> sc_bits
            if (alloc >> sci) & 1:
                kind, bits = K_NORMAL, alloc
                check_host(host, offset)
            elif (zero >> sci) & 1:
                kind, bits = K_ZERO, zero
            else:
                kind, bits = K_UNALLOC, ~(alloc | zero) & 0xFFFFFFFF
            run = _run_of_ones(bits >> sci)
            pos = offset - in_cl + ((sci + run) << sc_bits)
            first_host = host
            expect = host
            while run + sci == 32 and pos < end:
                # the run reaches the end of the cluster: continue into the next one
                i += 2
                e = t[i]
                b = t[i + 1]
                if e & COMP:
                    break
                h2, alloc, zero = sc_kind(e, b, pos)
                if kind == K_NORMAL:
                    expect += cs
                    if h2 != expect:
                        break
                    bits = alloc
                elif kind == K_ZERO:
                    bits = zero
                else:
                    bits = ~(alloc | zero) & 0xFFFFFFFF
                sci = 0
                run = _run_of_ones(bits)
                if not run:
                    break
                pos += run << sc_bits
            n = (pos if pos < end else end) - offset
            if kind == K_NORMAL:
                if n + in_cl > cs:
                    check_host(first_host + ((n + in_cl - 1) & ~cmask), offset)
                return n, K_NORMAL, first_host + in_cl
            return n, kind, 0

        mapf = map_extended if extended else map_standard
        self.map = mapf
        zero_kinds = (K_ZERO, K_PAST_END)
        debug = getattr(file, "debug_event", None)    # blkdebug below: QEMU's events

        def read_into(offset, buf):
            mv = memoryview(buf)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            total = len(mv)
            pos = 0
            while pos < total:
                off = offset + pos
                n, kind, host = mapf(off, total - pos)
                if kind == K_NORMAL:
                    if debug is not None:
                        debug("read_aio")
                    file.read_into(host, mv[pos:pos + n])
                elif kind in zero_kinds:
                    zero_fill(mv[pos:pos + n])
                elif kind == K_UNALLOC:
                    backing = node.backing
                    if backing is None:
                        zero_fill(mv[pos:pos + n])
                    else:
                        blen = backing.length()
                        k = blen - off if off < blen else 0
                        if k > n:
                            k = n
                        if k:
                            if debug is not None:
                                debug("read_backing_aio")
                            backing.read_into(off, mv[pos:pos + k])
                        if k < n:
                            zero_fill(mv[pos + k:pos + n])
                else:
                    data = node.read_compressed_cluster(host)
                    start = off & cmask
                    mv[pos:pos + n] = data[start:start + n]
                pos += n

        def layer_status(offset, length):
            """This image's own status, its backing chain not consulted (QEMU's
            bdrv_co_block_status() on this node alone): what a raw node on top sees."""
            n, kind, host = mapf(offset, length)
            if kind != K_UNALLOC:
                return block_status(offset, length)
            backing = node.backing
            if backing is None or offset >= backing.length():
                return n, BS_ZERO
            return n, 0

        def block_status(offset, length):
            n, kind, host = mapf(offset, length)
            if kind == K_NORMAL:
                if node._md_prealloc is None:
                    node._md_prealloc = node._detect_metadata_preallocation()
                if node._md_prealloc:
                    fn, fst = file.block_status(host, n)
                    if fst & BS_ZERO:
                        if host + fn < file.length():
                            n = fn
                        return n, BS_DATA | BS_ZERO | BS_ALLOCATED
                    return fn, BS_DATA | BS_ALLOCATED
                return n, BS_DATA | BS_ALLOCATED
            if kind == K_COMPRESSED:
                return n, BS_DATA | BS_ALLOCATED
            if kind == K_ZERO:
                return n, BS_ZERO | BS_ALLOCATED
            if kind == K_PAST_END:
                return n, BS_ZERO
            backing = node.backing
            if backing is None:
                return n, BS_ZERO
            blen = backing.length()
            if offset >= blen:
                return n, BS_ZERO
            if n > blen - offset:
                n = blen - offset
            bn, st = backing.block_status(offset, n)
            return bn, st

        def allocation_depth(offset, length):
            n, kind, _ = mapf(offset, length)
            if kind == K_PAST_END:
                return n, 0
            if kind != K_UNALLOC:
                return n, 1
            backing = node.backing
            if backing is None:
                return n, 0
            blen = backing.length()
            if offset >= blen:
                # QEMU: zeroes beyond a shorter backing file count as allocated there
                return n, 2
            if n > blen - offset:
                n = blen - offset
            bn, d = backing.allocation_depth(offset, n)
            return bn, (d + 1 if d else 0)

        def file_range(offset, length):
            if debug is not None:
                return None
            n, kind, host = mapf(offset, length)
            if kind == K_NORMAL and n == length:
                return file.file_range(host, length)
            return None

        self.read_into = read_into
        self.block_status = block_status
        self.layer_status = layer_status
        self.allocation_depth = allocation_depth
        self.file_range = file_range
        if node.refcounts is not None:
            self._bind_write(mapf, cache_get, l2_slice, check_host)
        else:
            self.splice_write = None

    def _bind_write(self, mapf, cache_get, l2_slice, check_host) -> None:
        """The write hot path: a run of clusters that are allocated here with the COPIED
        flag (refcount 1) is overwritten in place with no metadata and no lock but the
        direct-write gate (two short lock holds, so that a cluster being freed is not
        reused while a write that looked it up is in flight); everything else goes to
        :meth:`_write_slow` under :attr:`meta_lock`."""
        node = self
        size = self.size
        cb = self.cluster_bits
        cs = 1 << cb
        cmask = cs - 1
        l1 = self.l1
        l1_shift = cb + self.l2_bits
        slice_bits = self.slice_bits
        slice_shift = cb + slice_bits
        slice_mask = (1 << slice_bits) - 1
        slices_mask = (1 << (self.l2_bits - slice_bits)) - 1
        file = self.file
        OFF = OFFSET_MASK
        COPIED = L2E_COPIED
        BAD = L2E_COMPRESSED | L2E_ZERO
        WANT = COPIED | L2E_COMPRESSED | L2E_ZERO | OFF
        gate = self._gate
        gate_lock = self._gate_lock
        gate_cond = self._gate_cond
        slow = self._write_slow

        if self.extended_l2:
            ent_shift = slice_bits + 4

            def wmap(offset, length):
                n, kind, host = mapf(offset, length)
                if kind != K_NORMAL:
                    return n, 0
                l2off = l1[offset >> l1_shift] & OFF
                sidx = (offset >> slice_shift) & slices_mask
                t = cache_get(l2off + (sidx << ent_shift))
                if t is None:
                    t = l2_slice(l2off, sidx, offset >> l1_shift)
                if not t[((offset >> cb) & slice_mask) << 1] & COPIED:
                    return n, 0
                left = cs - (offset & cmask)
                return (n if n < left else left), host
        else:
            ent_shift = slice_bits + 3

            def wmap(offset, length):
                end = offset + length
                slice_end = ((offset >> slice_shift) + 1) << slice_shift
                if end > slice_end:
                    end = slice_end
                pos = (offset & ~cmask) + cs
                l1i = offset >> l1_shift
                l2off = l1[l1i] & OFF
                if not l2off:
                    return (pos if pos < end else end) - offset, 0
                sidx = (offset >> slice_shift) & slices_mask
                t = cache_get(l2off + (sidx << ent_shift))
                if t is None:
                    t = l2_slice(l2off, sidx, l1i)
                i = (offset >> cb) & slice_mask
                e = t[i]
                host = e & OFF
                if e & BAD or not e & COPIED or not host:
                    return (pos if pos < end else end) - offset, 0
                check_host(host, offset)
                expect = host
                while pos < end:
                    i += 1
                    expect += cs
                    if t[i] & WANT != COPIED | expect:
                        break
                    pos += cs
                n = (pos if pos < end else end) - offset
                if n + (offset & cmask) > cs:
                    check_host(host + ((n + (offset & cmask) - 1) & ~cmask), offset)
                return n, host + (offset & cmask)

        def gate_enter():
            # a direct write starts: count it in the current epoch (see _drain)
            gate_lock.acquire()
            ep = 1 + (gate[0] & 1)
            gate[ep] += 1
            gate_lock.release()
            return ep

        def gate_leave(ep):
            gate_lock.acquire()
            gate[ep] -= 1
            if gate[3] and not gate[ep]:
                gate_cond.notify_all()
            gate_lock.release()

        def write(offset, buf, fua=False):
            tb = type(buf)
            if tb is not bytes and tb is not bytearray:
                if tb is not memoryview:
                    buf = memoryview(buf)
                if buf.format != "B" or buf.ndim != 1:
                    buf = buf.cast("B")
            total = len(buf)
            if offset + total > size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if not total:
                return
            # the common case: one run of allocated clusters, the caller's buffer as is
            ep = gate_enter()
            try:
                n, host = wmap(offset, total)
                if host and n == total:
                    file.write(host, buf)
            finally:
                gate_leave(ep)
            if host and n == total:
                if fua:
                    node.flush()
                return
            mv = memoryview(buf)
            pos = 0
            while pos < total:
                ep = gate_enter()
                try:
                    n, host = wmap(offset + pos, total - pos)
                    if host:
                        file.write(host, mv[pos:pos + n])
                finally:
                    gate_leave(ep)
                if host:
                    pos += n
                    continue
                start = pos
                pos += n
                while pos < total:
                    n, host = wmap(offset + pos, total - pos)
                    if host:
                        break
                    pos += n
                slow(offset + start, mv[start:pos])
            if fua:
                node.flush()

        def splice_write(offset, pipe_fd, n):
            # the in-place case of write() only, from a pipe: 0 where anything else is due
            fsplice = file.splice_write
            if fsplice is None or offset + n > size:
                return 0
            ep = gate_enter()
            try:
                k, host = wmap(offset, n)
                return fsplice(host, pipe_fd, k) if host else 0
            finally:
                gate_leave(ep)

        self._write_data = write
        if self.detect_zeroes != "off":
            self.write = self._detect_zeroes_write(write)
            self.splice_write = None
        else:
            self.write = write
            self.splice_write = splice_write

    # ---- metadata preallocation (QEMU's detection, for block status) --------------------

    def _detect_metadata_preallocation(self) -> bool:
        """QEMU's heuristic: far more clusters have a refcount than the file has allocated
        blocks, so the image was created with preallocation=metadata and the file's holes
        inside "allocated" clusters read as zeroes (block status then recurses into the
        file).  Refcounts are only read here, never changed."""
        f = self.file
        try:
            allocated = os.stat(f.filename).st_blocks * 512 if f.driver == "file" else None
        except OSError:
            allocated = None
        if allocated is None:
            return False
        try:
            return _count_refcounted(self, allocated)
        except OSError:
            return False

    # ---- write path ---------------------------------------------------------------------

    def _open_writable(self) -> None:
        h = self.header
        self._io = io = _FileIO(self.file)
        self._gate_lock = threading.Lock()
        self._gate_cond = threading.Condition(self._gate_lock)
        # [epoch, direct writes in flight started in an even epoch, ... odd epoch, waiters]
        self._gate = [0, 0, 0, 0]
        #: guest clusters whose allocating write is writing data (metadata changes wait)
        self._inflight: dict = {}
        self._alloc_cond = threading.Condition(self.meta_lock)
        self._l1_shift = self.cluster_bits + self.l2_bits
        self._slice_shift = self.cluster_bits + self.slice_bits
        self._slices_mask = (1 << (self.l2_bits - self.slice_bits)) - 1
        try:
            self.refcounts = RefcountManager(
                io, cluster_bits=h.cluster_bits, refcount_order=h.refcount_order,
                table_offset=h.refcount_table_offset,
                table_clusters=h.refcount_table_clusters, file_length=self.file.length(),
                on_table_moved=self._reftable_moved,
                before_decrease_write=self._before_decrease, defer_frees=True)
        except RefcountError as e:
            raise Error("Could not open the refcount table: %s" % e) from None
        changes = {}
        if h.dirty:
            self._repair_dirty()
            changes["incompatible_features"] = h.incompatible_features & ~INCOMPAT_DIRTY
        unknown = h.autoclear_features & ~(AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW)
        if unknown:
            changes["autoclear_features"] = h.autoclear_features & ~unknown
        if changes:
            self.rewrite_header(**changes)

    def _metadata_ranges(self):
        """(extra_ranges, snapshot_l1s) for check/repair: the snapshot table and each
        snapshot's L1 table, the bitmap directory and the bitmaps' clusters."""
        h = self.header
        io = self._io
        extra = []
        snaps = []
        if h.nb_snapshots:
            off = start = h.snapshots_offset
            for _ in range(h.nb_snapshots):
                raw = io.pread(off, 40)
                if len(raw) < 40:
                    raise Error("Could not read the snapshot table")
                l1o, l1s, idl, nl = struct.unpack_from(">QIHH", raw)
                extra_size = struct.unpack_from(">I", raw, 36)[0]
                snaps.append((l1o, l1s))
                off = (off + 40 + extra_size + idl + nl + 7) & ~7
            extra.append((start, off - start))
        if h.bitmaps is not None:
            from blockexport.block.drivers.qcow2 import bitmaps as _bm
            b = h.bitmaps
            try:
                infos = _bm.read_directory(
                    io, ext_nb_bitmaps=b.nb_bitmaps, ext_dir_size=b.directory_size,
                    ext_dir_offset=b.directory_offset, cluster_size=self.cluster_size,
                    disk_size=h.size, file_size=self.file.length())
                extra.append((b.directory_offset, b.directory_size))
                for info in infos:
                    extra.extend(_bm.bitmap_clusters(io, info, cluster_size=self.cluster_size))
            except Error:
                pass
        return extra, snaps

    def _repair_dirty(self) -> None:
        """Lazy refcounts left the image dirty: repair the refcounts (QEMU does the same on
        a writable open)."""
        h = self.header
        extra, snaps = self._metadata_ranges()
        try:
            repair_refcounts(
                self._io, cluster_bits=h.cluster_bits, refcount_order=h.refcount_order,
                refcount_table_offset=h.refcount_table_offset,
                refcount_table_clusters=h.refcount_table_clusters,
                l1_offset=h.l1_table_offset, l1_size=h.l1_size,
                on_table_moved=self._reftable_moved, extended_l2=h.extended_l2,
                extra_ranges=extra, nb_snapshots=h.nb_snapshots,
                snapshot_l1s=snaps if h.nb_snapshots else None, manager=self.refcounts)
        except RefcountError as e:
            raise Error("Could not repair dirty image: %s" % e) from None
        self._read_l1()                 # COPIED flags may have been rewritten
        self.l2_cache.clear()

    def _reftable_moved(self, table_offset: int, table_clusters: int) -> None:
        self._io.pwrite(48, struct.pack(">QI", table_offset, table_clusters))
        self._io.flush()
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters

    def _before_decrease(self) -> None:
        # the L2/L1 updates that dropped references are durable before a lowered refcount
        self._writeback_l2()
        self.file.flush()

    def rewrite_header(self, **changes) -> None:
        """Rewrite the header cluster with ``changes`` applied (``incompatible_features``,
        ``autoclear_features``, ``compatible_features``, ``bitmaps_ext`` (an extension object
        or None to drop it), ``size``, ``l1_offset``, ``l1_size``), keeping every other field,
        unknown header extensions, the feature-name table and the backing file name/format:
        one write, then a flush.  :class:`Error` when it does not fit in the first
        cluster."""
        names = {"incompatible_features": "incompatible_features",
                 "autoclear_features": "autoclear_features",
                 "compatible_features": "compatible_features",
                 "bitmaps_ext": "bitmaps", "size": "size",
                 "l1_offset": "l1_table_offset", "l1_size": "l1_size"}
        if self.refcounts is None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        with self.meta_lock:
            h = dataclasses.replace(self.header, extensions=list(self.header.extensions),
                                    feature_names=dict(self.header.feature_names))
            for k, v in changes.items():
                if k not in names:
                    raise TypeError("rewrite_header: unknown field %r" % k)
                if k == "bitmaps_ext" and v is not None and not hasattr(v, "directory_size"):
                    v = BitmapsExtension(v.nb_bitmaps, v.dir_size, v.dir_offset)
                setattr(h, names[k], v)
            buf = serialize_header(h, self.cluster_size)
            used = len(buf)
            pad = min(self.cluster_size, (max(used, self._header_used) + 511) & ~511)
            self.file.write(0, buf + bytes(pad - used))
            self.file.flush()
            self._header_used = used
            self.header = h
            if "l1_offset" in changes or "l1_size" in changes or "size" in changes:
                # hot closures capture size and l1
                self.size = h.size
                if "l1_offset" in changes or "l1_size" in changes:
                    self._read_l1()
                self._rebind_io(self._bind)

    def _drain(self) -> None:
        """Wait until every direct (in-place) write that may have looked up a mapping
        before now has completed: after an L2 update that drops a cluster, before the
        cluster is freed (and could be reused for another guest offset)."""
        with self._gate_cond:
            g = self._gate
            old = g[0] & 1
            g[0] += 1
            g[3] += 1
            try:
                while g[1 + old]:
                    self._gate_cond.wait()
            finally:
                g[3] -= 1

    def _bad_host(self, host: int, guest: int) -> OSError:
        return self._corruption("Cluster allocation offset %#x unaligned (guest offset %#x)"
                                % (host, guest))

    def _get_entry(self, gc: int):
        """(L2 entry, bitmap) of the cluster at guest offset ``gc`` (0, 0 without a table)."""
        l1i = gc >> self._l1_shift
        l2off = self.l1[l1i] & OFFSET_MASK
        if not l2off:
            return 0, 0
        sidx = (gc >> self._slice_shift) & self._slices_mask
        t = self.l2_slice(l2off, sidx, l1i)
        i = (gc >> self.cluster_bits) & ((1 << self.slice_bits) - 1)
        if self.extended_l2:
            return t[2 * i], t[2 * i + 1]
        return t[i], 0

    def _ensure_l2(self, l1i: int) -> int:
        """The offset of a writable (COPIED) L2 table for L1 index ``l1i``: a new zeroed
        table, or a copy of a shared one.  Order: table written, refcount raised, flush,
        then the L1 entry."""
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        if off and e & L2E_COPIED:
            return off
        cs = self.cluster_size
        new = self.refcounts.allocate(1)
        if off:
            parts = []
            for sidx in range(self._slices_mask + 1):
                t = array.array("Q", self.l2_slice(off, sidx, l1i))
                if _LITTLE:
                    t.byteswap()
                parts.append(t.tobytes())
            content = b"".join(parts)
        else:
            content = bytes(cs)
        self.file.write(new, content)
        self.file.flush()
        with self._l2_lock:
            for sidx in range(self._slices_mask + 1):
                self.l2_cache.discard(new + sidx * self.l2_cache_entry_size)
            self._l2_version += 1
        self.file.write(self.header.l1_table_offset + 8 * l1i,
                        struct.pack(">Q", new | L2E_COPIED))
        self.l1[l1i] = new | L2E_COPIED
        if off:
            self.refcounts.free(off, cs)        # shared: drops to >= 1
        return new

    def _set_entries(self, gc: int, vals) -> None:
        """Set the L2 entries (entry, bitmap) of consecutive clusters from guest offset
        ``gc``: the new slices go to the cache at once and to the file at the next
        write-back (flush, before a refcount decrease, or when many are pending)."""
        ext = self.extended_l2
        step = 2 if ext else 1
        cb = self.cluster_bits
        per_slice = 1 << self.slice_bits
        k = 0
        nvals = len(vals)
        while k < nvals:
            off = gc + (k << cb)
            l1i = off >> self._l1_shift
            l2off = self._ensure_l2(l1i)
            sidx = (off >> self._slice_shift) & self._slices_mask
            key = l2off + sidx * self.l2_cache_entry_size
            nt = array.array("Q", self.l2_slice(l2off, sidx, l1i))
            i = (off >> cb) & (per_slice - 1)
            n = min(nvals - k, per_slice - i)
            for j in range(n):
                e, b = vals[k + j]
                if ext:
                    nt[2 * (i + j)] = e
                    nt[2 * (i + j) + 1] = b
                else:
                    nt[i + j] = e
            lo, hi = i * step, (i + n) * step
            with self._l2_lock:
                d = self._l2_dirty.get(key)
                if d is not None:
                    lo, hi = min(lo, d[1]), max(hi, d[2])
                self._l2_dirty[key] = [nt, lo, hi]
                self.l2_cache.put(key, nt)
                self._l2_version += 1
            k += n
        if len(self._l2_dirty) > MAX_DIRTY_L2_SLICES:
            self._writeback_l2()

    def _writeback_l2(self) -> None:
        """Write the pending L2 updates, after a flush that makes the data and refcounts
        they refer to durable (QEMU's "refcounts before L2" dependency)."""
        with self.meta_lock:
            d = self._l2_dirty
            if not d:
                return
            self.file.flush()
            for key in sorted(d):
                t, lo, hi = d[key]
                part = t[lo:hi]
                if _LITTLE:
                    part.byteswap()
                self.file.write(key + lo * 8, part.tobytes())
                with self._l2_lock:
                    del d[key]

    def _compressed_range(self, e: int):
        """The host byte range QEMU frees for compressed L2 entry ``e``."""
        cb = self.cluster_bits
        x = 62 - (cb - 8)
        coff = e & ((1 << x) - 1)
        nsec = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
        return coff & ~511, nsec * 512

    def _free_old(self, frees, drain: bool) -> None:
        """Drop the references in ``frees`` ((kind, value) pairs: "c" host cluster, "b"
        compressed entry), after the L2 updates that removed them."""
        if not frees:
            return
        if drain:
            self._drain()
        cs = self.cluster_size
        pass_down = self.discard_mode == "unmap"
        for kind, v in frees:
            if kind == "c":
                self.refcounts.free(v, cs)
                if pass_down and not self.refcounts.get(v >> self.cluster_bits):
                    self.file.discard(v, cs)
            else:
                off, length = self._compressed_range(v)
                self.refcounts.free(off, length)

    def _cow_pieces(self, guest: int, length: int, host: int, inplace: bool, out) -> None:
        """Append the (host offset, payload) pieces that give ``[guest, guest + length)``
        its current content at ``host``: bytes, ``None`` for zeroes, ``_SKIP`` when the data
        already is there (in place)."""
        mapf = self.map
        backing = self.backing
        cs = self.cluster_size
        end = guest + length
        pos = guest
        while pos < end:
            n, kind, h = mapf(pos, end - pos)
            if kind == K_NORMAL and inplace:
                out.append((host + pos - guest, n, _SKIP))
            elif kind in (K_ZERO, K_PAST_END) or (kind == K_UNALLOC and (
                    backing is None or pos >= backing.length())):
                out.append((host + pos - guest, n, None))
            else:
                buf = bytearray(n)
                if kind == K_NORMAL:
                    self.file.read_into(h, memoryview(buf))
                elif kind == K_COMPRESSED:
                    data = self.read_compressed_cluster(h)
                    start = pos & (cs - 1)
                    buf[:] = data[start:start + n]
                else:
                    self.read_into(pos, buf)
                out.append((host + pos - guest, n, None if is_zero(buf) else buf))
            pos += n

    def _write_slow(self, offset: int, mv) -> None:
        """Writes that need metadata: allocation, COW, zero/compressed/shared clusters.

        Planning and allocation under :attr:`meta_lock`; the clusters are then marked in
        flight (every other metadata change touching them waits: two writes to one
        unallocated cluster can't both allocate), data and COW are written without the
        lock, and the L2 entries are set and old references dropped under it again."""
        cs = self.cluster_size
        cmask = cs - 1
        ext = self.extended_l2
        scb = self.subcluster_bits
        OFF = OFFSET_MASK
        total = len(mv)
        c0 = offset >> self.cluster_bits
        c1 = (offset + total - 1) >> self.cluster_bits
        with self._alloc_cond:
            self._wait_inflight(c0, c1)
            plans = []
            pos = 0
            while pos < total:
                off = offset + pos
                gc = off & ~cmask
                a = off - gc
                b = min(cs, a + total - pos)
                e, bm = self._get_entry(gc)
                host = e & OFF
                if host & cmask and not e & L2E_COMPRESSED:
                    raise self._bad_host(host, gc)
                free = None
                if ext:
                    s0, s1 = a >> scb, (b - 1) >> scb
                    touched = ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1)
                    ws, we = s0 << scb, (s1 + 1) << scb
                    if e & L2E_COMPRESSED:
                        target, ws, we, free = 0, 0, cs, ("b", e)
                        nb = 0xFFFFFFFF
                    else:
                        alloc, zero = bm & 0xFFFFFFFF, bm >> 32
                        if host and e & L2E_COPIED:
                            target = host
                        elif host:
                            target, ws, we, free = 0, 0, cs, ("c", host)
                        else:
                            target = 0
                        nb = (alloc | touched) | ((zero & ~touched) << 32)
                else:
                    ws, we, nb = 0, cs, 0
                    if e & L2E_COMPRESSED:
                        target, free = 0, ("b", e)
                    elif host and e & L2E_COPIED:
                        target = host
                    elif host:
                        target, free = 0, ("c", host)
                    else:
                        target = 0
                plans.append([gc, a, b, pos, target, ws, we, nb, free, e, bm, False])
                pos += b - a
            # allocate runs of new clusters, contiguous where possible
            flen = self.file.length()
            i = 0
            while i < len(plans):
                if plans[i][4]:
                    i += 1
                    continue
                j = i
                while j < len(plans) and not plans[j][4]:
                    j += 1
                base = self.refcounts.allocate(j - i)
                for k in range(i, j):
                    plans[k][4] = base + (k - i) * cs
                    plans[k][11] = True         # a new cluster
                i = j
            inflight = self._inflight
            for c in range(c0, c1 + 1):
                inflight[c] = True
        try:
            pieces = []
            new_end = 0
            fresh = -1                  # start of a run of partly written fresh clusters
            for k, p in enumerate(plans):
                if p[11] and p[4] >= flen and (p[5] < p[1] or p[2] < p[6]):
                    if fresh < 0:
                        fresh = p[4] + p[5]
                    nxt = plans[k + 1] if k + 1 < len(plans) else None
                    if not (nxt and nxt[11] and nxt[4] == p[4] + cs and nxt[4] >= flen):
                        self._allocate_zeroes(fresh, p[4] + p[6] - fresh)
                        fresh = -1
                elif fresh >= 0:
                    self._allocate_zeroes(fresh, plans[k - 1][4] + plans[k - 1][6] - fresh)
                    fresh = -1
            for p in plans:
                gc, a, b, pos, target, ws, we, nb, free, e, bm, new = p
                if ws < a:
                    self._cow_pieces(gc + ws, a - ws, target + ws, not new, pieces)
                pieces.append((target + a, b - a, pos))       # the request's bytes
                if b < we:
                    self._cow_pieces(gc + b, we - b, target + b, not new, pieces)
                if new and target + cs > new_end:
                    new_end = target + cs
            self._issue(pieces, flen, mv)
            for p in plans:
                # the file covers every new cluster (only our own clusters are written:
                # others may be in flight next to them)
                fl = self.file.length()
                if p[11] and p[4] + cs > fl:
                    start = max(fl, p[4])
                    self.file.write_zeroes(start, p[4] + cs - start, False)
        except BaseException:
            with self._alloc_cond:
                for p in plans:
                    if p[11]:
                        self.refcounts.free(p[4], cs)   # never referenced
                self._end_inflight(c0, c1)
            raise
        with self._alloc_cond:
            try:
                vals = []
                changed = False
                for p in plans:
                    ne = p[4] | L2E_COPIED
                    vals.append((ne, p[7]))
                    if ne != p[9] or p[7] != p[10]:
                        changed = True
                if changed:
                    self._set_entries(plans[0][0], vals)
                self._free_old([p[8] for p in plans if p[8] is not None], False)
            finally:
                self._end_inflight(c0, c1)

    def _wait_inflight(self, c0: int, c1: int) -> None:
        """Wait (holding meta_lock, released meanwhile) until no write is allocating in
        guest clusters c0..c1."""
        inflight = self._inflight
        while inflight:
            if c1 - c0 < len(inflight):
                busy = any(c in inflight for c in range(c0, c1 + 1))
            else:
                busy = any(c0 <= c <= c1 for c in inflight)
            if not busy:
                return
            self._alloc_cond.wait()

    def _end_inflight(self, c0: int, c1: int) -> None:
        inflight = self._inflight
        for c in range(c0, c1 + 1):
            inflight.pop(c, None)
        self._alloc_cond.notify_all()

    def _allocate_zeroes(self, host: int, length: int) -> None:
        """New clusters past the old end of the file read zeroes already; allocate them in
        the file without writing (a fast zero write; nothing when the file system can't),
        as QEMU does, so the file's allocation reflects the clusters in use."""
        try:
            self.file.write_zeroes(host, length, False, True)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise

    def _issue(self, pieces, flen: int, mv) -> None:
        """Write the pieces, coalescing data adjacent in the file into one write (a run of
        the request's own bytes, ``int`` payloads = positions in ``mv``, is one slice of it:
        no copy); zero pieces in clusters past the old end of the file (``flen``) read as
        zeroes already."""
        f = self.file
        run = []                        # (payload, n) adjacent in the file
        start = end = -1
        for hoff, n, payload in pieces:
            if payload is _SKIP or payload is None:
                if run:
                    f.write(start, _run_bytes(run, mv))
                    run = []
                if payload is None and hoff < flen:
                    f.write_zeroes(hoff, n, False)
                continue
            if run and hoff == end:
                run.append((payload, n))
                end += n
            else:
                if run:
                    f.write(start, _run_bytes(run, mv))
                run = [(payload, n)]
                start, end = hoff, hoff + n
        if run:
            f.write(start, _run_bytes(run, mv))

    def _write_zero_data(self, offset: int, length: int) -> None:
        w = self._write_data
        pos = 0
        while pos < length:
            n = min(length - pos, len(ZERO_PAGES))
            w(offset + pos, ZERO_PAGES[:n])
            pos += n

    def write_zeroes(self, offset, length, may_unmap=False, fast=False, fua=False):
        """As QEMU 7.2: whole (sub)clusters become zero (sub)clusters (v3) or unallocated (v2
        without a backing file); an unaligned head or tail zeroes its whole (sub)cluster when
        that is unallocated or zero and the rest of it reads zeroes, else it is written as
        zero data (``fast``: ENOTSUP).  v2 over a backing file writes zero data."""
        if self.refcounts is None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        size = self.size
        end = offset + length
        if end > size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if length <= 0:
            return
        align = 1 << self.subcluster_bits
        h_end = offset
        if offset % align:
            h_end = min(end, offset - offset % align + align)
        t_start = end
        if end % align and end != size:
            t_start = max(h_end, end - end % align)
        if h_end > offset:
            self._zero_partial(offset, h_end, may_unmap, fast)
        if t_start > h_end:
            if not self._zeroize(h_end, t_start - h_end, may_unmap):
                if fast:
                    raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
                self._write_zero_data(h_end, t_start - h_end)
        if end > t_start:
            self._zero_partial(t_start, end, may_unmap, fast)
        if fua:
            self.flush()

    def _zero_partial(self, p0: int, p1: int, may_unmap: bool, fast: bool) -> None:
        """Zero [p0, p1), inside one (sub)cluster and not covering it."""
        align = 1 << self.subcluster_bits
        sc = p0 - p0 % align
        sc_end = min(sc + align, self.size)
        with self._alloc_cond:
            self._wait_inflight(sc >> self.cluster_bits, sc >> self.cluster_bits)
            ok = (self.map(sc, 1)[1] in (K_UNALLOC, K_ZERO) and self._reads_zero(sc, p0)
                  and self._reads_zero(p1, sc_end)
                  and self._zeroize(sc, sc_end - sc, may_unmap))
        if not ok:
            if fast:
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
            self._write_zero_data(p0, p1 - p0)

    def _reads_zero(self, a: int, b: int) -> bool:
        """Block status says zeroes for all of [a, b) (QEMU's is_zero())."""
        while a < b:
            n, st = self.block_status(a, b - a)
            if not st & BS_ZERO or n <= 0:
                return False
            a += n
        return True

    def _zeroize(self, offset: int, length: int, may_unmap: bool) -> bool:
        """Make whole (sub)clusters read zeroes through metadata; False where the format
        can't (v2 with a backing file)."""
        cs = self.cluster_size
        cmask = cs - 1
        end = offset + length
        if self.header.version < 3:
            if self.backing is not None:
                return False
            # QEMU: no zero flag, no backing file: discard (entries 0, clusters freed)
            with self._alloc_cond:
                self._wait_inflight(offset >> self.cluster_bits, (end - 1) >> self.cluster_bits)
                vals, frees, drain = [], [], False
                for gc in range(offset & ~cmask, end, cs):
                    e, _ = self._get_entry(gc)
                    host = e & OFFSET_MASK
                    if host & cmask and not e & L2E_COMPRESSED:
                        raise self._bad_host(host, gc)
                    if e & L2E_COMPRESSED:
                        frees.append(("b", e))
                    elif host:
                        frees.append(("c", host))
                        drain = drain or bool(e & L2E_COPIED)
                    vals.append((0, 0))
                if frees:
                    self._set_entries(offset & ~cmask, vals)
                    self._free_old(frees, drain)
            return True
        ext = self.extended_l2
        scb = self.subcluster_bits
        ALL_ZERO = 0xFFFFFFFF << 32
        data_parts = []
        with self._alloc_cond:
            self._wait_inflight(offset >> self.cluster_bits, (end - 1) >> self.cluster_bits)
            gc0 = offset & ~cmask
            vals = []
            frees = []
            drain = False
            gc = gc0
            while gc < end:
                a = max(offset, gc) - gc
                b = min(end, gc + cs) - gc
                whole = a == 0 and (b == cs or gc + b == self.size)
                e, bm = self._get_entry(gc)
                host = e & OFFSET_MASK
                if host & cmask and not e & L2E_COMPRESSED:
                    raise self._bad_host(host, gc)
                comp = e & L2E_COMPRESSED
                if ext:
                    if whole:
                        if comp:
                            ne, nb = 0, ALL_ZERO
                            frees.append(("b", e))
                        elif host and may_unmap:
                            ne, nb = 0, ALL_ZERO
                            frees.append(("c", host))
                            drain = drain or bool(e & L2E_COPIED)
                        else:
                            ne, nb = e, ALL_ZERO
                    elif comp:
                        data_parts.append((gc + a, b - a))
                        ne, nb = e, bm
                    else:
                        s0, s1 = a >> scb, (b - 1) >> scb
                        touched = ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1)
                        ne = e
                        nb = ((bm & 0xFFFFFFFF) & ~touched) | (((bm >> 32) | touched) << 32)
                else:
                    if comp:
                        ne = L2E_ZERO
                        frees.append(("b", e))
                    elif host and may_unmap:
                        ne = L2E_ZERO
                        frees.append(("c", host))
                        drain = drain or bool(e & L2E_COPIED)
                    else:
                        ne = e | L2E_ZERO
                    nb = 0
                vals.append((ne, nb))
                gc += cs
            self._set_entries(gc0, vals)
            self._free_old(frees, drain)
        for off, n in data_parts:
            self._write_zero_data(off, n)
        return True

    def discard(self, offset, length):
        if self.refcounts is None or self.discard_mode != "unmap" or length <= 0:
            return
        cs = self.cluster_size
        cmask = cs - 1
        a0 = -(-offset // cs) * cs
        end = min(offset + length, self.size)
        a1 = end // cs * cs
        if end == self.size and end % cs:
            a1 = end
        if a0 >= a1:
            return
        v3 = self.header.version >= 3
        backing = self.backing is not None
        if not v3 and backing:
            return                      # QEMU 7.2: v2 images with a backing file ignore it
        ext = self.extended_l2
        with self._alloc_cond:
            self._wait_inflight(a0 >> self.cluster_bits, (a1 - 1) >> self.cluster_bits)
            vals = []
            frees = []
            drain = False
            changed = False
            for gc in range(a0, a1, cs):
                e, bm = self._get_entry(gc)
                host = e & OFFSET_MASK
                if host & cmask and not e & L2E_COMPRESSED:
                    raise self._bad_host(host, gc)
                comp = e & L2E_COMPRESSED
                allocated = bool(host or comp)
                ne, nb = e, bm
                if backing or allocated:
                    if ext:
                        ne, nb = 0, 0xFFFFFFFF << 32
                    else:
                        ne, nb = (L2E_ZERO if v3 else 0), 0
                if (ne, nb) != (e, bm):
                    changed = True
                    if comp:
                        frees.append(("b", e))
                    elif host:
                        frees.append(("c", host))
                        drain = drain or bool(e & L2E_COPIED)
                vals.append((ne, nb))
            if changed:
                self._set_entries(a0, vals)
                self._free_old(frees, drain)

    def flush(self):
        if self.refcounts is None:
            return
        with self.meta_lock:
            self._writeback_l2()
            self.refcounts.flush()      # decreases after the L2 updates; then a file flush

    def close(self) -> None:
        if not self.closed and self.refcounts is not None:
            try:
                with self.meta_lock:
                    for hook in list(self.close_hooks):
                        hook()
                    self._writeback_l2()
                    self.refcounts.flush()
                    if self.header.dirty:
                        self.rewrite_header(
                            incompatible_features=self.header.incompatible_features
                            & ~INCOMPAT_DIRTY)
                    self.file.flush()
            except Exception as e:      # noqa: BLE001 - the node is closed regardless
                sys.stderr.write("qcow2: could not close '%s' cleanly: %s\n"
                                 % (self.filename, e))
                sys.stderr.flush()
        super().close()

    # ---- the rest ---------------------------------------------------------------------

    def length(self) -> int:
        return self.size

    def truncate(self, length: int, prealloc: str = "off", zero_write: bool = True) -> None:
        """Grow the image (QEMU's qcow2 resize, the common case only): the new size is
        written to the header; when it needs more L1 entries they must fit in the L1
        table's clusters (64 KiB clusters: up to 4 TiB).  Shrinking, preallocation, images
        with snapshots, bitmaps or a backing file, and L1 relocation raise
        ``OSError(ENOTSUP)``."""
        if self.read_only or self.refcounts is None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        if length % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        with self.meta_lock:
            h = self.header
            if length == self.size:
                return
            if (length < self.size or prealloc != "off" or h.nb_snapshots
                    or h.bitmaps is not None or self.dirty_bitmaps
                    or self.backing is not None):
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
            span = 1 << self._l1_shift
            new_l1 = (length + span - 1) // span
            old_l1 = h.l1_size
            if new_l1 > old_l1:
                cs = self.cluster_size
                capacity = (old_l1 * 8 + cs - 1) // cs * cs // 8
                if new_l1 > capacity:
                    raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
                self.file.write(h.l1_table_offset + 8 * old_l1, bytes(8 * (new_l1 - old_l1)))
                self.file.flush()
                self.rewrite_header(size=length, l1_size=new_l1)
            else:
                self.rewrite_header(size=length)

    def write(self, offset, buf, fua=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def cache(self, offset: int, length: int) -> None:
        pass

    def memory_io(self) -> bool:
        """Metadata and data are memory copies when the image file and the backing chain
        are (buffered files): an allocating write is a few pwrites and a fallocate."""
        if getattr(self.file, "debug_event", None) is not None or not self.file.memory_io():
            return False
        return self.backing is None or self.backing.memory_io()

    def memory_sync(self) -> bool:
        """A flush writes metadata back to the image file, then syncs it: nothing waits
        when the file's sync doesn't (the backing chain is never written)."""
        if getattr(self.file, "debug_event", None) is not None:
            return False
        return self.file.memory_sync()

    def backing_chain(self) -> list:
        """This node's backing nodes, nearest first."""
        out = []
        node = self.backing
        while node is not None:
            out.append(node)
            node = getattr(node, "backing", None)
        return out


_NONZERO_PER_BYTE = {
    bits: bytes(sum(1 for k in range(0, 8, bits) if (b >> k) & ((1 << bits) - 1))
                for b in range(256))
    for bits in (1, 2, 4)
}


def _run_bytes(run, mv):
    """One buffer for a run of adjacent pieces: a slice of the request when the run is
    contiguous request bytes, else the pieces joined."""
    p0, n0 = run[0]
    if type(p0) is int:
        pos = p0 + n0
        for p, n in run[1:]:
            if type(p) is not int or p != pos:
                break
            pos += n
        else:
            return mv[p0:pos]
    return b"".join(mv[p:p + n] if type(p) is int else p for p, n in run)


def _count_refcounted(node: Qcow2Node, allocated: int) -> bool:
    h = node.header
    cs = h.cluster_size
    bits = h.refcount_bits
    f = node.file
    file_length = f.length()
    real_clusters = allocated // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    nb_clusters = -(-file_length // cs)
    entries_per_block = cs * 8 // bits
    table = bytearray(h.refcount_table_clusters * cs)
    f.read_into(h.refcount_table_offset, memoryview(table))
    count = 0
    block = bytearray(cs)
    for ti, rb in enumerate(struct.unpack(">%dQ" % (len(table) // 8), table)):
        first = ti * entries_per_block
        if first >= nb_clusters or count >= threshold:
            break
        rb &= OFFSET_MASK
        if not rb or rb + cs > file_length:
            continue
        f.read_into(rb, memoryview(block))
        want = min(entries_per_block, nb_clusters - first)
        nbytes = -(-(want * bits) // 8)
        data = bytes(block[:nbytes])
        if bits >= 8:
            width = bits // 8
            if width == 1:
                count += nbytes - data.count(0)
            else:
                arr = array.array({2: "H", 4: "I", 8: "Q"}[width], data)
                count += len(arr) - arr.count(0)
        else:
            count += sum(data.translate(_NONZERO_PER_BYTE[bits]))
    return count >= threshold


class _FileIO:
    """The ``io`` object refcount.py and check.py expect, over the file child."""

    __slots__ = ("f",)

    def __init__(self, f):
        self.f = f

    def pread(self, offset: int, length: int) -> bytes:
        flen = self.f.length()
        if offset >= flen:
            return b""
        buf = bytearray(min(length, flen - offset))
        self.f.read_into(offset, memoryview(buf))
        return bytes(buf)

    def pwrite(self, offset: int, data) -> None:
        self.f.write(offset, data)

    def flush(self) -> None:
        self.f.flush()

    def length(self) -> int:
        return self.f.length()

    def truncate(self, n: int) -> None:
        raise OSError(errno.ENOTSUP, "qcow2: the image file is not truncated")


def _bottom_file(node):
    """The file node under ``node`` (through ``file`` and blkdebug's ``image`` children), or
    None."""
    while node is not None:
        if node.driver in ("file", "host_device"):
            return node
        children = node.children
        node = children.get("file") or children.get("image")
    return None


def _has_protocol(name: str) -> bool:
    for c in name:
        if c == ":":
            return True
        if c == "/":
            return False
    return False


def _probe_file(proto: dict) -> str:
    """The format of a backing file without a backing_fmt: probed from its first bytes
    (QEMU probes too); a file that cannot be read is opened as raw, whose open reports
    the error."""
    if proto.get("driver") != "file":
        return "raw"
    try:
        with open(proto["filename"], "rb") as fp:
            return probe_format(fp.read(PROBE_BUF_SIZE))
    except OSError:
        return "raw"
