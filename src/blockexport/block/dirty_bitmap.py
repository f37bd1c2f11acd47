"""Dirty bitmaps: which parts of a node were written since a point in time.

A :class:`DirtyBitmap` belongs to one node (``node.dirty_bitmaps``, insertion-ordered by name)
and covers the node's length at creation in units of ``granularity`` bytes (a power of two,
at least 512).  Every write, write-zeroes and (performed) discard that reaches the node marks
the granules it touches in each *enabled* bitmap before the request is acknowledged; the
node installs the marking hook itself (see ``BlockNode._dirty_bitmaps_changed``).

The bits live in a ``bytearray`` (bit ``i`` is bit ``i & 7`` of byte ``i >> 3``); marking
and clearing take a per-bitmap lock, so marks from many connection threads never get lost.
Runs of clean/dirty granules are found at C speed with two precompiled regular expressions.

The module-level ``bitmap_*`` functions are the block-dirty-bitmap-* QMP commands' semantics
with QEMU 7.2's checks, check order and error messages (observed on qemu-storage-daemon
7.2.22); :func:`resolve_export_bitmaps` is the bitmap part of NBD export creation.
"""
from __future__ import annotations

import re
import threading

from blockexport.errors import Error

#: QEMU's BDRV_BITMAP_MAX_NAME_SIZE (bytes of UTF-8).
MAX_NAME_SIZE = 1023
DEFAULT_GRANULARITY = 65536
MIN_GRANULARITY = 512

#: Drivers QEMU treats as filters when it looks for an exported bitmap down a node's chain
#: (``raw`` is a format driver there, so a bitmap under it is not found by name).
FILTER_DRIVERS = frozenset(("throttle", "copy-on-read", "compress", "preallocate",
                            "blkdebug", "blkverify", "copy-before-write", "snapshot-access"))

_ONES = b"\xff" * 65536
_NOT_ZERO = re.compile(b"[^\x00]")
_NOT_ONES = re.compile(b"[^\xff]")


def _lowest_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


class DirtyBitmap:
    """One dirty bitmap of ``node`` covering ``size`` bytes."""

    def __init__(self, name: str, size: int, granularity: int = DEFAULT_GRANULARITY,
                 node=None, enabled: bool = True, persistent: bool = False):
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of 2 >= 512")
        self.name = name
        self.node = node
        self.size = size
        self.granularity = granularity
        self.enabled = enabled
        self.persistent = persistent
        self.readonly = False
        self.inconsistent = False
        #: Holders that use the bitmap (an NBD export each); QEMU's "busy".
        self.busy_count = 0
        self._shift = granularity.bit_length() - 1
        self._nbits = (size + granularity - 1) >> self._shift
        self._bits = bytearray((self._nbits + 7) >> 3)
        self._lock = threading.Lock()

    # ---- state ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.busy_count > 0

    @property
    def recording(self) -> bool:
        return self.enabled

    def count(self) -> int:
        """Dirty bytes as QEMU counts them: dirty granules times the granularity (the last,
        partial granule counts whole)."""
        return int.from_bytes(self._bits, "little").bit_count() << self._shift

    def __repr__(self) -> str:
        return (f"<DirtyBitmap {self.name!r} granularity={self.granularity} "
                f"enabled={self.enabled} count={self.count()}>")

    # ---- marking (the write hot path) ----------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` dirty (granules touched, clipped to the size)."""
        if length <= 0:
            return
        shift = self._shift
        a = offset >> shift
        b = ((offset + length - 1) >> shift) + 1
        if b > self._nbits:
            b = self._nbits
            if a >= b:
                return
        with self._lock:
            self._set_range(a, b)

    def _set_range(self, a: int, b: int) -> None:
        """Set bits [a, b) (a < b); caller holds the lock."""
        bits = self._bits
        ba = a >> 3
        bb = (b - 1) >> 3
        if ba == bb:
            bits[ba] |= ((1 << (b - a)) - 1) << (a & 7)
            return
        bits[ba] |= (0xFF << (a & 7)) & 0xFF
        pos = ba + 1
        while pos < bb:
            n = min(bb - pos, len(_ONES))
            bits[pos:pos + n] = _ONES[:n]
            pos += n
        bits[bb] |= 0xFF >> (7 - ((b - 1) & 7))

    def clear(self) -> None:
        with self._lock:
            self._bits = bytearray(len(self._bits))

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR ``other`` into this bitmap (granularities may differ: a dirty granule of
        ``other`` dirties every granule of ours that it overlaps)."""
        if other is self:
            return
        with other._lock:
            snapshot = bytes(other._bits)
        if other.granularity == self.granularity and len(snapshot) == len(self._bits):
            with self._lock:
                merged = (int.from_bytes(self._bits, "little")
                          | int.from_bytes(snapshot, "little"))
                self._bits = bytearray(merged.to_bytes(len(self._bits), "little"))
            return
        runs = []
        oshift = other._shift
        i = _next_bit(snapshot, 0, other._nbits, True)
        while i < other._nbits:
            j = _next_bit(snapshot, i, other._nbits, False)
            runs.append((i << oshift, (j - i) << oshift))
            i = _next_bit(snapshot, j, other._nbits, True)
        for offset, length in runs:
            self.mark(offset, length)

    # ---- queries -------------------------------------------------------------------------

    def extents(self, offset: int, length: int, max_extents: int) -> list:
        """``[len, flags, len, flags, ...]`` over ``[offset, offset + length)``, flags 1 =
        dirty (NBD ``qemu:dirty-bitmap:``): runs merged, boundaries on granules, at most
        ``max_extents`` extents; bytes past the bitmap's size are clean."""
        out = []
        end = offset + length
        if length <= 0 or max_extents <= 0:
            return out
        shift = self._shift
        nbits = self._nbits
        bits = self._bits  # a snapshot is not needed: a racing mark only makes runs longer
        pos = offset
        last = -1
        while pos < end:
            i = pos >> shift
            if i >= nbits:
                run_end, flag = end, 0
            else:
                dirty = bits[i >> 3] >> (i & 7) & 1
                j = _next_bit(bits, i, nbits, not dirty)
                run_end = min(end, j << shift) if j < nbits else end
                flag = dirty
            if flag == last:
                out[-2] += run_end - pos
            else:
                if len(out) >= 2 * max_extents:
                    break
                out.append(run_end - pos)
                out.append(flag)
                last = flag
            pos = run_end
        return out


