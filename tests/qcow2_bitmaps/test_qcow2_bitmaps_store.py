"""Storing qcow2 persistent dirty bitmaps: our store_bitmaps() writes a directory into an image
made by the real qemu-img; qemu-img check finds no corruption and no leak, qemu-img info lists
the bitmaps, and the real qemu-nbd -B exports exactly our patterns."""
from __future__ import annotations

import random

import pytest
import qcow2img as Q

from blockexport.block import dirty_bitmap as DB
from blockexport.block.drivers.qcow2 import bitmaps as B

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _tools():
    Q.need_tools()


def _store(img, bitmaps, **kw):
    """store_bitmaps on ``img`` with the test allocator and header update; returns the
    result and the shared log of writes, flushes, allocations and frees."""
    with Q.ImageFile(img, writable=True) as f:
        h, old = Q.read_infos(f)
        alloc = Q.Allocator(f)
        alloc.log = f.log
        items = bitmaps(f, h, old) if callable(bitmaps) else bitmaps

        def update_header(dir_offset, dir_size, nb):
            f.log.append(("header",))
            Q.write_bitmaps_ext(f, dir_offset, dir_size, nb)

        res = B.store_bitmaps(f, alloc, items, cluster_size=h.cluster_size, disk_size=h.size,
                              old_infos=old, update_header=update_header, **kw)
        return res, f.log, h


def _clean(img):
    c = Q.check(img)
    assert not c.get("corruptions") and not c.get("leaks") and not c.get("check-errors"), c


def _random_ranges(rnd, size, n, maxlen):
    out = []
    for _ in range(n):
        length = rnd.randrange(1, maxlen)
        out.append((rnd.randrange(0, size - length), length))
    return out


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_round_trip(tmp_path, cluster_size):
    img = tmp_path / "r.qcow2"
    ones_span = cluster_size * 8 * 512  # guest bytes one bitmap cluster covers at 512 B
    size = max(24 * MiB, 3 * ones_span) + 1536  # qemu-img rounds sizes up to 512
    Q.create(img, size, cluster_size)
    Q.bitmap(img, "--add", "-g", "4096", "old1")
    Q.bitmap(img, "--add", "--disable", "old2")
    Q.qemu_io(img, "write 1M 64k", "write 3M 5000")
    Q.bitmap(img, "--merge", "old1", "old2")
    _clean(img)
    rnd = random.Random(cluster_size)
    fine = [(ones_span, ones_span), (ones_span * 2 + 512 * 7, 512 * 3)]
    fine += _random_ranges(rnd, size, 20, 100000)
    coarse = _random_ranges(rnd, size, 30, 300000) + [(size - 1, 1)]
    want = {}

    def bitmaps(f, h, old):
        old1 = old[0]
        bits = B.load_bitmap(f, old1, cluster_size=h.cluster_size, disk_size=h.size)
        want["old1"] = B.dirty_ranges(bits, 12, size)
        want["fine"] = B.dirty_ranges(B.bits_from_ranges(fine, 9, size), 9, size)
        want["coarse"] = B.dirty_ranges(B.bits_from_ranges(coarse, 17, size), 17, size)
        want["empty"] = []
        return [
            B.BitmapData("fine", 9, True, B.bits_from_ranges(fine, 9, size)),
            B.BitmapData("old1", 12, False, bits),  # kept, now disabled
            B.BitmapData("coarse", 17, True, B.bits_from_ranges(coarse, 17, size)),
            B.BitmapData("empty", 16, False, b""),
        ]

    res, log, h = _store(img, bitmaps)
    assert res.nb_bitmaps == 4 and res == (res.dir_offset, res.dir_size, 4)
    _clean(img)
    assert Q.info_bitmaps(img) == [
        {"flags": ["auto"], "name": "fine", "granularity": 512},
        {"flags": [], "name": "old1", "granularity": 4096},
        {"flags": ["auto"], "name": "coarse", "granularity": 131072},
        {"flags": [], "name": "empty", "granularity": 65536}]
    assert want["old1"] == [(MiB, 65536), (3 * MiB, 8192)]
    for name, ranges in want.items():
        assert Q.load_ranges(img, name) == ranges == Q.qemu_dirty_map(img, name), name
    # the all-ones bitmap cluster took a table entry 1 and no data cluster
    with Q.ImageFile(img) as f:
        infos = Q.read_infos(f)[1]
        table = B.read_table(f, infos[0], cluster_size=cluster_size)
        assert infos == res.infos
    assert table[1] == B.TABLE_ALL_ONES and table[0] & B.TABLE_OFFSET_MASK
    assert B.read_table(Q.ImageFile(img), infos[3], cluster_size=cluster_size) == [0]


