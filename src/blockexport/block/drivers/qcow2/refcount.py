"""qcow2 host cluster reference counts (docs/interop/qcow2.txt, "Host cluster management").

Standalone: this module knows only the refcount structures (the refcount table and refcount
blocks) and an ``io`` object for the image file (``pread(offset, length) -> bytes``,
``pwrite(offset, data)``, ``flush()``, ``length()``, ``truncate(n)``).  The qcow2 driver owns
the header: when the refcount table moves, :attr:`RefcountManager.on_table_moved` is called
with the new table's offset and cluster count and must rewrite the header fields
(``refcount_table_offset``, ``refcount_table_clusters``; one write of the 12 bytes at 48 keeps
the update atomic) and make it durable before returning.

Entry layout: ``refcount_bits = 1 << refcount_order``; entries of 8 bits and more are
big-endian numbers; narrower entries are packed into bytes starting from the least significant
bits (entry ``i`` of a byte holds bits ``i*w .. i*w+w-1``).

Ordering, so that a crash (of the process or of the machine) leaks clusters but never
corrupts the image:

* increases are written (``pwrite``) before :meth:`allocate`/:meth:`increase` return; the
  caller makes them durable (``io.flush()`` or :meth:`flush`) before it writes metadata that
  references the clusters, or leaves that to its own write-back order (QEMU's cache
  dependency: "refcount blocks before L2 tables");
* with ``defer_frees=True`` (the driver's choice) :meth:`free` only records the range: the
  clusters keep their reference, so they cannot be handed out again, until :meth:`flush`
  (or ``DEFER_FREES_MAX`` recorded frees) first calls :attr:`before_decrease_write` and then
  lowers them.  Otherwise a cluster freed by a discard could receive another guest offset's
  data while the L2 entry on disk still names it: after a crash the discarded offset would
  read that data (qemu-nbd 7.2 has this window; tests/qcow2_write_random catches it);
* decreases stay in the cache (dirty) until :meth:`flush`, eviction or a later write of the
  same block; before such a block is written :attr:`before_decrease_write` is called (when
  set), which is where the driver makes its L2/L1 updates that dropped the references
  durable: a freed cluster must be unreferenced on disk before its refcount 0 is;
* a new refcount block is written (and flushed) before the table entry that points to it; it
  lies either inside the range it describes (then it counts itself) or in a cluster whose
  refcount was raised first;
* a new refcount table and the refcount blocks it needs are placed past everything the old
  table describes, describe themselves, are written and flushed before ``on_table_moved`` is
  called; the old table is freed only after the header points to the new one.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["RefcountManager", "RefcountError", "header_table_updater", "get_entry", "set_entry",
           "block_entries"]

#: With ``defer_frees``, recorded frees are applied (after ``before_decrease_write``) once
#: there are this many, so a client that never flushes does not grow the file forever.
DEFER_FREES_MAX = 4096
#: QEMU's limit on the refcount table (it won't open an image with a larger one).
MAX_TABLE_BYTES = 8 << 20
#: Offsets are at most 56 bits; the low 9 bits of a refcount table entry are reserved.
OFFSET_MASK = 0x00FFFFFFFFFFFE00
_TABLE_ENTRY_RESERVED = 0x1FF


class RefcountError(OSError):
    """A refcount could not be changed: overflow (``ERANGE``), underflow or a refcount
    structure that is corrupt (``EIO``)."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def header_table_updater(io, *, header_offset: int = 48):
    """An ``on_table_moved`` callback that writes ``refcount_table_offset`` (8 bytes at 48)
    and ``refcount_table_clusters`` (4 bytes at 56) in one write, then flushes."""
    def update(table_offset: int, table_clusters: int) -> None:
        io.pwrite(header_offset, struct.pack(">QI", table_offset, table_clusters))
        io.flush()
    return update


