"""Damaged bitmap directories and tables: a clear error (QEMU's words, checked against the
real qemu-img opening the same image), never a traceback."""
from __future__ import annotations

import os
import shutil
import struct

import pytest
import qcow2img as Q

from blockexport.block.drivers.qcow2 import bitmaps as B

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    Q.need_tools()
    img = tmp_path_factory.mktemp("base") / "base.qcow2"
    Q.create(img, 64 * MiB)
    Q.bitmap(img, "--add", "-g", "512", "b1")
    Q.bitmap(img, "--add", "b2")
    Q.bitmap(img, "--add", "--disable", "b3")
    Q.qemu_io(img, "write 0 1M", "write 5M 3000")
    with Q.ImageFile(img) as f:
        h = Q.Header(f)
        ext_at = h.header_length
        for t, d in h.exts:
            if t == B.EXT_MAGIC:
                break
            ext_at += 8 + ((len(d) + 7) & ~7)
        infos = Q.read_infos(f)[1]
    return img, ext_at, infos


class At:
    """Where things are in the base image: ``e`` the bitmaps extension (its header),
    ``d`` the directory (b1's entry), ``t`` b1's table, ``c`` b1's one data cluster."""

    def __init__(self, e, d, t, c):
        self.e, self.d, self.t, self.c = e, d, t, c


# name: (function(At) -> (offset, struct format, value),
#        "qemu" when our message must be the one qemu-img gives, else our own message)
DAMAGE = {
    "reserved flag": (lambda a: (a.d + 12, ">I", 2 | 8), "qemu"),
    "extra_data_compatible flag": (lambda a: (a.d + 12, ">I", 2 | 4), "qemu"),
    "unknown type": (lambda a: (a.d + 16, ">B", 2), "qemu"),
    "granularity_bits 8": (lambda a: (a.d + 17, ">B", 8), "qemu"),
    "granularity_bits 32": (lambda a: (a.d + 17, ">B", 32), "qemu"),
    "duplicate name": (lambda a: (a.d + 32 + 24, "2s", b"b1"), "qemu"),
    "extra data": (lambda a: (a.d + 20, ">I", 8), "qemu"),
    "name too long for the directory": (lambda a: (a.d + 18, ">H", 1030), "qemu"),
    "empty name": (lambda a: (a.d + 18, ">H", 0),
                   "Bitmap '' doesn't satisfy the constraints"),
    "directory unaligned": (lambda a: (a.e + 24, ">Q", a.d + 8), "qemu"),
    "directory offset 0": (lambda a: (a.e + 24, ">Q", 0),
                           "bitmaps_ext: invalid bitmap directory offset"),
    "directory past EOF": (lambda a: (a.e + 24, ">Q", 1 << 40),
                           "The bitmap directory lies past the end of the image file"),
    "directory size cuts an entry": (lambda a: (a.e + 16, ">Q", 95), "qemu"),
    "directory size cuts an entry head": (lambda a: (a.e + 16, ">Q", 84), "qemu"),
    "directory size too big": (lambda a: (a.e + 16, ">Q", 200), "qemu"),
    "directory size huge": (lambda a: (a.e + 16, ">Q", 1 << 30), "qemu"),
    "zero bitmaps": (lambda a: (a.e + 8, ">I", 0), "qemu"),
    "fewer bitmaps in header": (lambda a: (a.e + 8, ">I", 2), "qemu"),
    "more bitmaps in header": (lambda a: (a.e + 8, ">I", 4), "qemu"),
    "too many bitmaps": (lambda a: (a.e + 8, ">I", 70000), "qemu"),
    "extension reserved": (lambda a: (a.e + 12, ">I", 1), "qemu"),
    "extension length": (lambda a: (a.e + 4, ">I", 16), "qemu"),
    "table unaligned": (lambda a: (a.d, ">Q", a.t + 1), "qemu"),
    "table offset 0": (lambda a: (a.d, ">Q", 0), "qemu"),
    "table size 0": (lambda a: (a.d + 8, ">I", 0), "qemu"),
    "table size wrong": (lambda a: (a.d + 8, ">I", 5), "qemu"),
    "table past EOF": (lambda a: (a.d, ">Q", 1 << 40),
                       "The bitmap table of bitmap 'b1' lies past the end of the image file"),
    "table entry low reserved bit": (lambda a: (a.t, ">Q", a.c | 2),
                                     "qemu"),
    "table entry unaligned": (lambda a: (a.t, ">Q", a.c + 512), "qemu"),
    "table entry high reserved bit": (lambda a: (a.t, ">Q", a.c | 1 << 56),
                                      "qemu"),
    "table entry offset and all-ones bit": (
        lambda a: (a.t, ">Q", a.c | 1), "qemu"),
    "data cluster past EOF": (lambda a: (a.t, ">Q", 1 << 40),
                              "A data cluster of bitmap 'b1' lies past the end of the image "
                              "file"),
    "in use and reserved flag": (lambda a: (a.d + 12, ">I", 1 | 8), "qemu"),
}


