"""Test-only qcow2 plumbing around the bitmaps module: the image file as ``pread``/``pwrite``,
the header's extensions (read, and rewritten to point at a new bitmap directory), a tiny
refcount allocator for refcount_bits=16 images, and the real tools (qemu-img, qemu-io,
qemu-nbd through nbdinfo) as oracles.

Not a qcow2 driver: no L1/L2, no refcount block allocation (the tests' images are small enough
for the refcount blocks qemu-img created).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile

from helpers.procs import oracle_missing  # noqa: F401 (tests use Q.oracle_missing)

from blockexport.block.drivers.qcow2 import bitmaps as B

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")


def need_tools() -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            oracle_missing("%s is not installed" % tool)


def run(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if check and p.returncode:
        raise AssertionError("%s failed (%d): %s%s" % (args, p.returncode, p.stdout, p.stderr))
    return p


def create(path, size, cluster_size=65536, *opts) -> None:
    o = "cluster_size=%d" % cluster_size
    if opts:
        o += "," + ",".join(opts)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", o, path, str(size))


def bitmap(path, *args) -> None:
    run("qemu-img", "bitmap", *args[:-1], path, args[-1])


def qemu_io(path, *cmds) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, path)
    assert "error" not in p.stdout.lower() + p.stderr.lower(), p.stdout + p.stderr


def info(path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", path).stdout)


def info_bitmaps(path) -> list:
    return info(path)["format-specific"]["data"].get("bitmaps", [])


def check(path) -> dict:
    p = run("qemu-img", "check", "--output=json", path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def open_error(path) -> str:
    """What qemu-img says opening a damaged image (without the ``qemu-img: `` prefix)."""
    p = run("qemu-img", "info", path, check=False)
    assert p.returncode != 0, p.stdout
    line = p.stderr.strip().split("\n")[0]
    prefix = "qemu-img: Could not open '%s': " % path
    assert line.startswith(prefix), line
    return line[len(prefix):]


def qemu_dirty_map(path, name) -> list[tuple[int, int]]:
    """The dirty ranges the real ``qemu-nbd -r -f qcow2 -B NAME`` exports (merged)."""
    p = run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + name, "--",
            "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, path, "]")
    return merge([(e["offset"], e["length"]) for e in json.loads(p.stdout) if e["type"] & 1])


def qemu_nbd_error(path, name) -> str:
    """What the real ``qemu-nbd -r -f qcow2 -B NAME`` says refusing to export the image.

    Run directly, not under nbdinfo's socket activation: when the server fails, nbdinfo exits
    without closing its handle and libnbd leaves its /tmp/libnbdXXXXXX directory behind.
    """
    with tempfile.TemporaryDirectory(prefix="qemu-nbd-") as d:
        p = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name,
                              "-k", os.path.join(d, "sock"), str(path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise AssertionError("qemu-nbd exported %s with bitmap %r instead of refusing"
                                 % (path, name)) from None
    assert p.returncode != 0, err
    return err


def merge(ranges) -> list[tuple[int, int]]:
    out = []
    for off, length in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


class ImageFile:
    """The image file: ``pread``, ``pwrite``, ``flush`` (what the bitmaps module needs)."""

    def __init__(self, path, writable=False):
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.log: list = []

    def pread(self, offset, length):
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset, data):
        self.log.append(("write", offset, len(data)))
        assert os.pwrite(self.fd, data, offset) == len(data)

    def flush(self):
        self.log.append(("flush",))
        os.fsync(self.fd)

    def size(self):
        return os.fstat(self.fd).st_size

    def close(self):
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Header:
    """The fields of the header the tests need, and its extensions."""

    def __init__(self, f: ImageFile):
        h = f.pread(0, 4096)
        assert h[:4] == b"QFI\xfb"
        self.version = struct.unpack_from(">I", h, 4)[0]
        assert self.version == 3
        self.cluster_bits = struct.unpack_from(">I", h, 20)[0]
        self.cluster_size = 1 << self.cluster_bits
        self.size = struct.unpack_from(">Q", h, 24)[0]
        self.refcount_table_offset = struct.unpack_from(">Q", h, 48)[0]
        self.refcount_table_clusters = struct.unpack_from(">I", h, 56)[0]
        self.autoclear = struct.unpack_from(">Q", h, 88)[0]
        self.refcount_order = struct.unpack_from(">I", h, 96)[0]
        self.header_length = struct.unpack_from(">I", h, 100)[0]
        h = f.pread(0, self.cluster_size)
        self.raw = h
        self.exts = []  # (type, data)
        off = self.header_length
        while True:
            t, length = struct.unpack_from(">II", h, off)
            if t == 0:
                break
            self.exts.append((t, h[off + 8:off + 8 + length]))
            off += 8 + ((length + 7) & ~7)

    def bitmaps_ext(self) -> B.BitmapsExtension | None:
        for t, d in self.exts:
            if t == B.EXT_MAGIC:
                return B.BitmapsExtension.parse(d, self.cluster_size)
        return None


def read_infos(f: ImageFile, file_size=True):
    h = Header(f)
    ext = h.bitmaps_ext()
    if ext is None:
        return h, []
    infos = B.read_directory(f, ext_nb_bitmaps=ext.nb_bitmaps, ext_dir_size=ext.dir_size,
                             ext_dir_offset=ext.dir_offset, cluster_size=h.cluster_size,
                             disk_size=h.size, file_size=f.size() if file_size else None)
    return h, infos


def load_ranges(path, name) -> list[tuple[int, int]]:
    with ImageFile(path) as f:
        h, infos = read_infos(f)
        info = next(i for i in infos if i.name == name)
        bits = B.load_bitmap(f, info, cluster_size=h.cluster_size, disk_size=h.size)
        return B.dirty_ranges(bits, info.granularity_bits, h.size)


def write_bitmaps_ext(f: ImageFile, dir_offset, dir_size, nb) -> None:
    """Point the header at a new directory (or drop the extension for ``nb == 0``) and set
    (clear) autoclear bit 0: what the qcow2 driver does after store_bitmaps."""
    h = Header(f)
    exts = [(t, d) for t, d in h.exts if t != B.EXT_MAGIC]
    if nb:
        exts.append((B.EXT_MAGIC, B.BitmapsExtension(nb, dir_size, dir_offset).pack()))
    area = b""
    for t, d in exts:
        area += struct.pack(">II", t, len(d)) + d + bytes(((len(d) + 7) & ~7) - len(d))
    area += bytes(8)
    assert h.header_length + len(area) <= h.cluster_size
    autoclear = (h.autoclear | B.AUTOCLEAR_BITMAPS if nb
                 else h.autoclear & ~B.AUTOCLEAR_BITMAPS)
    f.pwrite(h.header_length, area)
    f.pwrite(88, struct.pack(">Q", autoclear))


class Allocator:
    """First-fit cluster allocation on a refcount_bits=16 image, refcounts raised before the
    clusters are returned; ``free`` drops them.  Only clusters that the existing refcount
    blocks cover."""

    def __init__(self, f: ImageFile):
        self.f = f
        h = Header(f)
        assert h.refcount_order == 4, "test allocator: refcount_bits=16 only"
        self.cs = h.cluster_size
        self.per_block = self.cs // 2
        n = h.refcount_table_clusters * self.cs // 8
        self.table = struct.unpack(">%dQ" % n, f.pread(h.refcount_table_offset, n * 8))
        self.log: list = []

    def _where(self, cluster: int) -> int | None:
        bi = cluster // self.per_block
        if bi >= len(self.table) or not self.table[bi] & ~0x1FF:
            return None
        return (self.table[bi] & ~0x1FF) + (cluster % self.per_block) * 2

    def refcount(self, cluster: int) -> int | None:
        at = self._where(cluster)
        return None if at is None else struct.unpack(">H", self.f.pread(at, 2))[0]

    def _set(self, cluster: int, value: int) -> None:
        self.f.pwrite(self._where(cluster), struct.pack(">H", value))

    def allocate(self, n: int) -> int:
        start, run, c = 0, 0, 1
        while True:
            rc = self.refcount(c)
            if rc is None:
                raise AssertionError("test allocator: no refcount block for cluster %d" % c)
            if rc == 0:
                if run == 0:
                    start = c
                run += 1
                if run == n:
                    break
            else:
                run = 0
            c += 1
        for i in range(start, start + n):
            self._set(i, 1)
        end = (start + n) * self.cs
        if self.f.size() < end:
            os.ftruncate(self.f.fd, end)
        self.log.append(("allocate", start * self.cs, n * self.cs))
        return start * self.cs

    def free(self, offset: int, length: int) -> None:
        assert offset % self.cs == 0 and length % self.cs == 0
        self.log.append(("free", offset, length))
        for c in range(offset // self.cs, (offset + length) // self.cs):
            rc = self.refcount(c)
            assert rc, "freeing cluster %d with refcount %r" % (c, rc)
            self._set(c, rc - 1)
