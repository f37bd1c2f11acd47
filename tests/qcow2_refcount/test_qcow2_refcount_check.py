"""Refcount check and repair against qemu-img: images written by qemu-io (some left dirty
by an abort under lazy_refcounts, some damaged by hand); our check must count what qemu-img
check counts, and after our repair qemu-img check must call the image clean with the guest
data unchanged."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from blockexport.block.drivers.qcow2.check import check_refcounts, repair_refcounts
from blockexport.block.drivers.qcow2.refcount import (
    RefcountError, RefcountManager, header_table_updater)
from refcount_support import (
    FileIO, Header, check, create, need_tools, qemu_io, set_dirty_bit, spec_refcounts)

WRITES = [("0x11", 0, "300k"), ("0x22", "2M", "64k"), ("0x33", "5000k", "9k")]


@pytest.fixture(autouse=True)
def _tools():
    need_tools()


def write_patterns(path, extra=(), abort=False):
    cmds = list(extra) + ["write -P %s %s %s" % w for w in WRITES]
    return qemu_io(path, *cmds, abort=abort)


def verify_patterns(path):
    qemu_io(path, *["read -P %s %s %s" % w for w in WRITES], read_only=True)


def ours(path, **kw):
    h = Header(path)
    io = FileIO(path)
    try:
        return check_refcounts(io, **h.check_kwargs(), **kw)
    finally:
        io.close()


def repair(path, **kw):
    h = Header(path)
    io = FileIO(path)
    try:
        return repair_refcounts(io, on_table_moved=header_table_updater(io),
                                **h.check_kwargs(), **kw)
    finally:
        io.close()


def same_counts(mine, theirs):
    assert mine.corruptions == theirs.get("corruptions", 0), (mine.messages[:10],
                                                             theirs["report"])
    assert mine.leaks == theirs.get("leaks", 0), (mine.messages[:10], theirs["report"])
    assert mine.check_errors == theirs.get("check-errors", 0)
    assert mine.allocated_clusters == theirs.get("allocated-clusters", 0)
    assert mine.image_end_offset == theirs["image-end-offset"]


def assert_clean(path):
    res = check(path)
    assert res["rc"] == 0 and "corruptions" not in res and "leaks" not in res, res["report"]
    return res


@pytest.mark.parametrize("opts", [
    dict(cluster_size=4096),
    dict(cluster_size=512, refcount_bits=64),
    dict(cluster_size=65536, refcount_bits=1),
    dict(cluster_size=65536, refcount_bits=4, extended_l2="on"),
    dict(cluster_size=2097152, refcount_bits=8),
], ids=lambda o: ",".join("%s=%s" % kv for kv in o.items()))
def test_dirty_image_under_lazy_refcounts_is_repaired(tmp_path, opts):
    """qemu-io writes under lazy_refcounts and aborts: the dirty bit stays set and the
    refcounts of the last writes never reached the file.  We see the errors qemu-img
    sees; our repair (as a writable open does) leaves an image qemu-img calls clean."""
    p = create(tmp_path / "dirty.qcow2", "64M", lazy_refcounts="on", **opts)
    # compressed clusters; with extended L2 entries a write of part of a cluster
    csize = max(128 << 10, 2 * opts["cluster_size"])      # whole clusters
    last = ("write -c -P 0x44 8M %d" % csize if "extended_l2" not in opts else
            "write -P 0x44 8M 3k")
    write_patterns(p, [last], abort=True)
    h = Header(p)
    assert h.incompatible & 1, "qemu-io abort should leave the image dirty"
    mine = ours(p)
    theirs = check(p)
    assert theirs.get("corruptions", 0) > 0
    same_counts(mine, theirs)
    r = repair(p)
    assert r.rebuilt and r.before.corruptions == mine.corruptions
    assert r.after.clean, r.after.messages[:10]
    assert Header(p).rt_offset == r.table[0] != h.rt_offset
    set_dirty_bit(p, False)                  # what the driver does after repairing
    res = assert_clean(p)
    assert res["allocated-clusters"] == mine.allocated_clusters
    verify_patterns(p)
    qemu_io(p, last.replace("write -c", "write").replace("write", "read"))


@pytest.mark.parametrize("order", [0, 4, 6])
def test_zeroed_refcount_block_found_and_repaired(tmp_path, order):
    """The first refcount block zeroed on disk (so even the header, the table and the block
    itself have refcount 0), with compressed clusters in the image."""
    p = create(tmp_path / "z.qcow2", "16M", cluster_size=4096, refcount_bits=1 << order)
    write_patterns(p, ["write -c -P 0x55 12M 64k"])
    h = Header(p)
    with open(p, "rb") as f:
        f.seek(h.rt_offset)
        first_block, = struct.unpack(">Q", f.read(8))
    with open(p, "r+b") as f:
        f.seek(first_block)
        f.write(bytes(4096))
    mine = ours(p)
    same_counts(mine, check(p))
    assert mine.compressed_clusters == 16
    assert mine.errors and mine.corruptions >= 8
    assert (first_block // 4096) in mine.errors and 0 in mine.errors
    r = repair(p)
    assert r.rebuilt and r.after.clean
    assert_clean(p)
    verify_patterns(p)
    qemu_io(p, "read -P 0x55 12M 64k")


def test_leaks_are_fixed_in_place(tmp_path):
    p = create(tmp_path / "l.qcow2", "16M", cluster_size=4096)
    write_patterns(p)
    h = Header(p)
    io = FileIO(p)
    m = RefcountManager(io, **h.manager_kwargs(p))
    offs = [m.allocate() for _ in range(5)]
    for off in offs:
        io.pwrite(off, b"\x99" * 4096)
    m.increase(offs[0], 4096, 2)          # refcount 3, no reference
    m.flush()
    io.close()
    mine = ours(p)
    theirs = check(p)
    same_counts(mine, theirs)
    assert mine.leaks == 5 and mine.corruptions == 0
    assert mine.leaked[offs[0] // 4096] == (3, 0)
    r = repair(p)
    assert not r.rebuilt and r.leaks_fixed == 5 and r.after.clean
    assert Header(p).rt_offset == h.rt_offset          # fixed in place
    assert_clean(p)
    verify_patterns(p)


def test_copied_flag_mismatch_is_repaired(tmp_path):
    p = create(tmp_path / "c.qcow2", "16M", cluster_size=4096)
    write_patterns(p)
    h = Header(p)
    with open(p, "r+b") as f:
        f.seek(h.l1_offset)
        l2, = struct.unpack(">Q", f.read(8))
        l2 &= 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8)                       # guest cluster 1: clear COPIED
        e, = struct.unpack(">Q", f.read(8))
        assert e >> 63
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", e & ~(1 << 63)))
    mine = ours(p)
    same_counts(mine, check(p))
    assert mine.corruptions == 1 and mine.copied_errors and not mine.errors
    r = repair(p)
    assert not r.rebuilt and r.corruptions_fixed == 1 and r.after.clean
    assert_clean(p)
    verify_patterns(p)


def snapshot_info(path):
    """[(l1_offset, l1_size)] of the snapshots and the snapshot table's byte length, from
    the spec's snapshot table entry layout."""
    h = Header(path)
    out = []
    with open(path, "rb") as f:
        f.seek(h.snapshots_offset)
        data = f.read(1 << 20)
    pos = 0
    for _ in range(h.nb_snapshots):
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", data, pos)
        extra, = struct.unpack_from(">I", data, pos + 36)
        pos += 40 + extra + id_len + name_len
        pos = (pos + 7) & ~7
        out.append((l1_off, l1_size))
    return out, pos