def test_crash_safe_order(tmp_path):
    """New clusters are allocated and written, then flushed, before the header points at
    them; the old ones are freed only after the header update is flushed."""
    img = tmp_path / "o.qcow2"
    Q.create(img, 16 * MiB)
    Q.bitmap(img, "--add", "a")
    Q.bitmap(img, "--add", "b")
    Q.qemu_io(img, "write 0 1M")
    res, log, h = _store(img, [B.BitmapData("a", 16, True, B.bits_from_ranges(
        [(5 * MiB, 1)], 16, 16 * MiB))])
    header = log.index(("header",))
    frees = [i for i, e in enumerate(log) if e[0] == "free"]
    allocs = [i for i, e in enumerate(log) if e[0] == "allocate"]
    assert len(allocs) == 3  # a data cluster, a table, a directory
    assert frees and allocs
    assert log[header - 1] == ("flush",) and max(allocs) < header
    assert ("flush",) in log[header:min(frees)]
    # 2 old data clusters ("a" and "b" were dirty), 2 tables, the directory
    assert len(frees) == 5
    freed = {log[i][1] for i in frees}
    written = {e[1] for e in log[:header] if e[0] == "write"}
    assert not freed & {log[i][1] for i in allocs}
    assert all(w >= h.cluster_size for w in written)  # nothing in the header cluster before
    _clean(img)
    assert Q.qemu_dirty_map(img, "a") == [(5 * MiB, 65536)]


def test_store_nothing_removes_the_extension(tmp_path):
    img = tmp_path / "n.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "a")
    Q.qemu_io(img, "write 0 64k")
    res, log, h = _store(img, [])
    assert tuple(res) == (0, 0, 0)
    _clean(img)
    assert Q.info_bitmaps(img) == []
    with Q.ImageFile(img) as f:
        h = Q.Header(f)
    assert h.bitmaps_ext() is None and not h.autoclear & B.AUTOCLEAR_BITMAPS


def test_inconsistent_bitmap_kept_as_it_is(tmp_path):
    """An in-use (inconsistent) bitmap is stored back as it was: same table, still in use."""
    img = tmp_path / "k.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "bad")
    Q.bitmap(img, "--add", "good")
    Q.qemu_io(img, "write 0 64k")
    with Q.ImageFile(img, writable=True) as f:
        bad = Q.read_infos(f)[1][0]
        B.set_in_use(f, [bad], True)

    def bitmaps(f, h, old):
        assert [i.inconsistent for i in old] == [True, False]
        return [old[0], B.BitmapData("good", 16, True, B.bits_from_ranges(
            [(MiB, 100)], 16, h.size)), B.BitmapData("new", 16, True, b"\x01")]

    res, log, h = _store(img, bitmaps)
    _clean(img)
    assert [(b["name"], b["flags"]) for b in Q.info_bitmaps(img)] == [
        ("bad", ["in-use", "auto"]), ("good", ["auto"]), ("new", ["auto"])]
    assert res.infos[0].table_offset == bad.table_offset
    assert "Bitmap 'bad' is inconsistent" in Q.qemu_nbd_error(img, "bad")
    assert Q.qemu_dirty_map(img, "good") == [(MiB, 65536)]
    assert Q.qemu_dirty_map(img, "new") == [(0, 65536)]
    # and a writable open's set_in_use on the new entries, then a clean close's clear
    with Q.ImageFile(img, writable=True) as f:
        B.set_in_use(f, res.infos, True)
        assert [b["flags"] for b in Q.info_bitmaps(img)] == [["in-use", "auto"]] * 3
        B.set_in_use(f, res.infos, False)
    assert [b["flags"] for b in Q.info_bitmaps(img)] == [
        ["in-use", "auto"], ["auto"], ["auto"]]