def _next_bit(bits, i: int, nbits: int, value: bool) -> int:
    """Index of the first bit >= ``i`` equal to ``value`` (``nbits`` when none)."""
    if i >= nbits:
        return nbits
    byte = i >> 3
    cur = bits[byte] if value else bits[byte] ^ 0xFF
    cur &= (0xFF << (i & 7)) & 0xFF
    if not cur:
        m = (_NOT_ZERO if value else _NOT_ONES).search(bits, byte + 1)
        if m is None:
            return nbits
        byte = m.start()
        cur = bits[byte] if value else bits[byte] ^ 0xFF
    j = (byte << 3) + _lowest_bit(cur)
    return j if j < nbits else nbits


# ---- lookups and checks (QEMU's block_dirty_bitmap_lookup / bdrv_dirty_bitmap_check) -------

def _node(graph, node_name: str):
    node = graph.lookup(node_name)
    if node is None:
        raise Error("Node '%s' not found" % node_name)
    return node


def lookup(graph, node_name: str, name: str) -> DirtyBitmap:
    """The bitmap ``name`` of node ``node_name`` (QEMU's lookup errors)."""
    bm = _node(graph, node_name).dirty_bitmaps.get(name)
    if bm is None:
        raise Error("Dirty bitmap '%s' not found" % name)
    return bm


def check(bm: DirtyBitmap, allow_ro: bool = False) -> None:
    """Refuse a busy, (unless ``allow_ro``) read-only, or inconsistent bitmap."""
    if bm.busy:
        raise Error("Bitmap '%s' is currently in use by another operation and cannot be used"
                    % bm.name)
    if not allow_ro and bm.readonly:
        raise Error("Bitmap '%s' is readonly and cannot be modified" % bm.name)
    if bm.inconsistent:
        # QEMU appends a hint (try block-dirty-bitmap-remove) that no user sees: QMP drops
        # hints and qemu-nbd/--export fail through &error_fatal, which loses it
        raise Error("Bitmap '%s' is inconsistent and cannot be used" % bm.name)


def default_granularity(node) -> int:
    """64 KiB, or the node's cluster size (at least 4 KiB) when its format has one."""
    cluster = getattr(node, "cluster_size", 0) or 0
    return max(4096, cluster) if cluster else DEFAULT_GRANULARITY


# ---- block-dirty-bitmap-* ------------------------------------------------------------------

