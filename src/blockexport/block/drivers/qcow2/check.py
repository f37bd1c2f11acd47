"""qcow2 refcount check and repair (what ``qemu-img check [-r]`` does for refcounts, and what
a writable open of an image left with the dirty bit set needs under lazy refcounts).

Standalone: the caller passes plain values read from the header (cluster_bits,
refcount_order, the refcount table, the active L1 table, the extended_l2 flag), the internal
snapshots' L1 tables (or none: then an image with ``nb_snapshots > 0`` is refused) and every
other host byte range it knows to be in use (bitmap directory, bitmap tables and data, the
snapshot table, a crypto header...), as ``extra_ranges``.  The header cluster (cluster 0) is
always counted.  This module walks L1 and L2 tables itself (standard, zero-allocated and
compressed entries, extended L2 entries).

The true refcount of a cluster is the number of references to it: the header, each L1 table
cluster, each L2 table (once per L1 entry naming it), each data cluster (once per L2 entry;
a compressed entry once per host cluster its bytes touch), the refcount table and every
refcount block, and the extra ranges.  More on disk than referenced is a *leak* (harmless);
less is an *error* (corruption: a cluster in use could be handed out again).  As QEMU's
check does, the COPIED flag (bit 63) of active L1 and L2 entries is compared with the refcount
on disk (set exactly when it is 1) and a mismatch counts as a corruption.

Repair: errors rebuild the whole refcount structure (a new table and blocks past everything
in use, describing themselves and the rest; written and flushed, then the header switched
through ``on_table_moved``; the old structure becomes free space); leaks alone are fixed in
place by lowering the refcounts; COPIED flags are then rewritten to agree with the (now true)
refcounts.  Damage this cannot fix (unaligned or out-of-file L2 offsets...) refuses repair.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from blockexport.block.drivers.qcow2.refcount import (
    OFFSET_MASK, RefcountError, RefcountManager, block_entries, set_entry)

__all__ = ["CheckResult", "RepairResult", "check_refcounts", "repair_refcounts",
           "rebuild_refcounts"]

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    #: guest clusters with a host cluster in the active L1/L2 tables (as qemu-img reports)
    allocated_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list = field(default_factory=list)
    #: cluster -> (refcount on disk, references) where the disk has more
    leaked: dict = field(default_factory=dict)
    #: cluster -> (refcount on disk, references) where the disk has fewer
    errors: dict = field(default_factory=dict)
    #: (file offset of the L1/L2 entry, entry, refcount) whose COPIED flag disagrees
    copied_errors: list = field(default_factory=list)
    #: damage in the refcount table itself (bad refcount block offsets)
    structure_errors: int = 0
    #: damage repair cannot fix (L1/L2 entries)
    unrepairable: list = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


@dataclass
class RepairResult:
    before: CheckResult
    after: CheckResult
    rebuilt: bool = False
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    #: (refcount_table_offset, refcount_table_clusters) after the repair
    table: tuple = (0, 0)


class _Walk:
    """The references of an image, counted from its metadata."""

    def __init__(self, io, cluster_bits, file_length, res: CheckResult):
        self.io = io
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.file_clusters = -(-file_length // self.cs)
        self.res = res
        self.refs: dict[int, int] = {}          # everything but the refcount structures
        self.rc_refs: dict[int, int] = {}       # the refcount table and blocks

    def error(self, msg, unrepairable=False):
        self.res.messages.append(msg)
        self.res.corruptions += 1
        if unrepairable:
            self.res.unrepairable.append(msg)

    def inc(self, offset, length, refs=None):
        if length <= 0:
            return
        refs = self.refs if refs is None else refs
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        for c in range(first, last + 1):
            if c >= self.file_clusters:
                self.error("ERROR: counting reference for region exceeding the end of the "
                           "file by one cluster or more: offset %#x size %#x"
                           % (offset, length), unrepairable=True)
                return
            refs[c] = refs.get(c, 0) + 1

    def read(self, offset, length):
        try:
            data = self.io.pread(offset, length)
        except OSError as e:
            self.res.check_errors += 1
            self.res.messages.append("ERROR reading %d bytes at %#x: %s" % (length, offset, e))
            return None
        return data + bytes(length - len(data)) if len(data) < length else data

    def walk_l1(self, l1_offset, l1_size, extended_l2, active, copied_checks):
        cs = self.cs
        if l1_size == 0:
            return
        if l1_offset % cs or l1_offset <= 0:
            self.error("ERROR: L1 table offset %#x is not cluster aligned" % l1_offset,
                       unrepairable=True)
            return
        self.inc(l1_offset, l1_size * 8)
        raw = self.read(l1_offset, l1_size * 8)
        if raw is None:
            return
        l1 = struct.unpack(">%dQ" % l1_size, raw)
        stride = 16 if extended_l2 else 8
        x = 62 - (self.cb - 8)                  # compressed descriptor: offset bits
        coff_mask = (1 << x) - 1
        nsec_mask = (1 << (62 - x)) - 1
        for i, e1 in enumerate(l1):
            l2_off = e1 & L1_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % cs:
                self.error("ERROR l2_offset=%#x: Table is not cluster aligned; L1 entry "
                           "corrupted" % l2_off, unrepairable=True)
                continue
            if (l2_off >> self.cb) >= self.file_clusters:
                self.error("ERROR l2_offset=%#x: L2 table is outside the image" % l2_off,
                           unrepairable=True)
                continue
            self.inc(l2_off, cs)
            if active:
                copied_checks.append((l1_offset + 8 * i, e1, l2_off >> self.cb, "L2 cluster"))
            l2 = self.read(l2_off, cs)
            if l2 is None:
                continue
            words = struct.unpack(">%dQ" % (cs // 8), l2)
            for k in range(0, len(words), stride // 8):
                e = words[k]
                if not e:
                    continue
                j = k * 8                                   # byte offset in the table
                if e & COMPRESSED:
                    if e & COPIED:
                        self.error("ERROR: coffset=%#x: copied flag must never be set for "
                                   "compressed clusters" % (e & coff_mask), unrepairable=True)
                    if extended_l2 and words[k + 1]:
                        self.error("ERROR compressed cluster at L2 offset %#x entry %d has a "
                                   "subcluster bitmap" % (l2_off, j // stride),
                                   unrepairable=True)
                    coff = e & coff_mask
                    nsec = ((e >> x) & nsec_mask) + 1
                    end = (coff & ~511) + nsec * 512
                    self.inc(coff, end - coff)
                    if active:
                        self.res.allocated_clusters += 1
                        self.res.compressed_clusters += 1
                    continue
                off = e & L2_OFFSET_MASK
                if not off:
                    continue
                if off % cs:
                    self.error("ERROR offset=%#x: Cluster is not properly aligned; L2 entry "
                               "corrupted" % off, unrepairable=True)
                    continue
                self.inc(off, cs)
                if active:
                    self.res.allocated_clusters += 1
                    copied_checks.append((l2_off + j, e, off >> self.cb, "data cluster"))


def _disk_refcounts(io, walk: _Walk, res: CheckResult, refcount_order, table_offset,
                    table_clusters):
    """Refcounts on disk (nonzero only), read tolerantly; counts the refcount structures
    into ``walk.rc_refs``."""
    cs = walk.cs
    entries = cs * 8 >> refcount_order
    disk: dict[int, int] = {}
    if table_offset % cs or table_offset <= 0 or table_clusters <= 0:
        walk.error("ERROR refcount table offset %#x is invalid" % table_offset,
                   unrepairable=True)
        return disk
    walk.inc(table_offset, table_clusters * cs, walk.rc_refs)
    raw = walk.read(table_offset, table_clusters * cs)
    if raw is None:
        return disk
    for ti, e in enumerate(struct.unpack(">%dQ" % (len(raw) // 8), raw)):
        if not e:
            continue
        off = e & OFFSET_MASK
        if e & ~OFFSET_MASK or off % cs:
            walk.error("ERROR refcount block %d is not cluster aligned; refcount table entry "
                       "corrupted" % ti)
            res.structure_errors += 1
            continue
        if (off >> walk.cb) >= walk.file_clusters:
            walk.error("ERROR refcount block %d is outside image" % ti)
            res.structure_errors += 1
            continue
        walk.inc(off, cs, walk.rc_refs)
        data = walk.read(off, cs)
        if data is None:
            continue
        base = ti * entries
        for i, v in block_entries(data, refcount_order):
            disk[base + i] = v
    return disk


def check_refcounts(io, *, cluster_bits: int, refcount_order: int,
                    refcount_table_offset: int, refcount_table_clusters: int,
                    l1_offset: int, l1_size: int, extended_l2: bool = False,
                    extra_ranges=(), nb_snapshots: int = 0, snapshot_l1s=None,
                    file_length: int | None = None) -> CheckResult:
    """Count every reference and compare with the refcounts on disk (read-only).

    ``extra_ranges``: ``(host_offset, length)`` pairs of other metadata in use.
    ``snapshot_l1s``: ``(l1_offset, l1_size)`` of each internal snapshot; required (and
    must have ``nb_snapshots`` entries) when the image has snapshots."""
    res, _walk, _disk = _check(io, cluster_bits, refcount_order, refcount_table_offset,
                               refcount_table_clusters, l1_offset, l1_size, extended_l2,
                               extra_ranges, nb_snapshots, snapshot_l1s, file_length)
    return res


def _check(io, cluster_bits, refcount_order, table_offset, table_clusters, l1_offset, l1_size,
           extended_l2, extra_ranges, nb_snapshots, snapshot_l1s, file_length):
    if nb_snapshots and (snapshot_l1s is None or len(snapshot_l1s) != nb_snapshots):
        raise RefcountError(errno.ENOTSUP, "qcow2: the image has %d internal snapshot(s); "
                            "checking its refcounts needs their L1 tables" % nb_snapshots)
    if file_length is None:
        file_length = io.length()
    res = CheckResult()
    walk = _Walk(io, cluster_bits, file_length, res)
    cs = walk.cs
    walk.inc(0, cs)                                    # the header cluster
    for off, length in extra_ranges:
        walk.inc(off, length)
    copied_checks: list = []
    walk.walk_l1(l1_offset, l1_size, extended_l2, True, copied_checks)
    for off, size in (snapshot_l1s or ()):
        walk.walk_l1(off, size, extended_l2, False, copied_checks)
    disk = _disk_refcounts(io, walk, res, refcount_order, table_offset, table_clusters)

    highest = -1
    clusters = set(walk.refs) | set(walk.rc_refs) | set(disk)
    for c in sorted(clusters):
        if c >= walk.file_clusters:
            continue                     # refcounts past the end of the file: not checked
        d = disk.get(c, 0)
        r = walk.refs.get(c, 0) + walk.rc_refs.get(c, 0)
        if d or r:
            highest = c
        if d > r:
            res.leaks += 1
            res.leaked[c] = (d, r)
            res.messages.append("Leaked cluster %d refcount=%d reference=%d" % (c, d, r))
        elif d < r:
            res.corruptions += 1
            res.errors[c] = (d, r)
            res.messages.append("ERROR cluster %d refcount=%d reference=%d" % (c, d, r))
    for loc, entry, cluster, what in copied_checks:
        d = disk.get(cluster, 0)
        if (d == 1) != bool(entry & COPIED):
            res.corruptions += 1
            res.copied_errors.append((loc, entry, d))
            res.messages.append("ERROR OFLAG_COPIED %s: entry=%#x refcount=%d"
                                % (what, entry, d))
    res.image_end_offset = (highest + 1) * cs
    return res, walk, disk


def repair_refcounts(io, *, cluster_bits: int, refcount_order: int,
                     refcount_table_offset: int, refcount_table_clusters: int,
                     l1_offset: int, l1_size: int, on_table_moved, extended_l2: bool = False,
                     extra_ranges=(), nb_snapshots: int = 0, snapshot_l1s=None,
                     fix_leaks: bool = True, fix_errors: bool = True,
                     force_rebuild: bool = False,
                     manager: RefcountManager | None = None) -> RepairResult:
    """Check, then repair (see the module's docstring); returns the result before and
    after.  ``on_table_moved(offset, clusters)`` rewrites the header when the refcount
    structure is rebuilt; ``manager``, when given, is flushed first and reloaded afterwards
    (its cached state would be stale).  ``force_rebuild`` rebuilds the refcount structure
    even when leaks (or nothing) are all there is to fix.

    For an image opened writable with the dirty bit set: repair, then clear the dirty bit
    (the driver owns the header)."""
    args = (cluster_bits, refcount_order, refcount_table_offset, refcount_table_clusters,
            l1_offset, l1_size, extended_l2, tuple(extra_ranges), nb_snapshots, snapshot_l1s)
    if manager is not None:
        manager.flush()
    before, walk, disk = _check(io, *args[:7], args[7], args[8], args[9], None)
    if before.unrepairable and (fix_errors or fix_leaks):
        raise RefcountError(errno.EIO, "qcow2: cannot repair the refcounts: "
                            + "; ".join(before.unrepairable[:3]))
    out = RepairResult(before=before, after=before,
                       table=(refcount_table_offset, refcount_table_clusters))
    table = out.table
    cs = 1 << cluster_bits
    if force_rebuild or (fix_errors and (before.errors or before.structure_errors)):
        table = _rebuild(io, walk, cluster_bits, refcount_order, on_table_moved)
        out.rebuilt = True
        out.corruptions_fixed += len(before.errors) + before.structure_errors
        out.leaks_fixed = before.leaks
    elif fix_leaks and before.leaks:
        mgr = RefcountManager(io, cluster_bits=cluster_bits, refcount_order=refcount_order,
                              table_offset=refcount_table_offset,
                              table_clusters=refcount_table_clusters,
                              file_length=io.length())
        for c, (d, r) in sorted(before.leaked.items()):
            mgr.increase(c * cs, 1, r - d)
        mgr.flush()
        out.leaks_fixed = before.leaks
    if fix_errors and before.copied_errors:
        mid = _check(io, cluster_bits, refcount_order, table[0], table[1], l1_offset, l1_size,
                     extended_l2, args[7], nb_snapshots, snapshot_l1s, None)[0]
        for loc, entry, d in mid.copied_errors:
            fixed = (entry | COPIED) if d == 1 else (entry & ~COPIED)
            io.pwrite(loc, struct.pack(">Q", fixed))
        io.flush()
        out.corruptions_fixed += len(mid.copied_errors)
    out.table = table
    out.after = _check(io, cluster_bits, refcount_order, table[0], table[1], l1_offset,
                       l1_size, extended_l2, args[7], nb_snapshots, snapshot_l1s, None)[0]
    if manager is not None:
        manager.reload(table[0], table[1], io.length())
    return out


def _rebuild(io, walk: _Walk, cluster_bits, refcount_order, on_table_moved):
    """A new refcount table and blocks past everything in use; returns (offset, clusters)."""
    cs = 1 << cluster_bits
    entries = cs * 8 >> refcount_order
    max_refcount = (1 << (1 << refcount_order)) - 1
    refs = {c: n for c, n in walk.refs.items() if c < walk.file_clusters}
    for c, n in refs.items():
        if n > max_refcount:
            raise RefcountError(errno.ERANGE, "qcow2: cannot repair: cluster %d has %d "
                                "references, more than refcount_bits=%d can count"
                                % (c, n, 1 << refcount_order))
    start = max(walk.file_clusters, max(refs, default=0) + 1)
    used_tis = {c // entries for c in refs}
    nt, nb = 1, 0
    while True:
        end = start + nt + nb
        tis = used_tis | set(range(start // entries, (end - 1) // entries + 1))
        want_nb = len(tis)
        want_nt = -(-(max(tis) + 1) * 8 // cs)
        if (want_nb, want_nt) == (nb, nt):
            break
        nb, nt = max(nb, want_nb), max(nt, want_nt)
    for c in range(start, start + nt + nb):
        refs[c] = 1
    table = [0] * (nt * cs // 8)
    blocks: dict[int, bytearray] = {}
    for k, ti in enumerate(sorted(tis)):
        table[ti] = (start + nt + k) * cs
        blocks[ti] = bytearray(cs)
    for c, n in refs.items():
        set_entry(blocks[c // entries], c % entries, n, refcount_order)
    for ti, data in blocks.items():
        io.pwrite(table[ti], bytes(data))
    io.pwrite(start * cs, struct.pack(">%dQ" % len(table), *table))
    io.flush()
    on_table_moved(start * cs, nt)
    return start * cs, nt


def rebuild_refcounts(io, **kw) -> RepairResult:
    """:func:`repair_refcounts` with a rebuild of the whole refcount structure."""
    return repair_refcounts(io, force_rebuild=True, **kw)