def test_from_dirty_bitmap_stored_and_exported_by_qemu(tmp_path):
    img = tmp_path / "m.qcow2"
    size = 40 * MiB + 512
    Q.create(img, size)
    bm = DB.DirtyBitmap("mem", size, 8192, persistent=True)
    rnd = random.Random(5)
    for off, length in _random_ranges(rnd, size, 200, 50000):
        bm.mark(off, length)
    bm.mark(size - 1, 1)
    off_bm = DB.DirtyBitmap("off", size, 1 << 20, enabled=False)
    off_bm.mark(7 * MiB, 1)
    res, log, h = _store(img, [B.from_dirty_bitmap(bm), B.from_dirty_bitmap(off_bm)])
    _clean(img)
    ext = bm.extents(0, size, 1 << 30)
    expected, pos = [], 0
    for i in range(0, len(ext), 2):
        if ext[i + 1]:
            expected.append((pos, ext[i]))
        pos += ext[i]
    assert Q.qemu_dirty_map(img, "mem") == expected
    assert Q.qemu_dirty_map(img, "off") == [(7 * MiB, MiB)]
    assert Q.info_bitmaps(img) == [{"flags": ["auto"], "name": "mem", "granularity": 8192},
                                   {"flags": [], "name": "off", "granularity": MiB}]
    # and back into memory
    with Q.ImageFile(img) as f:
        info = res.infos[0]
        back = B.to_dirty_bitmap(info, B.load_bitmap(f, info, cluster_size=65536,
                                                     disk_size=size), disk_size=size)
    assert back.extents(0, size, 1 << 30) == ext and back.enabled and back.count() == bm.count()


def test_store_errors_leave_the_image_as_it_was(tmp_path):
    img = tmp_path / "e.qcow2"
    Q.create(img, 8 * MiB)
    Q.bitmap(img, "--add", "a")
    Q.qemu_io(img, "write 0 64k")
    before = Q.info_bitmaps(img)
    bits = B.bits_from_ranges([(0, MiB)], 16, 8 * MiB)
    for items, message in [
            ([B.BitmapData("x", 16, True, bits), B.BitmapData("x", 16, True, bits)],
             "Bitmap already exists: x"),
            ([B.BitmapData("y" * 1024, 16, True, bits)], "Bitmap name too long: " + "y" * 1024),
            ([B.BitmapData("z", 16, True, bits), B.BitmapData("g", 8, True, b"")],
             "Bitmap 'g' doesn't satisfy the constraints")]:
        with pytest.raises(B.BitmapError) as e:
            _store(img, items)
        assert str(e.value) == message
        _clean(img)  # what was allocated before the error is freed again
        assert Q.info_bitmaps(img) == before
    assert Q.qemu_dirty_map(img, "a") == [(0, 65536)]


def test_store_without_header_callback_frees_nothing(tmp_path):
    """Without update_header the old clusters stay allocated until the caller, its header
    written, calls free_bitmaps."""
    img = tmp_path / "f.qcow2"
    Q.create(img, 8 * MiB, 4096)
    Q.bitmap(img, "--add", "a")
    Q.bitmap(img, "--add", "-g", "512", "b")
    Q.qemu_io(img, "write 0 64k")
    with Q.ImageFile(img, writable=True) as f:
        h, old = Q.read_infos(f)
        alloc = Q.Allocator(f)
        res = B.store_bitmaps(f, alloc, [B.BitmapData("c", 12, True, b"\x02")],
                              cluster_size=4096, disk_size=h.size, old_infos=old)
        assert not [e for e in alloc.log if e[0] == "free"]
        Q.write_bitmaps_ext(f, *res)
        f.flush()
    # leaks expected here: the old bitmaps' clusters (2 data, 2 tables, 1 directory)
    p = Q.run("qemu-img", "check", "--output=json", img, check=False)
    assert p.returncode == 3 and '"leaks": 5' in p.stdout and "corruptions" not in p.stdout
    with Q.ImageFile(img, writable=True) as f:
        B.free_bitmaps(f, Q.Allocator(f), old, cluster_size=4096)
    _clean(img)
    assert Q.qemu_dirty_map(img, "c") == [(4096, 4096)]
    assert [b["name"] for b in Q.info_bitmaps(img)] == ["c"]