def bitmap_add(graph, node, name: str, granularity: int | None = None,
               persistent: bool = False, disabled: bool = False) -> DirtyBitmap:
    """block-dirty-bitmap-add; ``node`` is a node name (or a node)."""
    if not name:
        raise Error("Bitmap name cannot be empty")
    if isinstance(node, str):
        node_obj = graph.lookup(node)
        if node_obj is None:
            raise Error("Cannot find device='%s' nor node-name='%s'" % (node, node))
    else:
        node_obj = node
    if granularity is not None:
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise Error("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node_obj)
    if persistent:
        can_store = getattr(node_obj, "can_store_dirty_bitmap", None)
        if can_store is None:
            raise Error("Can't store persistent bitmaps to %s: Operation not supported"
                        % node_obj.node_name)
        can_store(name, granularity)  # the driver raises its own Error
    if name in node_obj.dirty_bitmaps:
        raise Error("Bitmap already exists: %s" % name)
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE:
        raise Error("Bitmap name too long: %s" % name)
    bm = DirtyBitmap(name, node_obj.length(), granularity, node=node_obj,
                     enabled=not disabled, persistent=persistent)
    node_obj.dirty_bitmaps[name] = bm
    node_obj._dirty_bitmaps_changed()
    return bm


def bitmap_remove(graph, node: str, name: str) -> None:
    bm = lookup(graph, node, name)
    if bm.busy or bm.readonly:  # an inconsistent bitmap may be removed
        check(bm)
    owner = bm.node
    if bm.persistent:
        remove_stored = getattr(owner, "remove_stored_dirty_bitmap", None)
        if remove_stored is not None:
            remove_stored(name)
    if owner.dirty_bitmaps.get(name) is bm:
        del owner.dirty_bitmaps[name]
    owner._dirty_bitmaps_changed()


def bitmap_clear(graph, node: str, name: str) -> None:
    bm = lookup(graph, node, name)
    check(bm)
    bm.clear()


def bitmap_enable(graph, node: str, name: str) -> None:
    bm = lookup(graph, node, name)
    check(bm, allow_ro=True)
    bm.enabled = True
    bm.node._dirty_bitmaps_changed()


def bitmap_disable(graph, node: str, name: str) -> None:
    bm = lookup(graph, node, name)
    check(bm, allow_ro=True)
    bm.enabled = False
    bm.node._dirty_bitmaps_changed()


def _check_mergeable(target: DirtyBitmap, src: DirtyBitmap) -> None:
    """QEMU's bdrv_merge_dirty_bitmap() checks: the target, the source, their sizes."""
    check(target)
    check(src, allow_ro=True)
    if src.size != target.size:
        raise Error("Bitmaps are of different sizes (destination size is %d, source size is "
                    "%d) and can't be merged" % (target.size, src.size))


def bitmap_merge(graph, node: str, target: str, bitmaps) -> None:
    """block-dirty-bitmap-merge: every source (``str`` on ``node`` or ``{"node", "name"}``)
    is looked up, then merged into the target as in QEMU 7.2 (which checks the target, the
    source and their sizes at each merge); nothing changes on error (QEMU restores the
    target)."""
    dst = lookup(graph, node, target)
    sources = []
    for item in bitmaps:
        if isinstance(item, str):
            src = lookup(graph, node, item)
        else:
            src = lookup(graph, item["node"], item["name"])
        _check_mergeable(dst, src)
        sources.append(src)
    check(dst)
    # QEMU 7.2 crashes on an empty list; we merge nothing (checking the target all the same).
    for src in sources:
        dst.merge_from(src)


def bitmap_info(bm: DirtyBitmap) -> dict:
    """QEMU 7.2's BlockDirtyInfo (``inconsistent`` only when true)."""
    info = {"name": bm.name, "recording": bm.recording, "persistent": bm.persistent,
            "busy": bm.busy, "granularity": bm.granularity, "count": bm.count()}
    if bm.inconsistent:
        info["inconsistent"] = True
    return info


def node_bitmaps_info(node) -> list[dict]:
    """A node's bitmaps for query-named-block-nodes / query-block: newest first."""
    return [bitmap_info(bm) for bm in reversed(list(node.dirty_bitmaps.values()))]


# ---- NBD exports -----------------------------------------------------------------------------

def _filtered_or_cow_child(node):
    children = node.children
    if node.driver in FILTER_DRIVERS:
        return children.get("file")
    return children.get("backing")


def _find_node(graph, node, node_name: str):
    if graph is not None:
        return _node(graph, node_name)
    # Without the graph: the export's node and everything below it.
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.node_name == node_name:
            return n
        stack.extend(n.children.values())
    raise Error("Node '%s' not found" % node_name)


def find_export_bitmap(node, name: str):
    """A bitmap called ``name`` on ``node`` or down its filter/backing chain, or ``None``."""
    while node is not None:
        bm = node.dirty_bitmaps.get(name)
        if bm is not None:
            return bm
        node = _filtered_or_cow_child(node)
    return None


def resolve_export_bitmaps(node, specs, readonly: bool, graph=None) -> list[DirtyBitmap]:
    """The bitmaps an NBD export of ``node`` offers, from the user's specs (``str``: on the
    node or down its filter/backing chain; ``{"node", "name"}``; or a DirtyBitmap), checked
    in order with QEMU's errors.  Does not mark them busy (see :func:`acquire`)."""
    out = []
    for spec in specs:
        if isinstance(spec, DirtyBitmap):
            bm = spec
        elif isinstance(spec, str):
            bm = find_export_bitmap(node, spec)
            if bm is None:
                raise Error("Bitmap '%s' is not found" % spec)
        else:
            owner = _find_node(graph, node, spec["node"])
            bm = owner.dirty_bitmaps.get(spec["name"])
            if bm is None:
                raise Error("Dirty bitmap '%s' not found" % spec["name"])
        # QEMU 7.2 refuses an enabled bitmap of a writable node on a read-only export only
        # when it was named by a string (not {"node", "name"}), and before checking it busy
        if (readonly and not isinstance(spec, dict) and not bm.node.read_only
                and bm.enabled):
            raise Error("Enabled bitmap '%s' incompatible with readonly export" % bm.name)
        check(bm, allow_ro=True)
        out.append(bm)
    return out


def acquire(bitmaps) -> None:
    """Mark bitmaps busy (an export uses them)."""
    for bm in bitmaps:
        bm.busy_count += 1


def release(bitmaps) -> None:
    for bm in bitmaps:
        if bm.busy_count > 0:
            bm.busy_count -= 1
