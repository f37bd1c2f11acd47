"""The split virtqueue, device side (blockexport.virtio.ring), driven by a little "driver"
written from the virtio 1.x specification ("Split Virtqueues"): descriptor table entries
{le64 addr; le32 len; le16 flags; le16 next}, available ring {flags, idx, ring[size],
used_event}, used ring {flags, idx, ring[size] of {le32 id; le32 len}, avail_event}.

Guest memory is two bytearrays whose guest-physical and frontend-virtual addresses differ
(and are in a different order), so every translation is exercised."""
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from blockexport.virtio.errors import VirtioError
from blockexport.virtio.memory import GuestMemory
from blockexport.virtio.ring import SplitQueue

# hypothesis keeps caches in ./.hypothesis even without an example database: not in the tree
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "blockexport-hypothesis-%d"
                                     % os.getuid()))

NEXT, WRITE, INDIRECT = 1, 2, 4
REGION = 0x10000
# region A: gpa 0x0, region B: gpa 0x10000 (contiguous in guest-physical space); the frontend
# maps B below A
UVA_A, UVA_B = 0x7F00_0000_0000, 0x5500_0000_0000
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000


class Driver:
    """The driver's side of one queue, on raw bytes."""

    def __init__(self, size=8, used_idx=0, avail_idx=None):
        self.a = bytearray(REGION)
        self.b = bytearray(REGION)
        self.memory = GuestMemory([(0, REGION, UVA_A, self.a),
                                   (REGION, REGION, UVA_B, self.b)])
        self.size = size
        self.avail_idx = used_idx if avail_idx is None else avail_idx
        self.base = self.avail_idx             # the device's first index to serve
        struct.pack_into("<H", self.a, AVAIL_GPA + 2, self.avail_idx)
        struct.pack_into("<H", self.a, USED_GPA + 2, used_idx)

    def queue(self, base=None, **kw):
        return SplitQueue(self.memory, self.size, UVA_A + DESC_GPA, UVA_A + AVAIL_GPA,
                          UVA_A + USED_GPA, self.base if base is None else base, **kw)

    # guest-physical memory as the driver sees it
    def write(self, gpa, data):
        for i, byte in enumerate(data):
            a = gpa + i
            (self.a if a < REGION else self.b)[a % REGION] = byte

    def read(self, gpa, n):
        return bytes((self.a if a < REGION else self.b)[a % REGION] for a in range(gpa, gpa + n))

    def desc(self, i, addr, length, flags=0, nxt=0, table=DESC_GPA):
        self.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def make_avail(self, *heads):
        for head in heads:
            struct.pack_into("<H", self.a, AVAIL_GPA + 4 + 2 * (self.avail_idx % self.size),
                             head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.a, AVAIL_GPA + 2, self.avail_idx)

    def set_avail_idx(self, idx):
        struct.pack_into("<H", self.a, AVAIL_GPA + 2, idx)

    def set_avail_flags(self, flags):
        struct.pack_into("<H", self.a, AVAIL_GPA, flags)

    def set_used_event(self, value):
        struct.pack_into("<H", self.a, AVAIL_GPA + 4 + 2 * self.size, value)

    def used_idx(self):
        return struct.unpack_from("<H", self.a, USED_GPA + 2)[0]

    def used_flags(self):
        return struct.unpack_from("<H", self.a, USED_GPA)[0]

    def used_elem(self, slot):
        return struct.unpack_from("<II", self.a, USED_GPA + 4 + 8 * slot)

    def avail_event(self):
        return struct.unpack_from("<H", self.a, USED_GPA + 4 + 8 * self.size)[0]


def joined(views):
    return b"".join(bytes(v) for v in views)


# --- memory ---------------------------------------------------------------------------------
def test_guest_memory_translation():
    d = Driver()
    d.write(0x10010, b"hello")
    assert bytes(d.memory.gpa(0x10010, 5)) == b"hello"
    assert bytes(d.memory.uva(UVA_B + 0x10, 5)) == b"hello"
    d.memory.uva(UVA_A + 0x20, 2)[:] = b"xy"
    assert d.read(0x20, 2) == b"xy"
    with pytest.raises(VirtioError):
        d.memory.gpa(0xFFFE, 4)                   # one view can't cross regions
    assert [bytes(v) for v in d.memory.gpa_segments(0xFFFE, 4)] == [d.read(0xFFFE, 2),
                                                                    d.read(0x10000, 2)]
    for bad in ((0x20000, 1), (0x1FFFF, 2), (-1 & (1 << 64) - 1, 1)):
        with pytest.raises(VirtioError):
            d.memory.gpa_segments(*bad)
    with pytest.raises(VirtioError):
        d.memory.uva(0x10, 1)                     # a gpa is not a frontend address
    with pytest.raises(VirtioError):
        d.memory.uva(UVA_A + REGION - 1, 2)


