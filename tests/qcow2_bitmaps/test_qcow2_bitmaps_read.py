"""Reading qcow2 persistent dirty bitmaps: images made by the real qemu-img/qemu-io, and the
dirty granules our reader finds compared with what the real ``qemu-nbd -B NAME`` exports."""
from __future__ import annotations

import random
import struct

import pytest
import qcow2img as Q

from blockexport.block import dirty_bitmap as DB
from blockexport.block.drivers.qcow2 import bitmaps as B

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _tools():
    Q.need_tools()


def test_qemu_io_stores_bitmaps_persistently(tmp_path):
    """qemu-io records its writes in an enabled persistent bitmap and stores it on close:
    the flags on disk are clean (auto, not in use), autoclear bit 0 is set."""
    img = tmp_path / "a.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "b0")
    Q.qemu_io(img, "write 1M 4096")
    with Q.ImageFile(img) as f:
        h, infos = Q.read_infos(f)
    assert h.autoclear & B.AUTOCLEAR_BITMAPS and B.extension_consistent(h.autoclear)
    [i] = infos
    assert (i.name, i.flags, i.granularity, i.in_use, i.auto, i.inconsistent) == (
        "b0", B.FLAG_AUTO, 65536, False, True, False)
    assert i.qapi_info() == Q.info_bitmaps(img)[0]
    assert Q.load_ranges(img, "b0") == [(MiB, 65536)] == Q.qemu_dirty_map(img, "b0")


@pytest.mark.parametrize("cluster_size,gbits", [
    (512, 9), (4096, 9), (65536, 9), (4096, 12), (65536, 13), (65536, 16), (512, 17),
    (65536, 21), (2 * MiB, 16)])
def test_granularities_match_qemu_nbd(tmp_path, cluster_size, gbits):
    img = tmp_path / "g.qcow2"
    size = 48 * MiB + 1536  # not a multiple of most granularities
    Q.create(img, size, cluster_size)
    Q.bitmap(img, "--add", "-g", str(1 << gbits), "bm")
    rnd = random.Random(gbits * 7 + cluster_size)
    cmds = []
    for _ in range(25):
        length = rnd.choice((1, 512, 3000, 65536, 200000))
        off = rnd.randrange(0, size - length) // 512 * 512
        cmds.append("write -P %d %d %d" % (rnd.randrange(256), off, length))
    cmds.append("write %d 512" % (size - 512))  # the last, partial granule
    Q.qemu_io(img, *cmds)
    ours = Q.load_ranges(img, "bm")
    assert ours and ours == Q.qemu_dirty_map(img, "bm")
    assert ours[-1][0] + ours[-1][1] == size


def test_all_ones_table_entries(tmp_path):
    """A bitmap table entry 1 (no data cluster) reads as all ones; data clusters full of
    0xff too.  512-byte clusters, granularity 512: one bitmap cluster covers 2 MiB."""
    img = tmp_path / "ones.qcow2"
    Q.create(img, 16 * MiB, 512)
    Q.bitmap(img, "--add", "-g", "512", "b")
    Q.qemu_io(img, "write 2M 4M", "write 9M 512")
    with Q.ImageFile(img) as f:
        h, [info] = Q.read_infos(f)
        table = B.read_table(f, info, cluster_size=512)
    # QEMU itself stores all-ones clusters as data clusters full of 0xff
    assert info.table_size == 8 and table[0] == table[3] == 0
    with Q.ImageFile(img) as f:
        for i in (1, 2):
            assert table[i] & B.TABLE_OFFSET_MASK == table[i]
            assert f.pread(table[i], 512) == b"\xff" * 512
    assert Q.load_ranges(img, "b") == [(2 * MiB, 4 * MiB), (9 * MiB, 512)]
    # turn the entries of clusters 1 and 7 into "all ones" (cluster 1's data cluster leaks)
    with Q.ImageFile(img, writable=True) as f:
        f.pwrite(info.table_offset + 8, struct.pack(">Q", 1))
        f.pwrite(info.table_offset + 7 * 8, struct.pack(">Q", 1))
    ours = Q.load_ranges(img, "b")
    assert ours == [(2 * MiB, 4 * MiB), (9 * MiB, 512), (14 * MiB, 2 * MiB)]
    assert ours == Q.qemu_dirty_map(img, "b")


