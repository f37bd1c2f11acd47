"""``blockexport-nbd -l`` (internal snapshots of qcow2) against ``qemu-nbd -l`` 7.2.

Images get snapshots with ``qemu-img snapshot -c`` and then more writes with qemu-io (so the
snapshots and the active image share clusters, refcount > 1, and diverge where copy-on-write
happened); the image is resized after a snapshot so a snapshot's size differs from the
image's.  For each way of naming a snapshot the export's size, bytes, ``base:allocation`` and
``qemu:allocation-depth`` maps equal qemu-nbd's; the lookup and damaged-table errors are
qemu-nbd's messages.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import servers
from qcow2.qcow2_util import connect, lazy_images, maps, qemu_io, read_all, run, served
from qcow2.test_interop import fill, random_raw

MiB = 1 << 20
SIZE = 4 * MiB


def snapshot(image: Path, name: str) -> None:
    run("qemu-img", "snapshot", "-c", name, image)


def _plain(d: Path, *opts: str, resize: bool = True) -> Path:
    img = d / "img.qcow2"
    argv = ["qemu-img", "create", "-f", "qcow2"]
    for o in opts:
        argv += ["-o", o]
    run(*argv, img, str(SIZE))
    fill(img, 31, SIZE)
    snapshot(img, "first")
    fill(img, 32, SIZE)
    qemu_io(img, "write -P 0xee 0 100000")
    snapshot(img, "second")
    size = SIZE
    if resize:      # (qemu-img can't resize v2 images with snapshots)
        size += 3 * MiB
        run("qemu-img", "resize", img, str(size))     # past "second"'s L2 tables
    fill(img, 33, size)
    # an id that is also another snapshot's name: "-l 1" finds the id
    snapshot(img, "1")
    qemu_io(img, "write -P 0x11 3000000 70000", "write -z 1000000 300000")
    return img


def _chain(d: Path) -> Path:
    """A snapshot of an overlay: what it leaves unallocated comes from the backing file."""
    base = d / "base.raw"
    random_raw(base, 34, SIZE)
    img = d / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
        "-F", "raw", img, str(SIZE))
    fill(img, 35, SIZE)
    snapshot(img, "first")
    fill(img, 36, SIZE)
    return img


def _shrunk(d: Path) -> Path:
    img = d / "img.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", img, str(SIZE))
    fill(img, 37, SIZE)
    snapshot(img, "first")
    run("qemu-img", "resize", "--shrink", img, str(SIZE // 2))
    fill(img, 38, SIZE // 2)
    return img


IMAGES = {
    "v3": lambda d: _plain(d),
    "v2-4k": lambda d: _plain(d, "compat=0.10,cluster_size=4096", resize=False),
    "refcount-4": lambda d: _plain(d, "refcount_bits=4,cluster_size=16384"),
    "chain": _chain,
    "extl2-shrunk": _shrunk,
}

# (image, -l argument)
CASES = [
    ("v3", "first"), ("v3", "second"), ("v3", "1"), ("v3", "2"), ("v3", "3"),
    ("v3", "snapshot.id=2"), ("v3", "snapshot.name=1"), ("v3", "snapshot.id=1,snapshot.name=first"),
    ("v2-4k", "first"), ("v2-4k", "snapshot.name=second"),
    ("refcount-4", "second"),
    ("chain", "first"),
    ("extl2-shrunk", "first"),
]


@pytest.fixture(scope="module")
def images(tools, tmp_path_factory):
    return lazy_images(tmp_path_factory.mktemp("qcow2-snapshots"), IMAGES)


@pytest.mark.parametrize("name,arg", CASES, ids=["%s:%s" % c for c in CASES])
def test_load_snapshot_like_qemu_nbd(images, tmp_path, name, arg):
    img = images(name)
    with served("blockexport-nbd", img, tmp_path, ["-l", arg]) as ours, \
            served("qemu-nbd", img, tmp_path, ["-l", arg]) as theirs:
        h1, h2 = connect(ours.uri()), connect(theirs.uri())
        try:
            assert h1.is_read_only()
            assert h1.get_size() == h2.get_size()
            data = read_all(h1)
            expected = read_all(h2)
            if data != expected:
                bad = next(i for i in range(len(data)) if data[i] != expected[i])
                pytest.fail("-l %s: bytes differ from qemu-nbd's at %d" % (arg, bad))
            assert maps(h1) == maps(h2)
        finally:
            h1.shutdown()
            h2.shutdown()


def test_snapshots_differ_from_the_active_image(images, tmp_path):
    """The test above is not vacuous: each snapshot serves other bytes than the active
    image, and the first snapshot still has what was overwritten later."""
    img = images("v3")
    got = {}
    for arg in (None, "first", "second"):
        args = ["-l", arg] if arg else []
        with served("blockexport-nbd", img, tmp_path, args) as s:
            h = connect(s.uri(), meta=())
            try:
                got[arg] = read_all(h)
            finally:
                h.shutdown()
    assert len({got[None], got["first"], got["second"]}) == 3
    assert got["second"][:100000] == b"\xee" * 100000
    assert got["first"][:100000] != b"\xee" * 100000
    # "second" was taken before the resize: past its old size it reads zeroes
    assert got["second"][SIZE:] == bytes(3 * MiB)


def _both(argv, cwd, kinds=("qemu-nbd", "blockexport-nbd")):
    out = []
    for kind in kinds:
        p = subprocess.run([servers.server_binary(kind), "-k", str(cwd / "never.sock"),
                            *argv], capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL, cwd=cwd)
        out.append((p.returncode, p.stderr.replace(kind + ":", "PROG:")))
    return out


@pytest.mark.parametrize("arg", ["snapX", "snapshot.id=1,snapshot.name=second",
                                 "snapshot.id=", "snapshot.name=", "0"])
def test_missing_snapshot_as_qemu_nbd(images, tmp_path, arg):
    theirs, ours = _both(["-l", arg, str(images("v3"))], tmp_path)
    assert ours == theirs == (1, "PROG: Failed to load snapshot: Can't find snapshot\n")


def _damage(src: Path, dst: Path, where: str, fmt: str, value: int) -> Path:
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        head = f.read(72)
        nb, table = struct.unpack_from(">IQ", head, 60)
        pos = {"nb": 60, "table": 64, "l1-offset": table, "l1-size": table + 8,
               "extra-size": table + 36}[where]
        f.seek(pos)
        f.write(struct.pack(fmt, value))
    return dst


# (field, struct format, value, -l argument or None)
DAMAGE = [
    ("nb", ">I", 65537, None),                 # Snapshot table too large
    ("table", ">Q", 0x10008, None),            # Snapshot table offset invalid
    ("extra-size", ">I", 1025, None),          # Too much extra metadata ... (+ hint)
    ("l1-offset", ">Q", 0x30008, "snapshot.id=1"),   # Snapshot L1 table offset invalid
    ("l1-offset", ">Q", 0x30008, "1"),         # ... then tried as a name: Can't find
    ("l1-size", ">I", 0x400001, "1"),          # Snapshot L1 table too large
]


@pytest.mark.parametrize("where,fmt,value,arg", DAMAGE,
                         ids=["%s-%s" % (d[0], d[3]) for d in DAMAGE])
def test_damaged_table_as_qemu_nbd(images, tmp_path, where, fmt, value, arg):
    # (the one-snapshot image for "-l 1": in "v3" another snapshot is named "1")
    src = {"table": "v2-4k", "l1-offset": "chain"}.get(where, "v3")
    img = _damage(images(src), tmp_path / "bad.qcow2", where, fmt, value)
    argv = (["-l", arg] if arg else ["-r"]) + [str(img)]
    theirs, ours = _both(argv, tmp_path)
    assert ours == theirs
    assert ours[0] == 1


@pytest.mark.parametrize("where,value,msg", [
    ("table", 1 << 40, "Failed to blk_new_open '{img}': Snapshot table lies past the end of "
                       "the image file"),
    ("l1-offset", 1 << 40, "Failed to load snapshot: Snapshot L1 table lies past the end of "
                           "the image file"),
])
def test_tables_past_end_of_file_refused(images, tmp_path, where, value, msg):
    """Where qemu-nbd reads zeroes past the end of the file (and serves them as the
    snapshot) we refuse the damaged image."""
    img = _damage(images("v3"), tmp_path / "bad.qcow2", where, ">Q", value)
    ours, = _both(["-l", "first", str(img)], tmp_path, kinds=("blockexport-nbd",))
    assert ours == (1, "PROG: %s\n" % msg.format(img=img))


def test_load_snapshot_of_raw_or_offset(images, tmp_path):
    """Only a qcow2 node loads snapshots: with -o the raw window on top refuses, as in
    qemu-nbd."""
    theirs, ours = _both(["-l", "first", "-o", "4096", str(images("v3"))], tmp_path)
    assert ours == theirs == (1, "PROG: Failed to load snapshot: Block format 'raw' used by "
                                 "device '' does not support temporarily loading internal "
                                 "snapshots\n")


@pytest.mark.parametrize("name", list(IMAGES))
def test_table_as_qemu_img_info_lists_it(images, name):
    """Every field qemu-img info shows of each snapshot, from our parser; and the node's
    lookup errors in QEMU's order."""
    import json
    from blockexport.block.graph import BlockGraph
    from blockexport.errors import Error
    img = images(name)
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    g = BlockGraph()
    try:
        node = g.blockdev_add({"driver": "qcow2", "node-name": "n", "read-only": True,
                               "file": {"driver": "file", "filename": str(img)}})
        ours = [{"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                 "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                 "vm-clock-sec": s.vm_clock_nsec // 10**9,
                 "vm-clock-nsec": s.vm_clock_nsec % 10**9,
                 **({"icount": s.icount} if s.icount is not None else {})}
                for s in node.snapshots]
        assert ours == info["snapshots"]
        assert all(s.disk_size in (SIZE, SIZE // 2, SIZE + 3 * MiB) for s in node.snapshots)
        with pytest.raises(Error, match="^snapshot_id and name are both NULL$"):
            node.load_snapshot()
        assert node.load_snapshot(id_or_name="first").name == "first"
    finally:
        g.close()