def test_rings_outside_memory_are_refused():
    d = Driver()
    with pytest.raises(VirtioError):
        SplitQueue(d.memory, 8, 0x1000, UVA_A + AVAIL_GPA, UVA_A + USED_GPA)
    with pytest.raises(VirtioError):       # the used ring's last bytes past the region
        SplitQueue(d.memory, 8, UVA_A, UVA_A + AVAIL_GPA, UVA_A + REGION - 4 - 8 * 8 + 1)
    for size in (0, 3, 65536):
        with pytest.raises(VirtioError):
            SplitQueue(d.memory, size, UVA_A + DESC_GPA, UVA_A + AVAIL_GPA, UVA_A + USED_GPA)


# --- chains ---------------------------------------------------------------------------------
def test_direct_chain_out_of_order_descriptors():
    d = Driver()
    d.write(0x8000, b"H" * 16)
    d.desc(3, 0x8000, 16, NEXT, 6)                 # request header (readable)
    d.desc(6, 0x9000, 512, NEXT | WRITE, 1)        # data (writable)
    d.desc(1, 0x9200, 1, WRITE)                    # status (writable)
    d.make_avail(3)
    q = d.queue()
    assert q.has_avail()
    head, readable, writable = q.pop()
    assert head == 3
    assert joined(readable) == b"H" * 16
    assert [len(v) for v in writable] == [512, 1]
    writable[0][:] = b"D" * 512
    writable[1][:] = b"\x00"
    assert d.read(0x9000, 513) == b"D" * 512 + b"\x00"
    assert not q.has_avail() and q.pop() is None


def test_chain_crossing_the_region_boundary():
    d = Driver()
    payload = bytes(range(64))
    d.write(REGION - 24, payload)
    d.desc(0, REGION - 24, 64)                     # 24 bytes in A, 40 in B
    d.desc(1, REGION - 8, 16, WRITE)
    d.desc(0, REGION - 24, 64, NEXT, 1)
    d.make_avail(0)
    head, readable, writable = d.queue().pop()
    assert [len(v) for v in readable] == [24, 40]
    assert joined(readable) == payload
    assert [len(v) for v in writable] == [8, 8]
    writable[0][:] = b"a" * 8
    writable[1][:] = b"b" * 8
    assert d.read(REGION - 8, 16) == b"a" * 8 + b"b" * 8


def test_zero_length_descriptor_gives_no_bytes():
    d = Driver()
    d.desc(0, 0x8000, 0, NEXT, 1)
    d.desc(1, 0x8000, 4, WRITE)
    d.make_avail(0)
    _head, readable, writable = d.queue().pop()
    assert joined(readable) == b"" and [len(v) for v in writable] == [4]


def test_indirect_table():
    d = Driver()
    table = 0x14000                                # in region B
    d.write(0x18000, b"R" * 16)
    d.desc(0, 0x18000, 16, NEXT, 2, table=table)
    d.desc(2, 0x18100, 4096, WRITE | NEXT, 1, table=table)
    d.desc(1, REGION - 1, 2, WRITE, table=table)   # crosses into B
    # the write-only flag of the descriptor pointing at the table is ignored (spec)
    d.desc(5, table, 3 * 16, INDIRECT | WRITE)
    d.make_avail(5)
    head, readable, writable = d.queue(indirect=True).pop()
    assert head == 5
    assert joined(readable) == b"R" * 16
    assert [len(v) for v in writable] == [4096, 1, 1]