def get_entry(data, index: int, refcount_order: int) -> int:
    """Entry ``index`` of refcount block ``data`` (from the spec's layout)."""
    bits = 1 << refcount_order
    if bits >= 8:
        nb = bits // 8
        return int.from_bytes(data[index * nb:(index + 1) * nb], "big")
    per = 8 // bits
    return (data[index // per] >> ((index % per) * bits)) & ((1 << bits) - 1)


def set_entry(data: bytearray, index: int, value: int, refcount_order: int) -> None:
    """Store ``value`` as entry ``index`` of refcount block ``data``."""
    bits = 1 << refcount_order
    if not 0 <= value < (1 << bits):
        raise ValueError("refcount %d does not fit in %d bits" % (value, bits))
    if bits >= 8:
        nb = bits // 8
        data[index * nb:(index + 1) * nb] = value.to_bytes(nb, "big")
        return
    per = 8 // bits
    shift = (index % per) * bits
    b = index // per
    data[b] = (data[b] & ~(((1 << bits) - 1) << shift) & 0xFF) | (value << shift)


_UNPACK = {8: "B", 16: "H", 32: "I", 64: "Q"}


def block_entries(data, refcount_order: int):
    """``(index, refcount)`` for every nonzero entry of refcount block ``data``."""
    bits = 1 << refcount_order
    if bits >= 8:
        n = len(data) * 8 // bits
        values = struct.unpack(">%d%s" % (n, _UNPACK[bits]), bytes(data))
        return [(i, v) for i, v in enumerate(values) if v]
    per = 8 // bits
    mask = (1 << bits) - 1
    out = []
    for bi, byte in enumerate(data):
        if byte:
            for k in range(per):
                v = (byte >> (k * bits)) & mask
                if v:
                    out.append((bi * per + k, v))
    return out


@dataclass
class _Block:
    data: bytearray
    dirty_lo: int = -1        # dirty byte range [lo, hi), -1 when clean
    dirty_hi: int = -1
    has_decrease: bool = False

    def mark(self, lo: int, hi: int) -> None:
        if self.dirty_lo < 0:
            self.dirty_lo, self.dirty_hi = lo, hi
        else:
            self.dirty_lo = min(self.dirty_lo, lo)
            self.dirty_hi = max(self.dirty_hi, hi)


def _has_zero_field_table(bits: int) -> bytes:
    """translate() table: byte -> 1 when one of its ``bits``-wide fields is zero."""
    per = 8 // bits
    mask = (1 << bits) - 1
    return bytes(1 if any(((b >> (k * bits)) & mask) == 0 for k in range(per)) else 0
                 for b in range(256))


class RefcountManager:
    """The refcount table and blocks of one qcow2 image, with a bounded block cache
    (``cache_blocks`` refcount blocks, least recently used clean ones evicted first).

    All public methods are thread-safe (one re-entrant lock).  The callbacks run with that
    lock held and must not call back into the manager:

    * ``on_table_moved(new_table_offset, new_table_clusters)``: write both header fields
      and make them durable (:func:`header_table_updater` does exactly that); without it a
      full table raises :class:`RefcountError` (``ENOSPC``) instead of growing.
    * ``before_decrease_write()``: make durable the metadata updates that dropped
      references (the driver's L2/L1 write-back), before a lowered refcount is written.

    ``get(cluster)``, ``allocate(n)``, ``allocate_runs(n)``, ``allocate_bytes(size)``,
    ``increase(offset, length, delta)``, ``free(offset, length)``, ``set_refcount(cluster,
    value)``, ``flush()``, ``reload(table_offset, table_clusters)``; attributes
    ``table_offset``, ``table_clusters``, ``table``, ``max_refcount``, ``block_entries``,
    ``free_hint``."""

    def __init__(self, io, *, cluster_bits: int, refcount_order: int, table_offset: int,
                 table_clusters: int, file_length: int, cache_blocks: int = 64,
                 on_table_moved=None, before_decrease_write=None, defer_frees=False):
        if not 9 <= cluster_bits <= 21:
            raise ValueError("cluster_bits must be 9..21")
        if not 0 <= refcount_order <= 6:
            raise ValueError("refcount_order must be 0..6")
        self.io = io
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.refcount_bits = 1 << refcount_order
        self.max_refcount = (1 << self.refcount_bits) - 1
        #: refcount entries per refcount block
        self.block_entries = self.cluster_size * 8 // self.refcount_bits
        self._entry_bytes = self.refcount_bits // 8          # 0 for sub-byte entries
        if self._entry_bytes == 0:
            self._per_byte = 8 // self.refcount_bits
            self._zero_field = _has_zero_field_table(self.refcount_bits)
        self.on_table_moved = on_table_moved
        self.before_decrease_write = before_decrease_write
        self.defer_frees = defer_frees
        self._deferred: list[tuple[int, int]] = []
        self.cache_blocks = max(4, cache_blocks)
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, _Block] = OrderedDict()
        self.file_length = file_length
        #: lowest cluster index that may be free
        self.free_hint = 0
        #: where the next compressed cluster may go (allocate_bytes), 0 = nowhere yet
        self.free_byte_offset = 0
        self._load_table(table_offset, table_clusters)

    # ------------------------------------------------------------------ table

    def _load_table(self, table_offset: int, table_clusters: int) -> None:
        cs = self.cluster_size
        if table_offset % cs or table_offset <= 0:
            raise RefcountError(errno.EIO, "qcow2: refcount table offset %#x invalid"
                                % table_offset)
        if table_clusters <= 0:
            raise RefcountError(errno.EIO, "qcow2: refcount table is empty")
        raw = self.io.pread(table_offset, table_clusters * cs)
        if len(raw) < table_clusters * cs:
            raw = raw + bytes(table_clusters * cs - len(raw))
        table = list(struct.unpack(">%dQ" % (len(raw) // 8), raw))
        for i, e in enumerate(table):
            if e & _TABLE_ENTRY_RESERVED or (e & ~OFFSET_MASK):
                raise RefcountError(errno.EIO, "qcow2: refcount table entry %d is invalid "
                                    "(%#x)" % (i, e))
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = table
        self._block_clusters = {e >> self.cluster_bits for e in table if e}
        self._cache.clear()

    def reload(self, table_offset: int, table_clusters: int, file_length: int | None = None):
        """Forget cached state and read the table at ``table_offset`` (after a rebuild)."""
        with self._lock:
            self._load_table(table_offset, table_clusters)
            if file_length is not None:
                self.file_length = file_length
            self.free_hint = 0
            self.free_byte_offset = 0

    @property
    def covered_clusters(self) -> int:
        """Number of clusters the refcount table can describe."""
        return len(self.table) * self.block_entries

    # ------------------------------------------------------------------ blocks

    def _block(self, offset: int) -> _Block:
        blk = self._cache.get(offset)
        if blk is not None:
            self._cache.move_to_end(offset)
            return blk
        data = self.io.pread(offset, self.cluster_size)
        if len(data) < self.cluster_size:
            data = data + bytes(self.cluster_size - len(data))
        blk = _Block(bytearray(data))
        self._cache[offset] = blk
        self._evict()
        return blk

    def _evict(self) -> None:
        # Least recently used clean block first; never the newest one (the caller holds it
        # and is about to change it).
        while len(self._cache) > self.cache_blocks:
            victim = None
            newest = next(reversed(self._cache))
            for off, blk in self._cache.items():
                if blk.dirty_lo < 0 and off != newest:
                    victim = off
                    break
            if victim is None:
                victim = next(iter(self._cache))
                self._write_block(victim, self._cache[victim])
            del self._cache[victim]

    def _write_block(self, offset: int, blk: _Block) -> None:
        if blk.dirty_lo < 0:
            return
        if blk.has_decrease and self.before_decrease_write is not None:
            self.before_decrease_write()
        lo = blk.dirty_lo & ~511
        hi = min(self.cluster_size, (blk.dirty_hi + 511) & ~511)
        self.io.pwrite(offset + lo, bytes(blk.data[lo:hi]))
        if offset + self.cluster_size > self.file_length:
            self.file_length = max(self.file_length, offset + hi)
        blk.dirty_lo = blk.dirty_hi = -1
        blk.has_decrease = False

    def _entry_span(self, idx: int) -> tuple[int, int]:
        """Byte range of entry ``idx`` in its block."""
        if self._entry_bytes:
            return idx * self._entry_bytes, (idx + 1) * self._entry_bytes
        b = idx // self._per_byte
        return b, b + 1

    def _get_entry(self, data, idx: int) -> int:
        nb = self._entry_bytes
        if nb:
            return int.from_bytes(data[idx * nb:(idx + 1) * nb], "big")
        bits = self.refcount_bits
        return (data[idx // self._per_byte] >> ((idx % self._per_byte) * bits)) \
            & self.max_refcount

    def _set_entry(self, data, idx: int, value: int) -> None:
        nb = self._entry_bytes
        if nb:
            data[idx * nb:(idx + 1) * nb] = value.to_bytes(nb, "big")
            return
        bits = self.refcount_bits
        shift = (idx % self._per_byte) * bits
        b = idx // self._per_byte
        data[b] = (data[b] & ~(self.max_refcount << shift) & 0xFF) | (value << shift)

    def _first(self, data, start: int, end: int, want_zero: bool) -> int:
        """First entry index in [start, end) whose refcount is zero (``want_zero``) or
        nonzero; ``end`` when there is none."""
        nb = self._entry_bytes
        if nb:
            if want_zero:
                zero = bytes(nb)
                pos = start
                while pos < end:
                    p = data.find(zero, pos * nb, end * nb)
                    if p < 0:
                        return end
                    if p % nb == 0:
                        return p // nb
                    pos = p // nb + 1
                return end
            seg = bytes(data[start * nb:end * nb])
            skip = len(seg) - len(seg.lstrip(b"\0"))
            return end if skip == len(seg) else start + skip // nb
        per = self._per_byte
        i = start
        while i < end and i % per:
            if (self._get_entry(data, i) == 0) == want_zero:
                return i
            i += 1
        full_end = end - end % per
        if i < full_end:
            seg = bytes(data[i // per:full_end // per])
            if want_zero:
                p = seg.translate(self._zero_field).find(b"\x01")
            else:
                s = len(seg) - len(seg.lstrip(b"\0"))
                p = -1 if s == len(seg) else s
            if p >= 0:
                j = (i // per + p) * per
                for k in range(j, j + per):
                    if (self._get_entry(data, k) == 0) == want_zero:
                        return k
            i = full_end
        while i < end:
            if (self._get_entry(data, i) == 0) == want_zero:
                return i
            i += 1
        return end

    # ------------------------------------------------------------------ reading

    def _get(self, cluster: int) -> int:
        ti, bi = divmod(cluster, self.block_entries)
        if ti >= len(self.table) or not self.table[ti]:
            return 0
        return self._get_entry(self._block(self.table[ti]).data, bi)

    def get(self, cluster_index: int) -> int:
        """The refcount of host cluster ``cluster_index`` (0 where no block describes it)."""
        if cluster_index < 0:
            raise ValueError("negative cluster index")
        with self._lock:
            return self._get(cluster_index)

    def _find_free(self, start: int, want_zero: bool, limit: int | None = None) -> int:
        """First cluster >= start with refcount zero (or nonzero), searching below ``limit``
        (for nonzero: returns ``limit`` when there is none)."""
        c = start
        E = self.block_entries
        while True:
            if limit is not None and c >= limit:
                return limit
            ti, bi = divmod(c, E)
            if ti >= len(self.table):
                return c if want_zero else (limit if limit is not None else c)
            end = E if limit is None else min(E, limit - ti * E)
            if not self.table[ti]:
                if want_zero:
                    return c
                c = ti * E + end
                continue
            j = self._first(self._block(self.table[ti]).data, bi, end, want_zero)
            if j < end:
                return ti * E + j
            c = ti * E + end

    def _find_free_run(self, n: int) -> int:
        c = self._find_free(self.free_hint, True)
        self.free_hint = c                    # everything below is in use
        while True:
            c = self._find_free(c, True)
            used = self._find_free(c, False, c + n)
            if used >= c + n:
                return c
            c = used + 1

    # ------------------------------------------------------------------ growing

    def _table_entry_write(self, ti: int) -> None:
        self.io.pwrite(self.table_offset + 8 * ti, struct.pack(">Q", self.table[ti]))

    def _free_cluster_outside(self, avoid) -> int:
        f = self._find_free_run(1)
        while avoid is not None and avoid[0] <= f < avoid[1]:
            f = self._find_free(avoid[1], True)
        return f

    def _ensure_block(self, ti: int, avoid=None) -> bool:
        """Make sure refcount block ``ti`` exists, placing new metadata outside the cluster
        range ``avoid`` (clusters the caller is about to count as in use); True when
        metadata was allocated."""
        changed = False
        E = self.block_entries
        cs = self.cluster_size
        while True:
            if ti >= len(self.table):
                self._grow_table(ti, avoid)
                changed = True
                continue
            if self.table[ti]:
                return changed
            f = self._free_cluster_outside(avoid)
            tf = f // E
            if tf != ti:
                if tf >= len(self.table) or not self.table[tf]:
                    self._ensure_block(tf, avoid)  # the block describing f first; look again
                    changed = True
                    continue
                # f is described by an existing block: raise its refcount first
                self._change(f, 1, +1)
                data = bytearray(cs)
            else:
                data = bytearray(cs)          # self-describing: counts itself
                self._set_entry(data, f % E, 1)
            off = f * cs
            self.io.pwrite(off, bytes(data))
            self.file_length = max(self.file_length, off + cs)
            self.io.flush()
            self.table[ti] = off
            self._table_entry_write(ti)
            self._block_clusters.add(f)
            self._cache[off] = _Block(data)
            self._evict()
            if f == self.free_hint:
                self.free_hint = f + 1
            changed = True

    def _grow_table(self, need_ti: int, avoid=None) -> None:
        """A new, larger refcount table (and the blocks describing it) past everything the
        current table describes; the header is switched by ``on_table_moved``."""
        if self.on_table_moved is None:
            raise RefcountError(errno.ENOSPC, "qcow2: the refcount table is full and cannot "
                                "be moved (no header updater)")
        cs = self.cluster_size
        E = self.block_entries
        per_table_cluster = cs // 8
        old_len = len(self.table)
        self.file_length = max(self.file_length, self.io.length())
        start = max(self.covered_clusters, -(-self.file_length // cs))
        if avoid is not None and avoid[1] > start:
            start = avoid[1]
        nb, nt = 0, self.table_clusters
        while True:
            end = start + nb + nt                      # area: [start, end)
            last_ti = max(need_ti, (end - 1) // E)
            want_nt = max(-(-(last_ti + 1) // per_table_cluster),
                          self.table_clusters + (self.table_clusters + 1) // 2)
            want_nb = (end - 1) // E - start // E + 1
            if (want_nb, want_nt) == (nb, nt):
                break
            nb, nt = max(nb, want_nb), max(nt, want_nt)
        if nt * cs > MAX_TABLE_BYTES:
            raise RefcountError(errno.EFBIG, "qcow2: the refcount table would need %d bytes, "
                                "more than the %d QEMU allows" % (nt * cs, MAX_TABLE_BYTES))
        blocks_at = start
        table_at = start + nb
        new_table = self.table + [0] * (nt * per_table_cluster - old_len)
        first_ti = start // E
        blocks = {}
        for k in range(nb):
            ti = first_ti + k
            data = bytearray(cs)
            lo, hi = max(start, ti * E), min(start + nb + nt, (ti + 1) * E)
            for c in range(lo, hi):
                self._set_entry(data, c - ti * E, 1)
            new_table[ti] = (blocks_at + k) * cs
            blocks[(blocks_at + k) * cs] = data
        for off, data in blocks.items():
            self.io.pwrite(off, bytes(data))
        raw = struct.pack(">%dQ" % len(new_table), *new_table)
        self.io.pwrite(table_at * cs, raw)
        self.file_length = max(self.file_length, (table_at + nt) * cs)
        self.io.flush()
        self.on_table_moved(table_at * cs, nt)
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table_offset, self.table_clusters, self.table = table_at * cs, nt, new_table
        for off, data in blocks.items():
            self._block_clusters.add(off // cs)
            self._cache[off] = _Block(data)
        self._evict()
        # the old table is garbage now
        self._increase(old_off, old_clusters * cs, -1, check_metadata=False)

    # ------------------------------------------------------------------ changing

    def _change(self, cluster: int, n: int, delta: int) -> None:
        """Add ``delta`` to clusters [cluster, cluster+n) whose blocks exist and which were
        checked; writes increases at once."""
        E = self.block_entries
        c = cluster
        end = cluster + n
        touched = []
        while c < end:
            ti, bi = divmod(c, E)
            off = self.table[ti]
            if not off:
                raise RefcountError(errno.EIO, "qcow2: internal error: no refcount block "
                                    "for cluster %d" % c)
            blk = self._block(off)
            stop = min(end, (ti + 1) * E)
            for k in range(bi, bi + stop - c):
                v = self._get_entry(blk.data, k) + delta
                self._set_entry(blk.data, k, v)
                if v == 0:
                    if ti * E + k < self.free_hint:
                        self.free_hint = ti * E + k
                    if self.free_byte_offset >> self.cluster_bits == ti * E + k:
                        self.free_byte_offset = 0     # freed: may be reused whole
            lo = self._entry_span(bi)[0]
            hi = self._entry_span(bi + stop - c - 1)[1]
            blk.mark(lo, hi)
            if delta < 0:
                blk.has_decrease = True
            touched.append((off, blk))
            c = stop
        if delta > 0:
            for off, blk in touched:
                self._write_block(off, blk)

    def _check_range(self, first: int, n: int, delta: int, check_metadata: bool) -> None:
        for c in range(first, first + n):
            v = self._get(c) + delta
            if v > self.max_refcount:
                raise RefcountError(errno.ERANGE, "qcow2: refcount overflow for cluster %d "
                                    "at offset %#x (%d + %d > %d, refcount_bits=%d)"
                                    % (c, c * self.cluster_size, v - delta, delta,
                                       self.max_refcount, self.refcount_bits))
            if v < 0:
                raise RefcountError(errno.ERANGE, "qcow2: refcount underflow for cluster %d "
                                    "at offset %#x (%d %+d < 0)"
                                    % (c, c * self.cluster_size, v - delta, delta))
            if v == 0 and check_metadata and self._is_refcount_metadata(c):
                raise RefcountError(errno.EIO, "qcow2: refusing to free cluster %d at "
                                    "offset %#x: it holds refcount metadata"
                                    % (c, c * self.cluster_size))

    def _is_refcount_metadata(self, c: int) -> bool:
        t0 = self.table_offset >> self.cluster_bits
        return c in self._block_clusters or t0 <= c < t0 + self.table_clusters

    def _increase(self, host_offset: int, length: int, delta: int,
                  check_metadata: bool = True) -> None:
        if length <= 0 or delta == 0:
            return
        if host_offset < 0:
            raise ValueError("negative offset")
        cb = self.cluster_bits
        first = host_offset >> cb
        n = ((host_offset + length - 1) >> cb) - first + 1
        if delta > 0:
            # blocks first (this may allocate, so it comes before the checks)
            E = self.block_entries
            for ti in range(first // E, (first + n - 1) // E + 1):
                self._ensure_block(ti, (first, first + n))
        self._check_range(first, n, delta, check_metadata)
        self._change(first, n, delta)

    def increase(self, host_offset: int, length: int, delta: int) -> None:
        """Add ``delta`` (positive or negative) to the refcount of every cluster touched by
        the byte range; nothing changes when one of them would overflow or underflow
        (:class:`RefcountError`, ``ERANGE``).  Clusters reaching 0 are free for reuse."""
        with self._lock:
            self._increase(host_offset, length, delta)

    def free(self, host_offset: int, length: int) -> None:
        """Drop one reference from every cluster touched by the byte range (with
        ``defer_frees``: at the next :meth:`flush`, see the module's ordering rules)."""
        if not self.defer_frees:
            self.increase(host_offset, length, -1)
            return
        with self._lock:
            if length > 0:
                self._deferred.append((host_offset, length))
                if len(self._deferred) >= DEFER_FREES_MAX:
                    self._apply_deferred()

    def _apply_deferred(self) -> None:
        """The recorded frees, once the metadata that dropped the references is durable."""
        if not self._deferred:
            return
        if self.before_decrease_write is not None:
            self.before_decrease_write()
        deferred, self._deferred = self._deferred, []
        for off, length in deferred:
            self._increase(off, length, -1)
        for blk in self._cache.values():     # every decrease so far is covered by that call
            blk.has_decrease = False

    def allocate(self, nclusters: int = 1, *, contiguous: bool = True) -> int:
        """Allocate ``nclusters`` adjacent free clusters (refcount 0 -> 1, written before
        returning); returns the host offset of the first.  Non-contiguous allocation of
        several clusters is :meth:`allocate_runs` (it reports every run)."""
        if nclusters < 1:
            raise ValueError("nclusters must be >= 1")
        if not contiguous and nclusters > 1:
            raise ValueError("use allocate_runs() for non-contiguous allocations")
        with self._lock:
            return self._allocate(nclusters)

    def _allocate(self, n: int) -> int:
        E = self.block_entries
        while True:
            c = self._find_free_run(n)
            changed = False
            for ti in range(c // E, (c + n - 1) // E + 1):
                changed |= self._ensure_block(ti)
            if changed and self._find_free(c, False, c + n) < c + n:
                continue                      # metadata took part of the run
            self._check_range(c, n, 1, False)
            self._change(c, n, +1)
            if c == self.free_hint:
                self.free_hint = c + n
            return c << self.cluster_bits

    def allocate_runs(self, nclusters: int) -> list[tuple[int, int]]:
        """Allocate ``nclusters`` clusters, not necessarily adjacent: the lowest free ones.
        Returns ``[(host_offset, count), ...]``."""
        if nclusters < 1:
            raise ValueError("nclusters must be >= 1")
        out = []
        with self._lock:
            left = nclusters
            E = self.block_entries
            while left:
                c = self._find_free_run(1)
                run = self._find_free(c, False, c + left) - c
                changed = False
                for ti in range(c // E, (c + run - 1) // E + 1):
                    changed |= self._ensure_block(ti)
                if changed:
                    continue                  # metadata was placed: look again
                self._check_range(c, run, 1, False)
                self._change(c, run, +1)
                if c == self.free_hint:
                    self.free_hint = c + run
                out.append((c << self.cluster_bits, run))
                left -= run
        return out

    def allocate_bytes(self, size: int) -> int:
        """Allocate ``size`` bytes (1..cluster_size) for a compressed cluster: packed after
        the previous compressed cluster when it fits (spilling into the next cluster only
        when that one is free and adjacent); every host cluster touched gains a reference,
        as a compressed L2 entry counts one per cluster it touches."""
        cs = self.cluster_size
        if not 0 < size <= cs:
            raise ValueError("size must be 1..cluster_size")
        with self._lock:
            off = self.free_byte_offset
            if off and self._get(off >> self.cluster_bits) >= self.max_refcount:
                off = 0
            room = cs - (off % cs) if off else 0
            if not off or room < size:
                E = self.block_entries
                nxt = self._find_free_run(1)
                if self._ensure_block(nxt // E):
                    nxt = self._find_free_run(1)
                if not off or (off + cs - 1) // cs * cs != nxt * cs:
                    off = nxt * cs
                    room = cs
                else:
                    room += cs
            self._increase(off, size, +1, check_metadata=False)
            end = off + size
            self.free_byte_offset = 0 if end % cs == 0 else end
            return off

    def set_refcount(self, cluster_index: int, value: int) -> None:
        """Set one refcount outright (repair); creates the block when needed."""
        with self._lock:
            if not 0 <= value <= self.max_refcount:
                raise RefcountError(errno.ERANGE, "qcow2: refcount %d does not fit in %d bits"
                                    % (value, self.refcount_bits))
            cur = self._get(cluster_index)
            if value != cur:
                self._increase(cluster_index << self.cluster_bits, 1, value - cur,
                               check_metadata=False)

    def flush(self) -> None:
        """Write every dirty cached block (increases are already written; this writes the
        decreases), then flush the file."""
        with self._lock:
            self._apply_deferred()
            dirty = [(off, blk) for off, blk in self._cache.items() if blk.dirty_lo >= 0]
            if any(blk.has_decrease for _, blk in dirty) and self.before_decrease_write:
                self.before_decrease_write()
                for _, blk in dirty:
                    blk.has_decrease = False
            for off, blk in sorted(dirty, key=lambda x: x[0]):
                self._write_block(off, blk)
            self.io.flush()
