"""The qcow2 format node: read path, block status, allocation depth, backing chains.

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
:class:`~blockexport.block.drivers.qcow2.l2cache.L2Cache` (:meth:`Qcow2Node.l2_slice`).  A
write path would update ``l1`` and the cache after writing the tables to the file.
"""
from __future__ import annotations

import array
import errno
import os
import struct
import sys
import threading
import zlib

from blockexport.block.drivers.qcow2 import bitmap_glue
from blockexport.block.drivers.qcow2.header import (
    COMPRESSION_NAMES, COMPRESSION_ZSTD, OFFSET_MASK, Qcow2Header, header_bytes_needed,
    parse_header,
)
from blockexport.block.drivers.qcow2.l2cache import L2Cache
from blockexport.block.drivers.qcow2.snapshots import (
    Snapshot, find_snapshot_to_load, read_l1_table, read_snapshot_table,
)
from blockexport.block.node import (
    BS_ALLOCATED, BS_DATA, BS_ZERO, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE,
    PERM_WRITE_UNCHANGED, BlockNode, zero_fill,
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
        self._add_child("file", child)
        self.file = child
        self.filename = child.filename
        self.backing = None
        #: the backing node came from the image header (not from the ``backing`` option)
        self.backing_from_header = False
        self.header: Qcow2Header = self._read_header(child)
        if not self.read_only:
            if self.auto_read_only:
                self.read_only = True
            else:
                raise Error("qcow2 write support is not available yet; open the image "
                            "read-only")
        self._check_options(options)
        self._setup_geometry()
        self._read_l1()
        self._read_snapshots()
        graph.mark_named()
        self._open_backing(graph, options)
        self._md_prealloc = None        # metadata preallocation, detected on first use
        self._corruption_reported = False
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
        return parse_header(bytes(first), flen, writable=not self.read_only
                            and not self.auto_read_only)

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
        # resizing.  (A write path adds WRITE | RESIZE here for a writable node: QEMU's
        # format drivers may update metadata without a guest write.)
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
        if l2_offset & (self.cluster_size - 1):
            raise self._corruption("L2 table offset %#x unaligned (L1 index: %#x)"
                                   % (l2_offset, l1_index))
        size = self.l2_cache_entry_size
        if key + size > self.file.length():
            raise self._corruption("L2 table offset %#x past the end of the image file "
                                   "(L1 index: %#x)" % (l2_offset, l1_index))
        buf = bytearray(size)
        debug = getattr(self.file, "debug_event", None)
        if debug is not None:
            debug("l2_load")
        self.file.read_into(key, memoryview(buf))
        # an array of 64-bit ints: as compact as the table on disk (a tuple of Python ints
        # would take five times the memory the cache size promises)
        t = array.array("Q", buf)
        if _LITTLE:
            t.byteswap()
        self.l2_cache.put(key, t)
        return t

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

    # ---- the rest ---------------------------------------------------------------------

    def length(self) -> int:
        return self.size

    def write(self, offset, buf, fua=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def write_zeroes(self, offset, length, may_unmap=False, fast=False, fua=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def discard(self, offset, length):
        pass

    def flush(self):
        pass

    def cache(self, offset: int, length: int) -> None:
        pass

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