def test_indirect_table_crossing_the_region_boundary():
    # the table is a buffer in guest-physical memory like any other: contiguous there, it
    # may span two of the frontend's regions (two adjacent RAM blocks)
    d = Driver()
    table = REGION - 16
    d.write(0x8000, b"abcd")
    d.desc(0, 0x8000, 4, NEXT, 1, table=table)     # entry 0 in region A
    d.desc(1, 0x18000, 8, WRITE, table=table)      # entry 1 in region B
    d.desc(0, table, 32, INDIRECT)
    d.make_avail(0)
    _h, readable, writable = d.queue(indirect=True).pop()
    assert joined(readable) == b"abcd" and [len(v) for v in writable] == [8]
    writable[0][:] = b"12345678"
    assert d.read(0x18000, 8) == b"12345678"


def test_indirect_table_with_one_entry_and_unused_tail():
    d = Driver()
    d.desc(0, 0x18000, 8, WRITE, table=0x5000)
    d.desc(7, 0x5000, 64, INDIRECT)                # 4 entries, only the first in the chain
    d.make_avail(7)
    _h, readable, writable = d.queue(indirect=True).pop()
    assert readable == [] and [len(v) for v in writable] == [8]


def test_several_chains_in_order_and_avail_wraparound():
    d = Driver(size=4, used_idx=0xFFFE)
    for i in range(4):
        d.desc(i, 0x8000 + 16 * i, 16)
        d.write(0x8000 + 16 * i, bytes([i]) * 16)
    q = d.queue()
    d.make_avail(2, 0, 3)                          # idx 0xFFFE -> 0x0001
    got = [q.pop() for _ in range(3)]
    assert [g[0] for g in got] == [2, 0, 3]
    assert [joined(g[1]) for g in got] == [b"\2" * 16, b"\0" * 16, b"\3" * 16]
    assert q.pop() is None and q.last_avail == 1


# --- completions and notifications ----------------------------------------------------------
def test_used_ring_after_push():
    d = Driver(size=8, used_idx=0xFFFE)
    q = d.queue()
    q.push(5, 513)
    assert d.used_elem(0xFFFE % 8) == (5, 513) and d.used_idx() == 0xFFFF
    q.push(2, 0)
    q.push(7, 1)
    assert d.used_elem(7) == (2, 0) and d.used_elem(0) == (7, 1)
    assert d.used_idx() == 1


