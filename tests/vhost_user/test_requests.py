"""virtio-blk requests through the Python frontend: data paths, flush, GET_ID, discard and
write-zeroes, read-only exports, bad requests, multi-queue, pipelining, reconnect.

Expected values are what qemu-storage-daemon 7.2 does (tests/vhost_user/QSD_FACTS.md)."""
from __future__ import annotations

import os
import select
import struct
import time

import pytest

from helpers.vhost_user_frontend import (
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_GET_LIFETIME, T_IN, T_OUT, T_SECURE_ERASE,
    T_WRITE_ZEROES, Frontend)

SECTOR = 512


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


def test_write_read_round_trip(start):
    s = start()
    f = s.frontend()
    data = pattern(8192, 1)
    assert f.write(16, data) == (S_OK, b"", 1)
    status, got, used = f.read(16, 8192)
    assert (status, got, used) == (S_OK, data, 8193)       # used_len = data + status byte
    assert s.image_bytes(16 * SECTOR, 8192) == data
    assert s.image_bytes(0, 16 * SECTOR) == bytes(16 * SECTOR)


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_multi_descriptor(start, indirect):
    """Data split over several descriptors (uneven lengths, not sector multiples), chained
    directly in the ring or through an indirect table."""
    s = start()
    f = s.frontend()
    assert f.indirect
    data = pattern(3 * 4096, 2)
    assert f.write(40, data, split=5, indirect=indirect)[0] == S_OK
    assert s.image_bytes(40 * SECTOR, len(data)) == data
    status, got, used = f.read(40, len(data), split=7, indirect=indirect)
    assert (status, got, used) == (S_OK, data, len(data) + 1)


def test_region_mmap_offset(start):
    """The memory region starts 1 MiB into the shared fd (mmap_offset): the backend must map
    with that offset."""
    s = start()
    f = s.frontend(mmap_offset=1024 * 1024)
    data = pattern(4096, 9)
    assert f.write(0, data, indirect=True)[0] == S_OK
    assert f.read(0, 4096, split=2) == (S_OK, data, 4097)
    assert s.image_bytes(0, 4096) == data


def test_event_idx_suppresses_calls(start):
    """With EVENT_IDX the backend signals the call eventfd only when the used index passes
    the driver's used_event: with used_event set 10 entries ahead, completions arrive in the
    used ring without a call; crossing used_event brings one."""
    s = start()
    f = s.frontend()
    q = f.queues[0]
    assert f.event_idx
    assert f.read(0, 512)[0] == S_OK                 # the first completion always signals
    # read() may have reaped the used entry before the call arrived: wait for that call
    # (QSD may signal more than once around its first completion when the machine is busy)
    if not q.calls:
        assert f.take_calls(q, timeout=2.0) >= 1
    ahead = (q.last_used + 10) & 0xFFFF
    struct.pack_into("<H", f.mem, q.avail + 4 + 2 * q.size, ahead)   # used_event
    reqs = [f.request(0, T_IN, 0, in_len=512) for _ in range(3)]
    for r in reqs:
        old = q.avail_idx
        f._build(r)
        f._publish_and_kick(q, old)
        deadline = time.monotonic() + 2.0
        while f._u16(q.used + 2) != q.avail_idx:    # poll the used ring itself
            assert time.monotonic() < deadline, "request not completed"
            select.select([q.call], [], [], 0.001)
    assert select.select([q.call], [], [], 0)[0] == []      # no call so far
    f._reap(q)
    assert [r.status for r in reqs] == [S_OK] * 3
    struct.pack_into("<H", f.mem, q.avail + 4 + 2 * q.size, q.last_used)
    assert f.read(0, 512)[0] == S_OK                 # waits on the call eventfd


def test_image_data_visible(start):
    """What is in the image before the export starts is what a read returns."""
    s = start(data={1 * 1024 * 1024: b"hello vhost-user"})
    f = s.frontend()
    status, got, _ = f.read(2048, SECTOR)
    assert status == S_OK and got.startswith(b"hello vhost-user")


def test_flush(start):
    s = start()
    f = s.frontend()
    assert f.write(0, pattern(SECTOR))[0] == S_OK
    assert f.flush() == (S_OK, b"", 1)


def test_get_id(start):
    """QSD 7.2 answers the fixed serial 'vhost_user_blk', NUL-padded to 20 bytes, and
    truncates to a shorter buffer."""
    f = start().frontend()
    assert f.get_id() == (S_OK, b"vhost_user_blk" + bytes(6), 21)
    assert f.get_id(in_len=8) == (S_OK, b"vhost_us", 9)


