"""What the qcow2 refcount tests share: images made by the real qemu-img, a file io object
(the shape RefcountManager takes), an io that "crashes", qemu-img check as the oracle and a
from-spec header/refcount decoder independent of the code under test."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import threading

from helpers.procs import oracle_missing

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"


def need_tools():
    for tool in (QEMU_IMG, QEMU_IO):
        if not os.path.exists(tool):
            oracle_missing("%s is not installed" % os.path.basename(tool))


class FileIO:
    """The image file, as the refcount code wants it."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.lock = threading.Lock()
        self.preads = 0
        self.pwrites = 0
        self.flushes = 0

    def pread(self, offset, length):
        self.preads += 1
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset, data):
        self.pwrites += 1
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError("short write")

    def flush(self):
        self.flushes += 1
        os.fdatasync(self.fd)

    def length(self):
        return os.fstat(self.fd).st_size

    def truncate(self, n):
        os.ftruncate(self.fd, n)

    def close(self):
        os.close(self.fd)


class Crash(Exception):
    pass


class CrashingIO(FileIO):
    """Writes the first ``budget`` pwrites, then every write and flush raises: what is in the
    file then is what a process killed at that moment leaves behind."""

    def __init__(self, path, budget):
        super().__init__(path)
        self.budget = budget
        self.crashed = False

    def pwrite(self, offset, data):
        if self.crashed or self.pwrites >= self.budget:
            self.crashed = True
            raise Crash("crash before write %d" % self.pwrites)
        super().pwrite(offset, data)

    def flush(self):
        if self.crashed:
            raise Crash("crashed")
        super().flush()


class PowerLossIO(FileIO):
    """A crash that is a power cut: the power goes before the ``budget``-th write or flush
    (counted together), and a random subset of the writes made since the last completed
    flush is lost (what the disk had not made durable)."""

    def __init__(self, path, budget, rng):
        super().__init__(path)
        self.budget = budget
        self.rng = rng
        self.crashed = False
        self.journal = []            # (offset, bytes before the write) since the last flush

    def _op(self):
        if self.crashed or self.pwrites + self.flushes >= self.budget:
            self.crashed = True
            raise Crash("power cut")

    def pwrite(self, offset, data):
        self._op()
        old = os.pread(self.fd, len(data), offset)
        self.journal.append((offset, old.ljust(len(data), b"\0")))
        super().pwrite(offset, data)

    def flush(self):
        self._op()
        super().flush()
        self.journal.clear()

    def lose_unflushed(self, how: str) -> int:
        """Undo unflushed writes: ``all`` of them, all but the newest (``keep_newest``: the
        disk reordered them), or a ``random`` half."""
        lost = 0
        for i, (offset, old) in reversed(list(enumerate(self.journal))):
            if how == "all" or (how == "keep_newest" and i < len(self.journal) - 1) or \
                    (how == "random" and self.rng.random() < 0.5):
                os.pwrite(self.fd, old, offset)
                lost += 1
        self.journal.clear()
        return lost


def create(path, size="64M", **opts) -> str:
    o = ",".join("%s=%s" % kv for kv in opts.items())
    cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"] + (["-o", o] if o else []) + [str(path),
                                                                               size]
    subprocess.run(cmd, check=True)
    return str(path)


def qemu_io(path, *cmds, abort=False, read_only=False):
    """qemu-io's commands on the image.  Note: a writable open of an image with the dirty
    bit set makes qemu repair it first (read_only=True leaves it alone)."""
    args = [QEMU_IO, "-f", "qcow2"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    if abort:
        args += ["-c", "abort"]
    p = subprocess.run(args + [str(path)], capture_output=True, text=True)
    if not abort:
        assert p.returncode == 0, p.stdout + p.stderr
        assert "error" not in p.stdout.lower() + p.stderr.lower(), p.stdout + p.stderr
    return p


def check(path) -> dict:
    """qemu-img check --output=json, with its exit code and its human report's lines."""
    p = subprocess.run([QEMU_IMG, "check", "--output=json", str(path)], capture_output=True,
                       text=True)
    out = json.loads(p.stdout)
    out["rc"] = p.returncode
    out["stderr"] = p.stderr
    h = subprocess.run([QEMU_IMG, "check", str(path)], capture_output=True, text=True)
    out["report"] = h.stdout + h.stderr
    return out


def no_corruption(res: dict) -> bool:
    return res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0 and \
        res["rc"] in (0, 3)


class Header:
    """The header fields the tests need, decoded from the spec's byte positions."""

    def __init__(self, path):
        with open(path, "rb") as f:
            h = f.read(112)
        self.version, = struct.unpack_from(">I", h, 4)
        self.cluster_bits, = struct.unpack_from(">I", h, 20)
        self.size, = struct.unpack_from(">Q", h, 24)
        self.l1_size, self.l1_offset = struct.unpack_from(">IQ", h, 36)
        self.rt_offset, self.rt_clusters = struct.unpack_from(">QI", h, 48)
        self.nb_snapshots, self.snapshots_offset = struct.unpack_from(">IQ", h, 60)
        self.incompatible, self.compatible = struct.unpack_from(">QQ", h, 72)
        self.refcount_order, = struct.unpack_from(">I", h, 96) if self.version >= 3 else (4,)
        self.header_length, = struct.unpack_from(">I", h, 100) if self.version >= 3 else (72,)
        self.cluster_size = 1 << self.cluster_bits
        self.extended_l2 = bool(self.incompatible & 16)

    def manager_kwargs(self, path):
        return dict(cluster_bits=self.cluster_bits, refcount_order=self.refcount_order,
                    table_offset=self.rt_offset, table_clusters=self.rt_clusters,
                    file_length=os.path.getsize(path))

    def check_kwargs(self):
        return dict(cluster_bits=self.cluster_bits, refcount_order=self.refcount_order,
                    refcount_table_offset=self.rt_offset,
                    refcount_table_clusters=self.rt_clusters, l1_offset=self.l1_offset,
                    l1_size=self.l1_size, extended_l2=self.extended_l2)


def spec_refcounts(path) -> dict:
    """cluster -> refcount (nonzero only), decoded straight from the spec: the refcount table
    at refcount_table_offset, blocks of cluster_size * 8 / refcount_bits entries; entries of
    a byte or more big-endian, narrower ones packed from the least significant bit."""
    h = Header(path)
    with open(path, "rb") as f:
        data = f.read()
    cs = h.cluster_size
    bits = 1 << h.refcount_order
    per_block = cs * 8 // bits
    table = struct.unpack_from(">%dQ" % (h.rt_clusters * cs // 8), data, h.rt_offset)
    out = {}
    for ti, e in enumerate(table):
        off = e & 0x00FFFFFFFFFFFE00
        if not off:
            continue
        block = data[off:off + cs].ljust(cs, b"\0")
        as_int = int.from_bytes(block, "big")
        for i in range(per_block):
            if bits >= 8:
                # entry i occupies bytes [i*bits/8, (i+1)*bits/8): big-endian
                v = (as_int >> (cs * 8 - (i + 1) * bits)) & ((1 << bits) - 1)
            else:
                byte = block[i * bits // 8]
                v = (byte >> (i * bits % 8)) & ((1 << bits) - 1)
            if v:
                out[ti * per_block + i] = v
    return out


def set_dirty_bit(path, on: bool):
    with open(path, "r+b") as f:
        f.seek(72)
        inc, = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", (inc | 1) if on else (inc & ~1)))