def need_event(event, new, old):
    """The specification's vring_need_event."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


# after the first call (always made) the last signalled index is start + 1; the driver's
# used_event E asks for a call once entry E is used, i.e. when E is in [old, new)
EVENT_CASES = {
    (0xFFFD, 1, 0xFFFF): False,     # entry 0xFFFF not used yet
    (0xFFFD, 2, 0xFFFF): True,      # used now, the index wrapped to 0
    (0xFFFE, 2, 0xFFFF): True,      # old 0xFFFF, new 1
    (0xFFFE, 3, 0x0000): True,      # the event just after the wrap
    (0xFFFE, 3, 0x0001): True,      # the last entry pushed
    (0xFFFE, 3, 0x0002): False,     # one past what was pushed
    (0xFFFE, 3, 0xFFFD): False,     # behind what was signalled before
    (0x0005, 2, 0x0005): False,
    (0x0005, 2, 0x0006): True,
    (0x0005, 2, 0x0007): True,
    (0x0005, 2, 0x0008): False,
}


@pytest.mark.parametrize("start,pushes,event", sorted(EVENT_CASES))
def test_event_idx_notification_across_wraparound(start, pushes, event):
    d = Driver(size=8, used_idx=start)
    q = d.queue(event_idx=True)
    q.push(0, 0)
    assert q.should_notify()                       # the first completion always calls
    old = (start + 1) & 0xFFFF
    d.set_used_event(event)
    for _ in range(pushes):
        q.push(1, 0)
    new = (old + pushes) & 0xFFFF
    expected = need_event(event, new, old)
    assert q.should_notify() is expected
    # the reference formula agrees with the cases worked out by hand
    assert expected is EVENT_CASES[(start, pushes, event)]


def test_event_idx_old_moves_with_every_check():
    d = Driver(used_idx=0xFFFF)
    q = d.queue(event_idx=True)
    q.push(0, 0)
    assert q.should_notify()                       # 0xFFFF -> 0
    d.set_used_event(0)                            # wants a call once entry 0 is used
    q.push(0, 0)                                   # -> 1: entry 0 used
    assert q.should_notify()
    q.push(0, 0)                                   # -> 2: entry 0 was signalled already
    assert not q.should_notify()
    assert not q.should_notify()                   # nothing new: no call


def test_event_idx_ignores_the_no_interrupt_flag():
    d = Driver()
    q = d.queue(event_idx=True)
    d.set_avail_flags(1)
    q.push(0, 0)
    assert q.should_notify()
    d.set_used_event(1)
    q.push(0, 0)
    assert q.should_notify()


def test_no_interrupt_flag_without_event_idx():
    d = Driver()
    q = d.queue()
    q.push(0, 0)
    assert q.should_notify()
    d.set_avail_flags(1)                           # VIRTQ_AVAIL_F_NO_INTERRUPT
    q.push(0, 0)
    assert not q.should_notify()
    d.set_avail_flags(0)
    assert q.should_notify()
    d.set_used_event(0xFFFF)                       # not read without EVENT_IDX
    assert q.should_notify()


def test_enable_notify_writes_avail_event():
    d = Driver(used_idx=0xFFFE)
    q = d.queue(event_idx=True)
    d.desc(0, 0x8000, 1)
    d.make_avail(0, 0, 0)
    for _ in range(3):
        q.pop()
    q.enable_notify()
    assert d.avail_event() == 1
    assert d.used_flags() == 0
    q.disable_notify()                             # flags are not the driver's to read here
    assert d.used_flags() == 0 and d.avail_event() == 1


def test_no_notify_flag_without_event_idx():
    d = Driver()
    q = d.queue()
    q.disable_notify()
    assert d.used_flags() == 1                     # VIRTQ_USED_F_NO_NOTIFY
    q.enable_notify()
    assert d.used_flags() == 0
    assert d.avail_event() == 0                    # not written without EVENT_IDX


def test_has_avail():
    d = Driver(used_idx=0xFFFF)
    q = d.queue()
    assert not q.has_avail()
    d.desc(0, 0x8000, 1)
    d.make_avail(0)
    assert q.has_avail()
    q.pop()
    assert not q.has_avail()


def test_queue_starts_at_base():
    d = Driver(avail_idx=3)
    d.desc(0, 0x8000, 1)
    d.desc(1, 0x8001, 1)
    struct.pack_into("<4H", d.a, AVAIL_GPA + 4, 0, 0, 0, 1)
    q = d.queue(base=2)
    assert q.pop()[0] == 0 and q.pop() is None
    q = d.queue(base=3)
    assert q.pop() is None


# --- malformed rings ------------------------------------------------------------------------
def popping(d, **kw):
    with pytest.raises(VirtioError) as ei:
        d.queue(**kw).pop()
    return str(ei.value)


def test_head_out_of_range():
    d = Driver(size=8)
    d.make_avail(8)
    assert "head 8" in popping(d)


def test_next_out_of_range():
    d = Driver(size=8)
    d.desc(0, 0x8000, 1, NEXT, 8)
    d.make_avail(0)
    assert "next 8" in popping(d)


def test_next_out_of_range_in_an_indirect_table():
    d = Driver(size=8)
    d.desc(0, 0x8000, 1, NEXT, 2, table=0x5000)    # the table has 2 entries
    d.desc(2, 0x8000, 1, table=0x5000)            # (a valid-looking entry just past it)
    d.desc(0, 0x5000, 32, INDIRECT)
    d.make_avail(0)
    assert "next 2" in popping(d, indirect=True)


def test_longest_chain_is_the_queue_size():
    d = Driver(size=4)
    for i in range(4):
        d.desc(i, 0x8000 + i, 1, NEXT if i < 3 else 0, i + 1)
        d.write(0x8000 + i, bytes([0x41 + i]))
    d.make_avail(0)
    assert joined(d.queue().pop()[1]) == b"ABCD"


def test_loop():
    d = Driver(size=8)
    d.desc(0, 0x8000, 1, NEXT, 1)
    d.desc(1, 0x8000, 1, NEXT, 0)
    d.make_avail(0)
    assert "loops" in popping(d)
    d = Driver(size=4)
    d.desc(2, 0x8000, 1, NEXT, 2)                  # onto itself
    d.make_avail(2)
    assert "loops" in popping(d)


def test_loop_in_indirect_table():
    d = Driver()
    d.desc(0, 0x8000, 1, NEXT, 1, table=0x5000)
    d.desc(1, 0x8000, 1, NEXT, 0, table=0x5000)
    d.desc(0, 0x5000, 32, INDIRECT)
    d.make_avail(0)
    assert "loops" in popping(d, indirect=True)


def test_readable_after_writable():
    d = Driver()
    d.desc(0, 0x8000, 4, WRITE | NEXT, 1)
    d.desc(1, 0x8004, 4)
    d.make_avail(0)
    assert "readable" in popping(d)


def test_indirect_without_the_feature():
    d = Driver()
    d.desc(0, 0x8000, 1, table=0x5000)
    d.desc(0, 0x5000, 16, INDIRECT)
    d.make_avail(0)
    assert "INDIRECT" in popping(d)


def test_indirect_with_next():
    d = Driver()
    d.desc(0, 0x8000, 1, table=0x5000)
    d.desc(0, 0x5000, 16, INDIRECT | NEXT, 1)
    d.desc(1, 0x8000, 1)
    d.make_avail(0)
    assert "NEXT" in popping(d, indirect=True)


def test_indirect_after_a_direct_descriptor():
    d = Driver()
    d.desc(0, 0x8000, 1, table=0x5000)
    d.desc(0, 0x8000, 1, NEXT, 1)
    d.desc(1, 0x5000, 16, INDIRECT)
    d.make_avail(0)
    popping(d, indirect=True)


def test_nested_indirect():
    d = Driver()
    d.desc(0, 0x8000, 1, table=0x6000)
    d.desc(0, 0x6000, 16, INDIRECT, table=0x5000)
    d.desc(0, 0x5000, 16, INDIRECT)
    d.make_avail(0)
    assert "indirect" in popping(d, indirect=True)


@pytest.mark.parametrize("length", [0, 8, 40, 17])
def test_indirect_length_not_a_multiple_of_16(length):
    d = Driver()
    d.desc(0, 0x5000, length, INDIRECT)
    d.make_avail(0)
    assert "indirect table" in popping(d, indirect=True)


def test_indirect_table_outside_memory():
    d = Driver()
    d.desc(0, 0x1FFF0, 32, INDIRECT)               # runs past the end of region B
    d.make_avail(0)
    popping(d, indirect=True)


@pytest.mark.parametrize("addr,length", [(0x20000, 1), (0x1FFFF, 2), (1 << 63, 16),
                                         (0xFFFF_FFFF_FFFF_FFF0, 0x20)])
def test_buffer_outside_memory(addr, length):
    for flags in (0, WRITE):
        d = Driver()
        d.desc(0, addr, length, flags)
        d.make_avail(0)
        assert "outside" in popping(d)


def test_avail_idx_more_than_size_ahead():
    d = Driver(size=8, used_idx=0xFFFC)
    d.desc(0, 0x8000, 1)
    d.set_avail_idx((0xFFFC + 9) & 0xFFFF)
    assert "ahead" in popping(d)
    d.set_avail_idx((0xFFFC + 8) & 0xFFFF)          # a full ring is fine
    q = d.queue()
    assert [q.pop()[0] for _ in range(8)] == [0] * 8
    assert q.pop() is None


# --- property: what the driver wrote is what pop returns ------------------------------------
DATA_START, DATA_END = 0x8000, 0x18000              # straddles the region boundary

segment = st.tuples(st.booleans(), st.integers(0, 300))       # (writable, length)
chain = st.tuples(st.lists(segment, min_size=1, max_size=8), st.booleans(), st.randoms())


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(chain, min_size=1, max_size=8), start=st.integers(0, 0xFFFF),
       data_at=st.integers(DATA_START, DATA_END - 0x4000))
def test_random_chains_round_trip(chains, start, data_at):
    size = 16
    d = Driver(size=size, used_idx=start)
    free = list(range(size))
    cursor = data_at
    expected = []
    heads = []
    for segs, indirect, rnd in chains:
        segs = sorted(segs, key=lambda s: s[0])    # readable first, as the spec requires
        if not indirect and len(segs) > len(free):
            segs = segs[:len(free)]
        bufs = []
        for writable, length in segs:
            data = bytes(rnd.getrandbits(8) for _ in range(length))
            if not writable:
                d.write(cursor, data)
            bufs.append((cursor, length, writable))
            cursor += length
        if indirect:
            table_gpa = 0x4000 + 0x100 * len(heads)
            order = list(range(1, len(segs)))
            rnd.shuffle(order)
            order.insert(0, 0)                     # an indirect chain starts at entry 0
            for k, (addr, length, writable) in enumerate(bufs):
                last = k == len(bufs) - 1
                d.desc(order[k], addr, length, (WRITE if writable else 0) | (0 if last else NEXT),
                       0 if last else order[k + 1], table=table_gpa)
            head = free.pop(rnd.randrange(len(free)))
            d.desc(head, table_gpa, 16 * len(segs), INDIRECT)
        else:
            slots = [free.pop(rnd.randrange(len(free))) for _ in bufs]
            for k, (addr, length, writable) in enumerate(bufs):
                last = k == len(bufs) - 1
                d.desc(slots[k], addr, length, (WRITE if writable else 0) | (0 if last else NEXT),
                       0 if last else slots[k + 1])
            head = slots[0]
        heads.append(head)
        expected.append(bufs)
        if not free:
            break
    d.make_avail(*heads)
    q = d.queue(indirect=True)
    for head, bufs in zip(heads, expected):
        got_head, readable, writable = q.pop()
        assert got_head == head
        assert joined(readable) == b"".join(d.read(a, n) for a, n, w in bufs if not w)
        assert sum(map(len, writable)) == sum(n for _a, n, w in bufs if w)
        # the writable views are the driver's buffers, in order
        fill = bytes(i & 0xFF for i in range(sum(map(len, writable))))
        pos = 0
        for v in writable:
            v[:] = fill[pos:pos + len(v)]
            pos += len(v)
        assert b"".join(d.read(a, n) for a, n, w in bufs if w) == fill
        q.push(got_head, len(fill))
    assert q.pop() is None
    assert d.used_idx() == (start + len(heads)) & 0xFFFF
    assert [d.used_elem((start + k) % size)[0] for k in range(len(heads))] == heads


# --- the fast path for sequential indirect tables agrees with the general walk --------------
_FLAGS = st.sampled_from([0, 1, 2, 3, 4, 5, 7])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9000), _FLAGS,
                          st.integers(0, 40)), min_size=3, max_size=40),
       st.sampled_from(["random", "linux", "linux-flags-random-next"]))
def test_sequential_table_fast_path_matches_general_walk(entries, layout):
    """Random indirect tables (Linux's layout: next = i + 1, NEXT on all but the last,
    readable then writable; or Linux's flags with random nexts; or anything) give the same
    chain, or the same refusal, with the fast path as with the entry-by-entry walk."""
    from blockexport.virtio import ring as R
    n = len(entries)
    mem = bytearray(1 << 20)
    region = None
    table_off = 0
    rows = []
    for i, (page, length, flags, nxt) in enumerate(entries):
        if layout != "random":
            write = 2 if i >= n // 2 else 0
            flags = (write | (1 if i < n - 1 else 0))
            if layout == "linux":
                nxt = i + 1 if i < n - 1 else 0
        rows.append((0x10000 + 4096 + page * 8192 + i, length, flags, nxt))
    for i, row in enumerate(rows):
        struct.pack_into("<QIHH", mem, table_off + 16 * i, *row)
    table = memoryview(mem)[table_off:table_off + 16 * n]

    def general():
        q = SplitQueue.__new__(SplitQueue)
        saved = R._sequential_table
        R._sequential_table = lambda *a: None
        try:
            return _walk(q, region, table, n)
        finally:
            R._sequential_table = saved

    def fast():
        q = SplitQueue.__new__(SplitQueue)
        return _walk(q, region, table, n)

    assert _outcome(fast) == _outcome(general)


def _walk(q, region, table, n):
    """Run SplitQueue._chain on a one-entry ring whose head points at `table` (indirect)."""
    mem = table.obj
    mem_region = GuestMemory([(0x10000, len(mem), 0x7f0000000000, mem)])
    desc = bytearray(16)
    struct.pack_into("<QIHH", desc, 0, 0x10000, 16 * n, 4, 0)   # INDIRECT
    q.memory = mem_region
    q.size = 1
    q.desc = memoryview(desc)
    q.indirect = True
    return q._chain(0)


def _outcome(fn):
    try:
        readable, writable = fn()
    except VirtioError:
        return "refused"
    return [bytes(v) for v in readable], [bytes(v) for v in writable], \
        [len(v) for v in readable], [len(v) for v in writable]
