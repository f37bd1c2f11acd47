"""A split virtqueue, device side (virtio 1.x, "Split Virtqueues").

The three rings live in the frontend's memory: the descriptor table (16 bytes per entry:
address, length, flags, next), the available ring (flags, index, ring of heads, then
``used_event``) and the used ring (flags, index, ring of (id, length), then ``avail_event``).
:class:`SplitQueue` reads chains from them and writes completions, keeping to what the
specification lets a driver do: heads and ``next`` within the table, chains no longer than
the table (no loops), readable buffers before writable ones, an indirect table only as the
chain's only descriptor (never nested, never with NEXT), every buffer inside the memory
table.  Anything else raises :class:`VirtioError`.

Ordering: x86 keeps stores in order and loads in order, but a store may pass a later load.
Where the driver's and the device's flags cross (``used_event`` read after the used index is
written; the available index read again after ``avail_event`` is written) the caller must
issue a full barrier between the two (the export takes and releases a lock, a locked
instruction).  :meth:`should_notify` and :meth:`enable_notify` say where.

Torn stores: ``struct.pack_into`` clears a field before it writes its bytes, so a driver
reading at the same moment could see 0.  The fields the driver reads while we write them
(the used index, ``avail_event``, the used flags) are therefore stored through 16-bit
memoryviews: one store each.

Hot path: precompiled structs, plain ints, ``__slots__``; a chain is returned as two lists
of memoryviews (readable, writable).
"""
from __future__ import annotations

import struct
from operator import add

from blockexport.virtio.errors import VirtioError

DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

#: offsets in the rings
RING_IDX = 2            # the index field of both the available and the used ring
RING_ENTRIES = 4        # where the entries start


