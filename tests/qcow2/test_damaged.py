"""Damaged qcow2 images: a clear error at open (QEMU's words where QEMU has them), or EIO
for the damaged range only while the healthy rest is still served; never a traceback or a
hang.  Error texts were measured with qemu-nbd 7.2 on the same images."""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from qcow2.qcow2_util import connect, nbd_module, qemu_io, raw_bytes, run, served
from helpers import servers

MiB = 1 << 20


def _open_error(kind: str, image: Path, *args: str) -> tuple[int, str]:
    """Exit status and stderr of ``kind`` failing to open ``image`` (relative name, run in
    its directory so both programs print the same path)."""
    argv = [servers.server_binary(kind), "-f", "qcow2", *args, "-k",
            str(image.parent / ("%s.sock" % kind)), image.name]
    p = subprocess.run(argv, cwd=image.parent, capture_output=True, text=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr


def _patch(src: Path, dst: Path, *edits) -> Path:
    buf = bytearray(src.read_bytes())
    for fmt, off, value in edits:
        struct.pack_into(fmt, buf, off, value)
    dst.write_bytes(buf)
    return dst


@pytest.fixture(scope="module")
def base_image(tools, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qcow2-damaged")
    img = d / "good.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0x5a 0 64k")
    return img


def _header_u64(img: Path, off: int) -> int:
    return struct.unpack_from(">Q", img.read_bytes(), off)[0]


CASES = {
    # name: (edits, QEMU's message)
    "bad-magic": ([(">I", 0, 0x51464900)], "Image is not in qcow2 format"),
    "version-4": ([(">I", 4, 4)], "Unsupported qcow2 version 4"),
    "version-1": ([(">I", 4, 1)], "Unsupported qcow2 version 1"),
    "cluster-bits-22": ([(">I", 20, 22)], "Unsupported cluster size: 2^22"),
    "cluster-bits-8": ([(">I", 20, 8)], "Unsupported cluster size: 2^8"),
    "unknown-incompat": ([(">Q", 72, (1 << 5) | (1 << 40))],
                         "Unsupported qcow2 feature(s): Unknown incompatible feature: "
                         "10000000020"),
    "l1-unaligned": ([(">Q", 40, 0x30001)], "Active L1 table offset invalid"),
    "compression-bit-zlib": ([(">Q", 72, 1 << 3)],
                             "qcow2: Compression type incompatible feature bit must not be "
                             "set"),
    "refcount-order-7": ([(">I", 96, 7)],
                         "Reference count entry width too large; may not exceed 64 bits"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_open_errors_as_qemu_nbd(base_image, tmp_path, case):
    edits, message = CASES[case]
    img = _patch(base_image, tmp_path / ("%s.qcow2" % case), *edits)
    rc, err = _open_error("blockexport-nbd", img, "-r")
    assert rc == 1 and "Traceback" not in err
    assert err == "blockexport-nbd: Failed to blk_new_open '%s': %s\n" % (img.name, message)
    qrc, qerr = _open_error("qemu-nbd", img, "-r")
    assert qrc == 1
    assert qerr == err.replace("blockexport-nbd:", "qemu-nbd:", 1)


def test_unknown_incompatible_feature_named_in_table(base_image, tmp_path):
    """A name for the unknown bit in the image's feature name table is shown instead."""
    buf = bytearray(base_image.read_bytes())
    off = struct.unpack_from(">I", buf, 100)[0]
    t, n = struct.unpack_from(">II", buf, off)
    assert t == 0x6803F857
    entry = bytes([0, 9]) + b"shiny new thing".ljust(46, b"\0")
    buf[off + 8 + n:off + 8 + n + 48] = entry          # the table grows by one entry
    struct.pack_into(">I", buf, off + 4, n + 48)
    struct.pack_into(">Q", buf, 72, 1 << 9)
    img = tmp_path / "named.qcow2"
    img.write_bytes(buf)
    rc, err = _open_error("blockexport-nbd", img, "-r")
    assert rc == 1
    assert err.endswith(": Unsupported qcow2 feature(s): shiny new thing\n")
    _, qerr = _open_error("qemu-nbd", img, "-r")
    assert qerr == err.replace("blockexport-nbd:", "qemu-nbd:", 1)


def test_corrupt_bit_refuses_writable_open_only(base_image, tmp_path):
    img = _patch(base_image, tmp_path / "corrupt.qcow2", (">Q", 72, 1 << 1))
    rc, err = _open_error("blockexport-nbd", img)
    assert rc == 1 and err.endswith(": qcow2: Image is corrupt; cannot be opened read/write\n")
    _, qerr = _open_error("qemu-nbd", img)
    assert qerr == err.replace("blockexport-nbd:", "qemu-nbd:", 1)
    with served("blockexport-nbd", img, tmp_path) as s:
        h = connect(s.uri())
        assert h.pread(65536, 0) == b"\x5a" * 65536
        h.shutdown()


@pytest.mark.parametrize("what", ["l1", "refcount-table"])
def test_tables_past_the_end_of_the_file(base_image, tmp_path, what):
    off = 40 if what == "l1" else 48
    img = _patch(base_image, tmp_path / ("%s-eof.qcow2" % what), (">Q", off, 1 << 30))
    rc, err = _open_error("blockexport-nbd", img, "-r")
    assert rc == 1 and "Traceback" not in err
    name = "Active L1 table" if what == "l1" else "Reference count table"
    assert err.endswith(": %s lies past the end of the image file\n" % name)


def test_backing_chain_errors_nest_like_qemu(tools, tmp_path):
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2",
        tmp_path / "m.qcow2", "1M")
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", "m.qcow2", "-F", "qcow2",
        tmp_path / "mm.qcow2", "1M")
    for name in ("m.qcow2", "mm.qcow2"):
        rc, err = _open_error("blockexport-nbd", tmp_path / name, "-r")
        _, qerr = _open_error("qemu-nbd", tmp_path / name, "-r")
        assert rc == 1
        assert qerr == err.replace("blockexport-nbd:", "qemu-nbd:", 1)
    assert err.count("Could not open backing file: ") == 2


def test_backing_cycle_is_an_error(tools, tmp_path):
    """qemu-nbd 7.2 recurses without end (and eats memory) on such a chain; we refuse."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    run("qemu-img", "create", "-f", "qcow2", a, "1M")
    run("qemu-img", "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    rc, err = _open_error("blockexport-nbd", b, "-r")
    assert rc == 1
    assert err == ("blockexport-nbd: Failed to blk_new_open 'b.qcow2': Could not open backing "
                   "file: Backing file 'b.qcow2' of 'a.qcow2' creates a loop in the backing "
                   "chain\n")
    # a self-reference too
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", a)
    rc, err = _open_error("blockexport-nbd", a, "-r")
    assert rc == 1 and "creates a loop" in err


def test_damaged_tables_fail_only_their_range(tools, tmp_path):
    """1 KiB clusters: one L2 table covers 128 KiB, so single tables can be damaged.  Reads
    and block status of a damaged range fail with EIO; everything else is still served."""
    nbd = nbd_module()
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=1024", img, "4M")
    qemu_io(img, "write -P 0x33 0 4M")
    good = raw_bytes(img, tmp_path)
    buf = bytearray(img.read_bytes())
    l1_off = struct.unpack_from(">Q", buf, 40)[0]
    flen = len(buf)
    cs = 1024
    span = 128 * 1024                                         # one L2 table's range

    def l1(i):
        return struct.unpack_from(">Q", buf, l1_off + 8 * i)[0]

    def set_l1(i, v):
        struct.pack_into(">Q", buf, l1_off + 8 * i, v)

    def set_l2(i, j, v):
        struct.pack_into(">Q", buf, (l1(i) & 0x00FFFFFFFFFFFE00) + 8 * j, v)

    set_l1(5, (1 << 63) | (flen + (1 << 20)))                 # L2 table past the end
    set_l1(7, l1(7) + 512)                                    # L2 table unaligned
    set_l2(9, 3, (1 << 63) | (flen + (1 << 20)))              # data cluster past the end
    set_l2(11, 0, (1 << 63) | 0x10200)                        # data cluster unaligned
    set_l2(13, 1, (1 << 63) | 1 | (3 << 32))                  # v3 zero flag: reads zeroes
    img.write_bytes(buf)
    bad = [(5 * span, span), (7 * span, span), (9 * span + 3 * cs, cs), (11 * span, cs)]
    with served("blockexport-nbd", img, tmp_path) as s:
        h = connect(s.uri(), meta=("base:allocation",))
        for off, n in bad:
            with pytest.raises(nbd.Error) as ei:
                h.pread(n, off)
            assert ei.value.errnum == 5, (off, ei.value)      # EIO
            with pytest.raises(nbd.Error):
                h.block_status(n, off, lambda *a: 0)
        # everything else, in pieces between the damaged ranges
        pos = 0
        for off, n in bad + [(len(good), 0)]:
            while pos < off:
                k = min(off - pos, 256 * 1024)
                want = good[pos:pos + k]
                if pos <= 13 * span + cs < pos + k:
                    want = bytearray(want)
                    z = 13 * span + cs - pos
                    want[z:z + cs] = bytes(cs)
                    want = bytes(want)
                assert h.pread(k, pos) == want, pos
                pos += k
            pos = off + n
        h.shutdown()
        assert s.alive()
    assert "qcow2: Image is corrupt: " in s.stderr_path.read_text()
    assert "Traceback" not in s.stderr_path.read_text()


def test_truncated_image(base_image, tmp_path):
    img = tmp_path / "short.qcow2"
    img.write_bytes(base_image.read_bytes()[:50])
    rc, err = _open_error("blockexport-nbd", img, "-r")
    assert rc == 1 and "Traceback" not in err and "qcow2" in err
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    rc, err = _open_error("blockexport-nbd", empty, "-r")
    assert rc == 1 and err.endswith(": Image is not in qcow2 format\n")
    _, qerr = _open_error("qemu-nbd", empty, "-r")
    assert qerr == err.replace("blockexport-nbd:", "qemu-nbd:", 1)
    assert os.path.getsize(empty) == 0