def test_write_zeroes_and_discard(start):
    """Without discard=unmap on the node: WRITE_ZEROES zeroes (with or without UNMAP),
    DISCARD answers OK and leaves the data."""
    s = start()
    f = s.frontend()
    assert f.write(0, b"a" * (32 * SECTOR))[0] == S_OK
    assert f.write_zeroes(0, 8) == (S_OK, b"", 1)
    assert f.write_zeroes(8, 8, unmap=True) == (S_OK, b"", 1)
    assert f.discard(16, 8) == (S_OK, b"", 1)
    img = s.image_bytes(0, 32 * SECTOR)
    assert img[:16 * SECTOR] == bytes(16 * SECTOR)
    assert img[16 * SECTOR:] == b"a" * (16 * SECTOR)
    assert f.read(0, 32 * SECTOR)[1] == img


def _allocated(path, offset, length) -> bool:
    """Whether [offset, offset+length) of the file has any data extent (SEEK_DATA)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            d = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return False
        return d < offset + length
    finally:
        os.close(fd)


def test_unmap_punches_holes(start):
    """With discard=unmap on the node, DISCARD and WRITE_ZEROES+UNMAP deallocate the range
    in the image file (reads back zeroes).  QSD 7.2's config still says
    write_zeroes_may_unmap=0 (it never sets it)."""
    s = start(node_extra=",discard=unmap")
    f = s.frontend()
    assert f.config["write_zeroes_may_unmap"] == 0
    mib = 1024 * 1024
    assert f.write(0, b"x" * (2 * mib))[0] == S_OK     # 4096 sectors
    assert _allocated(s.image, 0, 2 * mib)
    assert f.discard(0, 2048) == (S_OK, b"", 1)
    assert f.write_zeroes(2048, 2048, unmap=True) == (S_OK, b"", 1)
    assert s.image_bytes(0, 2 * mib) == bytes(2 * mib)
    assert not _allocated(s.image, 0, 2 * mib)


def test_discard_write_zeroes_bad(start):
    """Past capacity or more than max_*_sectors: IOERR; a DISCARD with the UNMAP flag or a
    request with two segments: UNSUPP."""
    f = start().frontend()
    cap = f.config["capacity"]
    assert f.write_zeroes(cap - 2, 8)[0] == S_IOERR
    assert f.discard(cap - 2, 8)[0] == S_IOERR
    assert f.write_zeroes(0, 32769)[0] == S_IOERR
    assert f.discard(0, 32769)[0] == S_IOERR
    assert f.discard(0, 8, flags=1)[0] == S_UNSUPP
    two = f.segment(0, 8) * 2
    assert f.submit(0, T_WRITE_ZEROES, 0, out=two)[0] == S_UNSUPP
    assert f.submit(0, T_DISCARD, 0, out=two)[0] == S_UNSUPP


def test_read_only(start):
    """writable=off: RO offered; OUT, WRITE_ZEROES and DISCARD answer IOERR; reads and
    flush work; the image is unchanged."""
    s = start(writable=False, data={0: b"keep"})
    f = s.frontend()
    assert f.features >> 5 & 1            # VIRTIO_BLK_F_RO acked
    assert f.write(0, b"z" * SECTOR)[0] == S_IOERR
    assert f.write_zeroes(0, 8)[0] == S_IOERR
    assert f.discard(0, 8)[0] == S_IOERR
    assert f.flush()[0] == S_OK
    assert f.read(0, SECTOR)[1][:4] == b"keep"
    assert s.image_bytes(0, 4) == b"keep"


def test_past_capacity(start):
    f = start().frontend()
    cap = f.config["capacity"]
    assert f.read(cap - 1, SECTOR)[0] == S_OK
    st, data, used = f.read(cap, SECTOR)
    assert (st, used) == (S_IOERR, SECTOR + 1)      # used_len counts the buffer anyway
    assert f.read(cap - 1, 2 * SECTOR)[0] == S_IOERR
    assert f.write(cap, b"x" * SECTOR)[0] == S_IOERR


def test_not_sector_multiple(start):
    f = start().frontend()
    assert f.read(0, 8)[0] == S_IOERR
    assert f.write(0, b"x" * 100)[0] == S_IOERR


def test_misaligned_4096(start):
    """logical-block-size=4096: QSD 7.2 refuses (IOERR) a start sector (512-byte units) that
    is not 4096-aligned, but a length only has to be a multiple of 512."""
    s = start(lbs=4096)
    f = s.frontend()
    assert f.config["blk_size"] == 4096
    assert f.write(8, b"q" * 4096)[0] == S_OK
    assert f.read(8, 4096)[1] == b"q" * 4096
    assert f.read(1, 4096)[0] == S_IOERR
    assert f.read(1, 512)[0] == S_IOERR
    assert f.write(4, b"x" * 4096)[0] == S_IOERR
    assert s.image_bytes(8 * SECTOR, 4096) == b"q" * 4096
    assert f.read(8, 512) == (S_OK, b"q" * 512, 513)
    assert f.write(16, b"h" * 2048)[0] == S_OK
    assert s.image_bytes(16 * SECTOR, 4096) == b"h" * 2048 + bytes(2048)
    assert f.write_zeroes(1, 8)[0] == S_IOERR
    assert f.discard(1, 8)[0] == S_IOERR
    assert f.write_zeroes(8, 4)[0] == S_OK
    assert s.image_bytes(8 * SECTOR, 4096) == bytes(2048) + b"q" * 2048
    assert f.discard(8, 4)[0] == S_OK


def test_unknown_types(start):
    """Types QSD 7.2 does not implement answer UNSUPP; the barrier bit (1 << 31) of a legacy
    request type is ignored."""
    f = start().frontend()
    for t in (2, 3, 99, T_SECURE_ERASE):
        assert f.submit(0, t, 0, out=f.segment(0, 8) if t == T_SECURE_ERASE else ())[0] \
            == S_UNSUPP, t
    assert f.submit(0, T_GET_LIFETIME, 0, in_len=16)[0] == S_UNSUPP
    assert f.submit(0, T_IN | 0x80000000, 0, in_len=SECTOR)[0] == S_OK


def test_multi_queue(start):
    """num-queues=2: requests in flight on both queues at once, each completed on its own."""
    s = start(num_queues=2)
    f = s.frontend(num_queues=2)
    assert f.queue_num == 2 and f.config["num_queues"] == 2
    reqs = [f.request(i % 2, T_OUT, 8 * i, out=pattern(4096, i)) for i in range(8)]
    f.submit_many(reqs)
    assert [r.status for r in reqs] == [S_OK] * 8
    assert all(q.kicks >= 1 for q in f.queues)
    reqs = [f.request(1 - i % 2, T_IN, 8 * i, in_len=4096) for i in range(8)]
    f.submit_many(reqs)
    assert [r.data for r in reqs] == [pattern(4096, i) for i in range(8)]
    assert s.image_bytes(0, 8 * 4096) == b"".join(pattern(4096, i) for i in range(8))


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_pipelining(start, event_idx):
    """32 requests published before one kick; all complete (status OK, right data)."""
    s = start()
    f = s.frontend(event_idx=event_idx)
    assert f.event_idx == event_idx
    writes = [f.request(0, T_OUT, 8 * i, out=pattern(4096, i), indirect=bool(i % 2))
              for i in range(32)]
    f.submit_many(writes)
    assert f.queues[0].kicks == 1
    assert [r.status for r in writes] == [S_OK] * 32
    reads = [f.request(0, T_IN, 8 * i, in_len=4096, split=1 + i % 3) for i in range(32)]
    f.submit_many(reads)
    assert [(r.status, r.data) for r in reads] == [(S_OK, pattern(4096, i)) for i in range(32)]
    # 300 more, in batches, so the 16-bit ring indexes wrap the 128-entry ring
    for b in range(10):
        rs = f.submit_many([f.request(0, T_IN, 8 * i, in_len=512) for i in range(30)])
        assert all(r.status == S_OK for r in rs)
    assert f.queues[0].avail_idx == 364


def test_reconnect(start):
    s = start()
    f = s.frontend()
    assert f.write(0, b"1" * SECTOR)[0] == S_OK
    f.close()
    for i in range(3):
        g = s.frontend()
        assert g.read(0, SECTOR)[1] == b"1" * SECTOR
        assert g.write(8 * (i + 1), bytes([48 + i]) * SECTOR)[0] == S_OK
        g.close()
    assert s.image_bytes(8 * SECTOR, SECTOR) == b"0" * SECTOR


def test_frontend_gone_mid_request(start):
    """A frontend that closes with requests in flight (never waits for them) leaves the
    export usable for the next frontend."""
    s = start()
    f = s.frontend()
    for i in range(16):
        f._build(f.request(0, T_OUT, 8 * i, out=pattern(4096, i)))
    f._publish_and_kick(f.queues[0], 0)
    f.close()
    g = s.frontend()
    assert g.write(0, b"n" * SECTOR)[0] == S_OK
    assert g.read(0, SECTOR)[1] == b"n" * SECTOR