def ring_sizes(size: int, event_idx: bool) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the available ring and the used ring for ``size``
    entries (with the trailing event fields when ``event_idx``)."""
    extra = 2 if event_idx else 0
    return DESC_SIZE * size, RING_ENTRIES + 2 * size + extra, RING_ENTRIES + 8 * size + extra


#: structs unpacking a whole indirect table at once, by entry count
_TABLES: dict = {}
_NEXT = DESC_F_NEXT
_NEXT_WRITE = DESC_F_NEXT | DESC_F_WRITE


def _sequential_table(table, n: int, region):
    """The chain of an indirect table laid out the way Linux writes them (entry i's next is
    i + 1, the last has no NEXT, readable entries then writable ones, all in ``region``) as
    (readable, writable) views, in a few C-level passes; None for any other table (the
    general walk then checks it entry by entry)."""
    unpack = _TABLES.get(n)
    if unpack is None:
        unpack = _TABLES[n] = struct.Struct("<" + "QIHH" * n).unpack_from
    vals = unpack(table)
    flags = vals[2::4]
    last = flags[-1]
    if last & ~DESC_F_WRITE:
        return None
    body = flags[:-1]
    writable_from = body.index(_NEXT_WRITE) if _NEXT_WRITE in body else n - 1
    if (body.count(_NEXT) != writable_from
            or body.count(_NEXT_WRITE) != n - 1 - writable_from
            or (not last & DESC_F_WRITE and writable_from != n - 1)):
        return None
    if vals[3:-4:4] != _SEQUENCE[n]:
        return None
    addrs = vals[0::4]
    lens = vals[1::4]
    start, end, view = region
    if min(addrs) < start or max(map(add, addrs, lens)) > end:
        return None
    views = [view[a - start:a - start + ln] for a, ln in zip(addrs, lens)]
    if last & DESC_F_WRITE:
        return views[:writable_from], views[writable_from:]
    return views, []


class _Sequences(dict):
    def __missing__(self, n):
        value = self[n] = tuple(range(1, n))
        return value


#: (1, 2, ..., n - 1): the next fields of a sequential table of n entries
_SEQUENCE = _Sequences()


class SplitQueue:
    """One queue: ``memory`` is a :class:`~blockexport.virtio.memory.GuestMemory`; the ring
    addresses are the frontend's (``memory.uva``); ``base`` is the first available index to
    serve.  ``event_idx`` / ``indirect``: the negotiated ring features."""

    __slots__ = ("memory", "size", "mask", "desc", "avail", "used", "used16", "last_avail",
                 "used_idx", "event_idx", "indirect", "signalled", "signalled_valid",
                 "_used_event_off", "_avail_event_slot")

    def __init__(self, memory, size: int, desc_addr: int, avail_addr: int, used_addr: int,
                 base: int = 0, event_idx: bool = False, indirect: bool = False):
        if size <= 0 or size & (size - 1) or size > 32768:
            raise VirtioError("queue size %d" % size)
        self.memory = memory
        self.size = size
        self.mask = size - 1
        desc_len, avail_len, used_len = ring_sizes(size, event_idx)
        self.desc = memory.uva(desc_addr, desc_len)
        self.avail = memory.uva(avail_addr, avail_len)
        self.used = memory.uva(used_addr, used_len)
        #: the used ring as 16-bit words (single-store writes of flags, idx, avail_event)
        self.used16 = self.used.cast("B").cast("H")
        self.last_avail = base & 0xFFFF
        self.used_idx = U16.unpack_from(self.used, RING_IDX)[0]
        self.event_idx = event_idx
        self.indirect = indirect
        self.signalled = 0
        self.signalled_valid = False
        self._used_event_off = RING_ENTRIES + 2 * size
        self._avail_event_slot = (RING_ENTRIES + 8 * size) // 2

    # --- driver -> device -------------------------------------------------------------------
    def has_avail(self) -> bool:
        return U16.unpack_from(self.avail, RING_IDX)[0] != self.last_avail

    def pop(self):
        """The next available chain as ``(head, readable, writable)`` (lists of
        memoryviews), or None when the ring is empty."""
        last = self.last_avail
        avail_idx = U16.unpack_from(self.avail, RING_IDX)[0]
        if avail_idx == last:
            return None
        if (avail_idx - last) & 0xFFFF > self.size:
            raise VirtioError("available index %d is more than %d ahead of %d"
                              % (avail_idx, self.size, last))
        head = U16.unpack_from(self.avail, RING_ENTRIES + 2 * (last & self.mask))[0]
        self.last_avail = (last + 1) & 0xFFFF
        return (head,) + self._chain(head)

    def _chain(self, head: int):
        if head >= self.size:
            raise VirtioError("descriptor head %d out of range (queue size %d)"
                              % (head, self.size))
        table = self.desc
        limit = self.size
        memory = self.memory
        readable = []
        writable = []
        i = head
        count = 0
        addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * i)
        if flags & DESC_F_INDIRECT:
            if not self.indirect:
                raise VirtioError("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
            if flags & DESC_F_NEXT:
                raise VirtioError("indirect descriptor with NEXT set")
            if length == 0 or length % DESC_SIZE:
                raise VirtioError("indirect table of %d bytes" % length)
            try:
                table = memory.gpa(addr, length)
            except VirtioError:
                # contiguous in guest memory but over two regions: read it as a copy (the
                # device never writes a descriptor table)
                table = b"".join(memory.gpa_segments(addr, length))
            limit = length // DESC_SIZE
            if limit > 2:
                chain = _sequential_table(table, limit, memory.regions_by_gpa[0])
                if chain is not None:
                    return chain
            i = 0
            addr, length, flags, nxt = DESC.unpack_from(table, 0)
        # The hot loop: a 126-segment chain (a Linux 1 MiB request) walks it 128 times, so
        # translation is inlined for the region the previous buffer was in; a buffer in
        # another region, or across two, takes the general path.
        unpack = DESC.unpack_from
        regions = memory.regions_by_gpa
        start, end, view = regions[0]
        while True:
            count += 1
            if count > limit:
                raise VirtioError("descriptor chain from %d loops" % head)
            if flags & DESC_F_INDIRECT:
                raise VirtioError("indirect descriptor inside a chain")
            if start <= addr and addr + length <= end:
                seg = view[addr - start:addr - start + length]
            else:
                for start, end, view in regions:
                    if start <= addr and addr + length <= end:
                        seg = view[addr - start:addr - start + length]
                        break
                else:
                    seg = None
                    segs = memory.gpa_segments(addr, length)
            if flags & DESC_F_WRITE:
                if seg is not None:
                    writable.append(seg)
                else:
                    writable.extend(segs)
            else:
                if writable:
                    raise VirtioError("readable descriptor after a writable one")
                if seg is not None:
                    readable.append(seg)
                else:
                    readable.extend(segs)
            if not flags & DESC_F_NEXT:
                return readable, writable
            i = nxt
            if i >= limit:
                raise VirtioError("descriptor next %d out of range (%d)" % (i, limit))
            addr, length, flags, nxt = unpack(table, DESC_SIZE * i)

    # --- device -> driver -------------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Complete chain ``head`` with ``length`` bytes written to its writable buffers."""
        idx = self.used_idx
        USED_ELEM.pack_into(self.used, RING_ENTRIES + 8 * (idx & self.mask), head, length)
        self.used_idx = self.used16[RING_IDX // 2] = (idx + 1) & 0xFFFF

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one
        (call after a full barrier that follows :meth:`push`)."""
        new = self.used_idx
        if self.event_idx:
            old = self.signalled
            valid = self.signalled_valid
            self.signalled = new
            self.signalled_valid = True
            if not valid:
                return True
            event = U16.unpack_from(self.avail, self._used_event_off)[0]
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not U16.unpack_from(self.avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def enable_notify(self) -> None:
        """Ask the driver to kick for what it makes available next.  Afterwards, issue a full
        barrier and check :meth:`has_avail` before sleeping."""
        if self.event_idx:
            self.used16[self._avail_event_slot] = self.last_avail
        else:
            self.used16[0] &= ~USED_F_NO_NOTIFY

    def disable_notify(self) -> None:
        """Tell the driver kicks are not needed (the device is polling the ring)."""
        if not self.event_idx:
            self.used16[0] |= USED_F_NO_NOTIFY