def test_internal_snapshots(tmp_path):
    """Shared clusters (refcount 2) after a snapshot and copy-on-write: without the
    snapshots' L1 tables we refuse; with them we agree with qemu-img, also after damage."""
    p = create(tmp_path / "s.qcow2", "16M", cluster_size=4096)
    write_patterns(p)
    import subprocess
    from refcount_support import QEMU_IMG
    subprocess.run([QEMU_IMG, "snapshot", "-c", "snap1", p], check=True)
    qemu_io(p, "write -P 0x66 0 8k")
    h = Header(p)
    assert h.nb_snapshots == 1
    with pytest.raises(RefcountError, match="internal snapshot") as ei:
        ours(p, nb_snapshots=1)
    assert ei.value.errno == errno.ENOTSUP
    l1s, table_len = snapshot_info(p)
    kw = dict(nb_snapshots=1, snapshot_l1s=l1s, extra_ranges=[(h.snapshots_offset, table_len)])
    mine = ours(p, **kw)
    assert mine.clean, mine.messages[:10]
    assert 2 in spec_refcounts(p).values()
    same_counts(mine, check(p))
    # damage: the refcount block zeroed
    with open(p, "rb") as f:
        f.seek(h.rt_offset)
        blk, = struct.unpack(">Q", f.read(8))
    with open(p, "r+b") as f:
        f.seek(blk)
        f.write(bytes(4096))
    mine = ours(p, **kw)
    same_counts(mine, check(p))
    r = repair(p, **kw)
    assert r.rebuilt and r.after.clean
    assert_clean(p)
    qemu_io(p, "read -P 0x66 0 8k", "read -P 0x22 2M 64k")
    subprocess.run([QEMU_IMG, "snapshot", "-a", "snap1", p], check=True)
    verify_patterns(p)


