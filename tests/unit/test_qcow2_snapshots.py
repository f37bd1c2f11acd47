"""The qcow2 snapshot table (blockexport.block.drivers.qcow2.snapshots) on hand-built
tables: parsing (v2 and v3 entries, extra data, padding), QEMU's lookup rules and the
damaged-table errors.  Real images made by qemu-img are in tests/qcow2/test_snapshots.py."""
from __future__ import annotations

import struct

import pytest

from blockexport.block.drivers.qcow2 import header as H
from blockexport.block.drivers.qcow2 import snapshots as S
from blockexport.errors import Error

CS = 65536


def entry(sid: str, name: str, l1_offset=3 * CS, l1_size=1, extra=b"", date=(1, 2),
          vm_clock=3, vm_state=4) -> bytes:
    e = struct.pack(">QIHHIIQII", l1_offset, l1_size, len(sid.encode()), len(name.encode()),
                    date[0], date[1], vm_clock, vm_state, len(extra))
    e += extra + sid.encode() + name.encode()
    return e + bytes(-len(e) % 8)


def v3_extra(vm_state=0, disk_size=1 << 20, icount=None) -> bytes:
    return struct.pack(">QQ", vm_state, disk_size) + (
        struct.pack(">Q", icount) if icount is not None else b"")


def table(*entries: bytes, at: int = CS):
    """A file image (bytes) with the entries at ``at``; and a read() over it."""
    data = bytearray(at) + b"".join(entries)
    data += bytes(-len(data) % CS)

    def read(off, n):
        assert off + n <= len(data)
        return bytes(data[off:off + n])
    return read, len(data)


def parse(*entries, nb=None, default_size=5 << 20):
    read, flen = table(*entries)
    return S.read_snapshot_table(read, CS, len(entries) if nb is None else nb, flen,
                                 default_size)


def test_v3_entries():
    sns = parse(entry("1", "first", extra=v3_extra(7, 1 << 20, 99)),
                entry("2", "second snapshot", l1_offset=4 * CS, l1_size=2,
                      extra=v3_extra(0, 2 << 20)))
    a, b = sns
    assert (a.id, a.name, a.l1_table_offset, a.l1_size) == ("1", "first", 3 * CS, 1)
    assert (a.date_sec, a.date_nsec, a.vm_clock_nsec) == (1, 2, 3)
    assert (a.vm_state_size, a.disk_size, a.icount, a.extra_data_size) == (7, 1 << 20, 99, 24)
    assert (b.id, b.name, b.l1_table_offset, b.l1_size, b.disk_size, b.icount) == \
        ("2", "second snapshot", 4 * CS, 2, 2 << 20, None)


def test_v2_entry_takes_the_image_size_and_32bit_vm_state():
    sn, = parse(entry("1", "old", vm_state=4096), default_size=3 << 20)
    assert (sn.disk_size, sn.vm_state_size, sn.icount, sn.extra_data_size) == \
        (3 << 20, 4096, None, 0)


def test_unknown_extra_data_is_kept():
    sn, = parse(entry("1", "x", extra=v3_extra(icount=5) + b"ABCDEFGH"))
    assert sn.unknown_extra_data == b"ABCDEFGH" and sn.icount == 5


def test_empty_table():
    read, flen = table()
    assert S.read_snapshot_table(read, 0, 0, flen, 0) == []


def test_too_much_extra_data():
    with pytest.raises(Error) as e:
        parse(entry("1", "a"), entry("2", "b", extra=bytes(1025)))
    assert e.value.message == "Too much extra metadata in snapshot table entry 1"
    assert e.value.hint == "You can force-remove this extra metadata with qemu-img check -r all\n"


def test_table_too_big():
    # 65536 entries of 1 KiB extra data each pass 64 MiB: QEMU's limit on the whole table
    big = entry("1", "a", extra=bytes(1024))
    n = S.MAX_SNAPSHOTS_SIZE // len(big) + 1
    data = bytes(CS) + big * n

    def read(off, k):
        return data[off:off + k]
    with pytest.raises(Error) as e:
        S.read_snapshot_table(read, CS, n + 3, len(data), 0)
    assert e.value.message == "Snapshot table is too big"
    assert e.value.hint == ("You can force-remove all 4 overhanging snapshots with qemu-img "
                            "check -r all\n")


@pytest.mark.parametrize("cut", [10, 40, 50, 57])
def test_table_past_end_of_file(cut):
    """More entries than the file holds (or an entry cut by the end of the file): an error,
    where QEMU would read zeroes."""
    e1 = entry("1", "a", extra=v3_extra())
    data = bytes(CS) + e1

    def read(off, k):
        return data[off:off + k]
    with pytest.raises(Error, match="^Snapshot table lies past the end of the image file$"):
        S.read_snapshot_table(read, CS, 1, CS + cut, 0)