def _load_all(img):
    with Q.ImageFile(img) as f:
        h, infos = Q.read_infos(f)
        for i in infos:
            B.load_bitmap(f, i, cluster_size=h.cluster_size, disk_size=h.size)


@pytest.mark.parametrize("what", list(DAMAGE))
def test_damaged(tmp_path, base, what):
    src, ext_at, infos = base
    img = tmp_path / "d.qcow2"
    shutil.copy(src, img)
    writes, expected = DAMAGE[what]
    with Q.ImageFile(img, writable=True) as f:
        os.ftruncate(f.fd, -(-f.size() // 65536) * 65536)  # whole clusters: zeroes after
        table = B.read_table(f, infos[0], cluster_size=65536)
        at = At(ext_at, infos[0].entry_offset, infos[0].table_offset, table[0])
        off, fmt, value = writes(at)
        f.pwrite(off, struct.pack(fmt, value))
    with pytest.raises(B.BitmapError) as e:
        _load_all(img)
    if expected == "qemu":
        assert str(e.value) == Q.open_error(img)
    else:
        assert str(e.value).startswith(expected)


def test_in_use_bitmap_with_wrong_table_size_is_not_an_error(tmp_path, base):
    """An in-use bitmap's table is never read, so its size is not checked (as in QEMU)."""
    src, ext_at, infos = base
    img = tmp_path / "d.qcow2"
    shutil.copy(src, img)
    with Q.ImageFile(img, writable=True) as f:
        f.pwrite(infos[0].entry_offset + 8, struct.pack(">II", 5, 3))
        h, got = Q.read_infos(f)
    assert got[0].inconsistent and Q.info_bitmaps(img)[0]["flags"] == ["in-use", "auto"]
    assert Q.load_ranges(img, "b2") == Q.qemu_dirty_map(img, "b2")


def test_nonzero_padding_and_tail_bits_are_ignored(tmp_path, base):
    """Like QEMU: padding bytes of an entry and the data's unused tail bits are not checked."""
    src, ext_at, infos = base
    img = tmp_path / "d.qcow2"
    Q.create(img, 64 * MiB - 512, 512)
    Q.bitmap(img, "--add", "-g", "512", "t")
    Q.qemu_io(img, "write 0 64k")
    with Q.ImageFile(img, writable=True) as f:
        h, [info] = Q.read_infos(f)
        f.pwrite(info.entry_offset + 26, b"\x01")  # padding after the 1-byte name
        table = B.read_table(f, info, cluster_size=512)
        assert table[-1] == 0
        data = f.pread(table[0], 512)
        last = Q.Allocator(f).allocate(1)
        f.pwrite(last, bytes(511) + b"\x80")  # only the last byte's unused top bit
        f.pwrite(info.table_offset + 8 * (len(table) - 1), struct.pack(">Q", last))
    assert data == b"\xff" * 16 + bytes(496)
    with Q.ImageFile(img) as f:
        bits = B.load_bitmap(f, info, cluster_size=512, disk_size=64 * MiB - 512)
    assert len(bits) == 16384 and bits[-1] == 0  # the tail bit is not loaded
    ours = Q.load_ranges(img, "t")
    assert ours == [(0, 65536)] == Q.qemu_dirty_map(img, "t")