def bitmap_ranges(path):
    """Host ranges of the bitmaps extension: directory, bitmap tables, bitmap data."""
    h = Header(path)
    cs = h.cluster_size
    with open(path, "rb") as f:
        data = f.read()
    pos = h.header_length
    ranges = []
    while True:
        typ, length = struct.unpack_from(">II", data, pos)
        if typ == 0:
            break
        if typ == 0x23852875:
            nb, _r, dsize, doff = struct.unpack_from(">IIQQ", data, pos + 8)
            ranges.append((doff, dsize))
            e = doff
            for _ in range(nb):
                toff, tsize, _flags, _t, _g, name_size, extra = struct.unpack_from(
                    ">QIIBBHI", data, e)
                ranges.append((toff, tsize * 8))
                for k in range(tsize):
                    be, = struct.unpack_from(">Q", data, toff + 8 * k)
                    if be & 0x00FFFFFFFFFFFE00:
                        ranges.append((be & 0x00FFFFFFFFFFFE00, cs))
                e += (24 + extra + name_size + 7) & ~7
        pos += 8 + ((length + 7) & ~7)
    return ranges


def test_persistent_bitmaps_are_counted(tmp_path):
    import subprocess
    from refcount_support import QEMU_IMG
    p = create(tmp_path / "b.qcow2", "16M", cluster_size=4096)
    subprocess.run([QEMU_IMG, "bitmap", "--add", p, "b0"], check=True)
    write_patterns(p)
    ranges = bitmap_ranges(p)
    assert len(ranges) >= 3                 # directory, table, some data
    assert ours(p).leaks > 0                # without them, the bitmap clusters look leaked
    mine = ours(p, extra_ranges=ranges)
    assert mine.clean, mine.messages[:10]
    same_counts(mine, check(p))
    set_dirty_bit(p, True)
    with open(p, "rb") as f:
        f.seek(Header(p).rt_offset)
        blk, = struct.unpack(">Q", f.read(8))
    with open(p, "r+b") as f:
        f.seek(blk)
        f.write(bytes(4096))
    r = repair(p, extra_ranges=ranges)
    assert r.rebuilt and r.after.clean
    set_dirty_bit(p, False)
    assert_clean(p)
    verify_patterns(p)
    info = subprocess.run([QEMU_IMG, "info", "--output=json", p], capture_output=True,
                          text=True, check=True).stdout
    assert '"b0"' in info