def test_several_bitmaps_disabled_merge_long_names(tmp_path):
    img = tmp_path / "many.qcow2"
    Q.create(img, 32 * MiB, 65536)
    long_name = ("x" * 1000) + "-" + ("é" * 11)  # 1023 bytes of UTF-8
    assert len(long_name.encode()) == B.MAX_NAME_SIZE
    Q.bitmap(img, "--add", "-g", "4096", "first")
    Q.bitmap(img, "--add", "--disable", "off")
    Q.bitmap(img, "--add", "-g", "1048576", long_name)
    Q.bitmap(img, "--add", "late")
    Q.qemu_io(img, "write 100k 1k", "write 20M 1M")
    Q.bitmap(img, "--disable", "late")
    Q.qemu_io(img, "write 30M 8k")
    Q.bitmap(img, "--merge", "first", "off")  # a disabled bitmap gets content by merging
    Q.bitmap(img, "--add", "empty")
    with Q.ImageFile(img) as f:
        h, infos = Q.read_infos(f)
    assert [(i.name, i.auto, i.granularity) for i in infos] == [
        ("first", True, 4096), ("off", False, 65536), (long_name, True, MiB),
        ("late", False, 65536), ("empty", True, 65536)]
    assert [i.qapi_info() for i in infos] == Q.info_bitmaps(img)
    for i in infos:
        ours = Q.load_ranges(img, i.name)
        assert ours == Q.qemu_dirty_map(img, i.name), i.name
    assert Q.load_ranges(img, "first") == [(102400, 4096), (20 * MiB, MiB), (30 * MiB, 8192)]
    assert Q.load_ranges(img, "off") == [(65536, 65536), (20 * MiB, MiB), (30 * MiB, 65536)]
    assert Q.load_ranges(img, "late") == [(65536, 65536), (20 * MiB, MiB)]
    assert Q.load_ranges(img, "empty") == []


def test_to_dirty_bitmap(tmp_path):
    img = tmp_path / "c.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "-g", "8192", "on")
    Q.bitmap(img, "--add", "--disable", "off")
    Q.qemu_io(img, "write 0 10000", "write 7M 1M")
    with Q.ImageFile(img) as f:
        h, infos = Q.read_infos(f)
        bms = [B.to_dirty_bitmap(i, B.load_bitmap(f, i, cluster_size=h.cluster_size,
                                                  disk_size=h.size),
                                 disk_size=h.size, read_only=True) for i in infos]
    on, off = bms
    assert (on.name, on.granularity, on.enabled, on.persistent, on.readonly,
            on.inconsistent) == ("on", 8192, True, True, True, False)
    assert on.extents(0, h.size, 100) == [16384, 1, 7 * MiB - 16384, 0, MiB, 1]
    assert on.count() == 16384 + MiB
    assert (off.enabled, off.count()) == (False, 0)
    DB.check(on, allow_ro=True)
    # and back: the same bits
    data = B.from_dirty_bitmap(on)
    with Q.ImageFile(img) as f:
        assert data.bits == B.load_bitmap(f, infos[0], cluster_size=h.cluster_size,
                                          disk_size=h.size)
    assert (data.name, data.granularity_bits, data.auto) == ("on", 13, True)
    # for another disk size (the run-by-run path): the same dirty ranges
    bigger = B.from_dirty_bitmap(on, disk_size=h.size + 8192)
    assert len(bigger.bits) == len(data.bits) + 1
    assert (B.dirty_ranges(bigger.bits, 13, h.size + 8192)
            == B.dirty_ranges(data.bits, 13, h.size) == [(0, 16384), (7 * MiB, MiB)])