def test_header_checks():
    """QEMU's header checks of the table, through parse_header: count, then offset."""
    from test_qcow2_header import build

    def with_table(nb, off, flen=None):
        buf, flen0 = build()
        buf = bytearray(buf)
        struct.pack_into(">IQ", buf, 60, nb, off)
        return H.parse_header(bytes(buf), flen or flen0)

    assert with_table(2, 4 * CS).nb_snapshots == 2
    for nb, off, msg in ((65537, 4 * CS, "Snapshot table too large"),
                         (1, 4 * CS + 8, "Snapshot table offset invalid"),
                         (1, 0, "Snapshot table offset invalid"),
                         (1, 1 << 40, "Snapshot table lies past the end of the image file")):
        with pytest.raises(Error) as e:
            with_table(nb, off)
        assert e.value.message == msg
    S.check_table_count(65536, CS, CS)
    with pytest.raises(Error, match="^Snapshot table too large$"):
        S.check_table_count(65537, CS, CS)


SNAPS = [S.Snapshot("1", "a", 3 * CS, 1), S.Snapshot("2", "1", 4 * CS, 1),
         S.Snapshot("3", "c", 5 * CS, 1), S.Snapshot("4", "c", 6 * CS, 1)]


@pytest.mark.parametrize("sid,name,index", [
    ("1", None, 0), (None, "1", 1), ("2", "1", 1), ("1", "1", -1), (None, "c", 2),
    ("4", "c", 3), ("", None, -1), (None, "", -1), (None, None, -1), ("9", None, -1),
])
def test_find_snapshot(sid, name, index):
    assert S.find_snapshot(SNAPS, sid, name) == index


def load(snaps, sid=None, name=None, id_or_name=None, flen=1 << 30):
    return S.find_snapshot_to_load(snaps, sid, name, CS, flen, id_or_name=id_or_name)


def test_id_or_name_tries_the_id_first():
    assert load(SNAPS, id_or_name="1") is SNAPS[0]
    assert load(SNAPS, id_or_name="c") is SNAPS[2]
    assert load(SNAPS, id_or_name="3") is SNAPS[2]
    with pytest.raises(Error, match="^Can't find snapshot$"):
        load(SNAPS, id_or_name="zz")
    with pytest.raises(Error, match="^snapshot_id and name are both NULL$"):
        load(SNAPS)


def test_snapshot_l1_checks():
    bad = [S.Snapshot("1", "a", 3 * CS + 8, 1), S.Snapshot("2", "1", 4 * CS, 1)]
    with pytest.raises(Error, match="^Snapshot L1 table offset invalid$"):
        load(bad, sid="1")
    # QEMU's -EINVAL from the id lookup sends ID_OR_NAME on to the names: "1" names #2
    assert load(bad, id_or_name="1") is bad[1]
    with pytest.raises(Error, match="^Can't find snapshot$"):
        load(bad[:1], id_or_name="1")
    big = [S.Snapshot("1", "a", 3 * CS, 0x400001)]
    with pytest.raises(Error, match="^Snapshot L1 table too large$"):
        load(big, id_or_name="1")         # -EFBIG: no second try
    with pytest.raises(Error, match="^Snapshot L1 table offset invalid$"):
        load([S.Snapshot("1", "a", 0, 1)], sid="1")
    with pytest.raises(Error, match="^Snapshot L1 table lies past the end of the image file$"):
        load([S.Snapshot("1", "a", 3 * CS, 1)], sid="1", flen=3 * CS + 4)
    assert load([S.Snapshot("1", "a", 0, 0)], sid="1").l1_size == 0


def test_read_l1_table_pads_with_unallocated_entries():
    data = bytes(3 * CS) + struct.pack(">2Q", 0x8000000000050000, 0x60000)

    def read(off, n):
        return data[off:off + n]
    l1 = S.read_l1_table(read, S.Snapshot("1", "a", 3 * CS, 2), 4)
    assert list(l1) == [0x8000000000050000, 0x60000, 0, 0]
    assert list(S.read_l1_table(read, S.Snapshot("1", "a", 3 * CS, 2), 1)) == \
        [0x8000000000050000, 0x60000]


def test_many_entries_read_in_chunks():
    """65536 entries (QEMU's maximum) parse quickly: the table is read in chunks, not with
    a read per field."""
    one = entry("1", "name", extra=v3_extra())
    data = bytes(CS) + one * S.MAX_SNAPSHOTS
    reads = []

    def read(off, n):
        reads.append(n)
        return data[off:off + n]
    sns = S.read_snapshot_table(read, CS, S.MAX_SNAPSHOTS, len(data), 0)
    assert len(sns) == S.MAX_SNAPSHOTS and sns[-1].name == "name"
    assert len(reads) < len(data) // 65536 + 2