def test_damage_repair_cannot_fix_is_refused(tmp_path):
    p = create(tmp_path / "u.qcow2", "16M", cluster_size=4096)
    write_patterns(p)
    h = Header(p)
    with open(p, "r+b") as f:
        f.seek(h.l1_offset)
        l2, = struct.unpack(">Q", f.read(8))
        f.seek(h.l1_offset)
        f.write(struct.pack(">Q", l2 + 0x200))      # unaligned L2 table
    mine = ours(p)
    assert mine.corruptions and mine.unrepairable
    before = open(p, "rb").read()
    with pytest.raises(RefcountError, match="cannot repair") as ei:
        repair(p)
    assert ei.value.errno == errno.EIO
    assert open(p, "rb").read() == before          # nothing written


def test_repair_reloads_a_manager_that_keeps_working(tmp_path):
    p = create(tmp_path / "w.qcow2", "16M", cluster_size=512, refcount_bits=16,
               lazy_refcounts="on")
    write_patterns(p, abort=True)
    h = Header(p)
    io = FileIO(p)
    m = RefcountManager(io, on_table_moved=header_table_updater(io), **h.manager_kwargs(p))
    r = repair_refcounts(io, on_table_moved=header_table_updater(io), manager=m,
                         **h.check_kwargs())
    assert r.rebuilt and m.table_offset == r.table[0]
    set_dirty_bit(p, False)
    offs = []
    for _ in range(300):
        off = m.allocate()
        io.pwrite(off, b"\x77" * 512)
        offs.append(off)
    m.flush()
    io.close()
    res = check(p)
    assert res.get("corruptions", 0) == 0 and res.get("leaks") == 300, res["report"]
    verify_patterns(p)
    assert os.path.getsize(p) > 0


def test_crash_at_every_write_of_a_repair(tmp_path):
    """The rebuild killed before each of its writes: the image is as damaged as before (the
    header still names the old structure) or repaired, never worse."""
    from refcount_support import Crash, CrashingIO
    import shutil
    base = create(tmp_path / "base.qcow2", "16M", cluster_size=512, refcount_bits=16,
                  lazy_refcounts="on")
    write_patterns(base, abort=True)
    orig = check(base)
    assert orig.get("corruptions", 0) > 0
    h = Header(base)
    k = 0
    while True:
        p = str(tmp_path / ("c%d.qcow2" % k))
        shutil.copy(base, p)
        io = CrashingIO(p, k)
        try:
            repair_refcounts(io, on_table_moved=header_table_updater(io), **h.check_kwargs())
            done = True
        except Crash:
            done = False
        io.close()
        res = check(p)
        if Header(p).rt_offset == h.rt_offset:
            assert not done
            assert res.get("corruptions") == orig["corruptions"], (k, res["report"])
        else:
            assert "corruptions" not in res and "leaks" not in res, (k, res["report"])
        verify_patterns(p)
        os.unlink(p)
        if done:
            break
        k += 1
    assert k >= 3


@pytest.mark.parametrize("opts", [
    dict(preallocation="metadata", cluster_size=65536),
    dict(compat="0.10"),
    dict(compression_type="zstd", cluster_size=4096),
    dict(extended_l2="on", cluster_size=16384, refcount_bits=2),
    dict(cluster_size=512, refcount_bits=32),
], ids=lambda o: ",".join("%s=%s" % kv for kv in o.items()))
def test_clean_images_agree_with_qemu(tmp_path, opts):
    """Images of every shape qemu makes, written by qemu-io (compressed too): our check
    finds them clean and counts what qemu-img counts."""
    p = create(tmp_path / "clean.qcow2", "64M", **opts)
    cs = opts.get("cluster_size", 65536)
    # (qemu writes compressed clusters only where nothing is allocated yet)
    compressed = 0 if "preallocation" in opts else 4
    extra = ["write -c -P 0x77 16M %d" % (compressed * cs)] if compressed else []
    write_patterns(p, extra)
    mine = ours(p)
    assert mine.clean, mine.messages[:10]
    assert mine.compressed_clusters == compressed
    same_counts(mine, check(p))