def test_in_use_is_inconsistent_as_in_qemu(tmp_path):
    """set_in_use() flips the flag on disk: qemu-img info shows "in-use", the real qemu-nbd
    refuses the bitmap, and so do we with the same words; clearing it makes it usable."""
    img = tmp_path / "u.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "b1")
    Q.bitmap(img, "--add", "--disable", "b2")
    Q.qemu_io(img, "write 64k 64k")
    with Q.ImageFile(img, writable=True) as f:
        h, infos = Q.read_infos(f)
        B.set_in_use(f, infos, True)
        assert f.log[-1] == ("flush",)
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [["in-use", "auto"], ["in-use"]]
    qemu_says = Q.qemu_nbd_error(img, "b1")
    assert "qemu-nbd: Bitmap 'b1' is inconsistent and cannot be used\n" in qemu_says
    with Q.ImageFile(img) as f:
        h, infos = Q.read_infos(f)
        assert [i.inconsistent for i in infos] == [True, True]
        with pytest.raises(B.BitmapError) as e:
            B.load_bitmap(f, infos[0], cluster_size=h.cluster_size, disk_size=h.size)
        assert "qemu-nbd: %s\n" % e.value in qemu_says
        bm = B.to_dirty_bitmap(infos[0], None, disk_size=h.size, read_only=True)
    assert bm.inconsistent
    with pytest.raises(DB.Error) as e2:
        DB.check(bm, allow_ro=True)  # what resolve_export_bitmaps checks
    assert "qemu-nbd: %s\n" % e2.value in qemu_says
    # an inconsistent bitmap keeps its flag; a fresh read's can be cleared
    with Q.ImageFile(img, writable=True) as f:
        B.set_in_use(f, infos, False)
        assert [i.flags for i in Q.read_infos(f)[1]] == [3, 1]
        infos2 = Q.read_infos(f)[1]
        for i in infos2:
            i.inconsistent = False
        B.set_in_use(f, infos2, False)
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [["auto"], []]
    assert Q.load_ranges(img, "b1") == [(65536, 65536)] == Q.qemu_dirty_map(img, "b1")


def test_in_use_bitmap_set_by_a_writable_qemu(tmp_path):
    """While the real qemu-nbd has the image open read-write every bitmap is in use."""
    import subprocess
    import time
    img = tmp_path / "w.qcow2"
    sock = tmp_path / "s"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "b1")
    Q.bitmap(img, "--add", "--disable", "b2")
    p = subprocess.Popen(["qemu-nbd", "--persistent", "-f", "qcow2", "-k", str(sock), str(img)])
    try:
        for _ in range(500):  # serving: the image is open (the socket comes first)
            if Q.run("nbdinfo", "--size", "nbd+unix:///?socket=%s" % sock,
                     check=False).returncode == 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("qemu-nbd did not start serving")
        with Q.ImageFile(img) as f:
            infos = Q.read_infos(f)[1]
        assert [(i.in_use, i.inconsistent) for i in infos] == [(True, True), (True, True)]
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
    with Q.ImageFile(img) as f:
        assert [i.in_use for i in Q.read_infos(f)[1]] == [False, False]


def test_autoclear_cleared_means_no_bitmaps(tmp_path):
    img = tmp_path / "ac.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "b1")
    with Q.ImageFile(img, writable=True) as f:
        f.pwrite(88, struct.pack(">Q", 0))
        h = Q.Header(f)
    assert h.bitmaps_ext() is not None and not B.extension_consistent(h.autoclear)
    said = Q.qemu_nbd_error(img, "b1")
    assert "qemu-nbd: warning: %s\n%s" % (B.AUTOCLEAR_WARNING, B.AUTOCLEAR_HINT) in said
    assert "qemu-nbd: Bitmap 'b1' is not found" in said
