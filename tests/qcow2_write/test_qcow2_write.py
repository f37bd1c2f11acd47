"""The qcow2 write path, driven through the node API in-process, with the real qemu-img and
qemu-io as oracles: ``qemu-img check`` clean (no errors, no leaks) after a clean close,
``qemu-img compare`` equal to a model of what the guest wrote, block status after writes
equal to a fresh open's.  (The NBD-served case is in tests/qcow2/test_cli.py.)"""
from __future__ import annotations

import json
import random
import struct
import subprocess
import threading

import pytest

from blockexport.block.graph import BlockGraph
from blockexport.errors import Error
from qcow2.qcow2_util import qemu_io, require_tools, run

KiB = 1024
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tools()


def _open(img, read_only=False, **opts):
    g = BlockGraph()
    node = g.blockdev_add(dict({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                                "discard": "unmap",
                                "file": {"driver": "file", "filename": str(img)}}, **opts))
    return g, node


def _in_threads(fn, n):
    """Run ``fn(0)`` .. ``fn(n - 1)`` in ``n`` threads at once; the exceptions they raised."""
    errors = []

    def body(t):
        try:
            fn(t)
        except Exception as e:       # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return errors


def _check_clean(img):
    p = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No errors were found on the image." in p.stdout, p.stdout
    assert "leaked" not in p.stdout, p.stdout


def _compare(img, model: bytes, tmp_path):
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(raw)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _statuses(node):
    out, off, size = [], 0, node.length()
    while off < size:
        n, st = node.block_status(off, size - off)
        _, depth = node.allocation_depth(off, n)
        if out and out[-1][1:] == (st, depth):
            out[-1] = (out[-1][0] + n, st, depth)
        else:
            out.append((n, st, depth))
        off += n
    return out


def _read(node, off=0, n=None):
    n = node.length() - off if n is None else n
    buf = bytearray(n)
    node.read_into(off, buf)
    return bytes(buf)


def _header_u64(img, off):
    with open(img, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


CONFIGS = [
    # (cluster_size, refcount_bits, compat, extended_l2, backing, size)
    (512, 16, "1.1", False, False, 2 * MiB),
    (512, 1, "1.1", False, True, 2 * MiB),
    (512, 16, "0.10", False, True, 2 * MiB),
    (4096, 64, "1.1", False, True, 4 * MiB),
    (4096, 16, "0.10", False, False, 4 * MiB),
    (65536, 16, "1.1", False, False, 8 * MiB),
    (65536, 1, "1.1", True, True, 8 * MiB),
    (65536, 16, "0.10", False, True, 8 * MiB),
    (16384, 16, "1.1", True, False, 4 * MiB),
    (2 * MiB, 16, "1.1", False, True, 8 * MiB),
    (2 * MiB, 64, "1.1", True, False, 8 * MiB),
    (512, 64, "1.1", False, False, 3 * MiB + 4608),     # the refcount table must grow
    (65536, 16, "1.1", True, True, 3 * MiB + 4608),     # a partial last cluster
]


def _make(tmp_path, cs, rb, compat, ext, backing, size, seed=1):
    img = tmp_path / "t.qcow2"
    model = bytearray(size)
    opts = "cluster_size=%d,refcount_bits=%d,compat=%s" % (cs, rb, compat)
    if ext:
        opts += ",extended_l2=on"
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-f", "qcow2", base, str(size))
        rnd = random.Random(seed + 100)
        cmds = []
        for _ in range(12):
            off, n = rnd.randrange(0, size - 1), rnd.randrange(1, 200 * KiB)
            n = min(n, size - off)
            pat = rnd.randrange(1, 256)
            cmds.append("write -P %d %d %d" % (pat, off, n))
            model[off:off + n] = bytes([pat]) * n
        qemu_io(base, *cmds)
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
            img)
    else:
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, img, str(size))
    return img, model


def _random_ops(node, model, rnd, nops, v3, backing):
    size = len(model)
    cs = node.cluster_size
    for _ in range(nops):
        op = rnd.randrange(10)
        off = rnd.randrange(0, size)
        n = min(rnd.choice([1, 511, 512, 4096, cs, 3 * cs + 17, rnd.randrange(1, 300 * KiB)]),
                size - off)
        if rnd.random() < 0.3:
            off -= off % cs                 # cluster-aligned requests too
        if op < 5:
            data = bytes([rnd.randrange(256)]) * n
            node.write(off, data)
            model[off:off + n] = data
        elif op < 8:
            node.write_zeroes(off, n, may_unmap=rnd.random() < 0.5)
            model[off:off + n] = bytes(n)
        else:
            node.discard(off, n)
            a0 = -(-off // cs) * cs
            a1 = (off + n) // cs * cs
            if off + n == size:
                a1 = off + n
            if a0 < a1 and (v3 or not backing):
                model[a0:a1] = bytes(a1 - a0)     # v2 + backing: QEMU ignores the discard


@pytest.mark.parametrize("cs, rb, compat, ext, backing, size", CONFIGS,
                         ids=["cs%d-rb%d-%s%s%s" % (c[0], c[1], c[2], "-ext" if c[3] else "",
                                                    "-backing" if c[4] else "")
                              for c in CONFIGS])
def test_random_ops_match_model(tmp_path, cs, rb, compat, ext, backing, size):
    img, model = _make(tmp_path, cs, rb, compat, ext, backing, size)
    rnd = random.Random(cs + rb)
    g, node = _open(img)
    try:
        _random_ops(node, model, rnd, 60, compat == "1.1", backing)
        assert _read(node) == model
        node.flush()
        before = _statuses(node)
    finally:
        g.close()
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)
    g, node = _open(img, read_only=True)
    try:
        assert _read(node) == model
        assert _statuses(node) == before      # the cache the writes updated = the disk
    finally:
        g.close()


def test_fresh_clusters_and_reused_clusters(tmp_path):
    """A freed cluster reused for a partial write gets its COW region zeroed; clusters
    allocated past the end of the file read as zeroes without it."""
    img, model = _make(tmp_path, 65536, 16, "1.1", False, False, 4 * MiB)
    g, node = _open(img)
    try:
        node.write(0, b"\xaa" * (1 * MiB))
        model[0:MiB] = b"\xaa" * MiB
        node.discard(0, MiB)                    # frees 16 clusters (zero flag)
        model[0:MiB] = bytes(MiB)
        node.flush()
        node.write(2 * MiB + 100, b"\x55" * 1000)   # reuses a freed cluster
        model[2 * MiB + 100:2 * MiB + 1100] = b"\x55" * 1000
        assert _read(node) == model
    finally:
        g.close()
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)


def test_shared_clusters_are_copied(tmp_path):
    """After an internal snapshot every cluster has refcount 2 (no COPIED flag): writes
    go to new clusters, the snapshot keeps its data."""
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 2M")
    run("qemu-img", "snapshot", "-c", "snap", img)
    g, node = _open(img)
    try:
        node.write(4096, b"\x22" * 70000)
        node.write_zeroes(MiB, 65536, may_unmap=True)
        node.discard(MiB + 65536, 65536)
    finally:
        g.close()
    _check_clean(img)
    model = bytearray(b"\x11" * (2 * MiB) + bytes(2 * MiB))
    model[4096:4096 + 70000] = b"\x22" * 70000
    model[MiB:MiB + 131072] = bytes(131072)
    _compare(img, bytes(model), tmp_path)
    snap = tmp_path / "snap.raw"
    run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=snap", img, snap)
    assert snap.read_bytes() == b"\x11" * (2 * MiB) + bytes(2 * MiB)


def test_compressed_cluster_overwrite(tmp_path):
    src = tmp_path / "src.raw"
    rnd = random.Random(3)
    model = bytearray(b"".join(bytes([rnd.randrange(4)]) * 512 for _ in range(4096)))
    src.write_bytes(model)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-f", "raw", src, img)
    g, node = _open(img)
    try:
        node.write(70000, b"\x77" * 100)
        model[70000:70100] = b"\x77" * 100
        node.write_zeroes(3 * 65536, 65536)
        model[3 * 65536:4 * 65536] = bytes(65536)
        node.discard(5 * 65536, 65536)
        model[5 * 65536:6 * 65536] = bytes(65536)
        assert _read(node) == model
    finally:
        g.close()
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)


@pytest.mark.parametrize("ext", [False, True])
def test_concurrent_writes(tmp_path, ext):
    """Threads writing at once: interleaved stripes of the same clusters (allocation must
    not race) and clusters of their own; then overwrites in place while others allocate."""
    cs = 16384 if ext else 4096
    img, model = _make(tmp_path, cs, 16, "1.1", ext, True, 4 * MiB)
    g, node = _open(img)
    nthreads = 6

    def worker(t):
        rnd = random.Random(t)
        for rep in range(2):
            for k in range(0, 2 * MiB, 3 * cs):
                off = k + t * 512
                node.write(off, bytes([t + 1 + rep]) * 512)
            mine = 2 * MiB + t * 256 * KiB
            for k in range(0, 256 * KiB, 5000):
                node.write(mine + k, bytes([rnd.randrange(1, 256)]) * 100)
            node.write(mine, bytes([t + 50]) * (256 * KiB))

    errors = _in_threads(worker, nthreads)
    try:
        assert not errors, errors
        for t in range(nthreads):
            for k in range(0, 2 * MiB, 3 * cs):
                model[k + t * 512:k + t * 512 + 512] = bytes([t + 2]) * 512
            mine = 2 * MiB + t * 256 * KiB
            model[mine:mine + 256 * KiB] = bytes([t + 50]) * (256 * KiB)
        assert _read(node) == model
    finally:
        g.close()
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)


def test_concurrent_discard_and_overwrite(tmp_path):
    """Discards freeing clusters while other threads overwrite in place and allocate: no
    write may land in a cluster reused for another guest offset."""
    img, model = _make(tmp_path, 4096, 16, "1.1", False, False, 2 * MiB)
    g, node = _open(img)
    node.write(0, b"\x01" * (2 * MiB))
    stop = threading.Event()
    errors = []

    def discarder():
        try:
            rnd = random.Random(9)
            while not stop.is_set():
                off = rnd.randrange(0, MiB // 4096) * 4096
                node.discard(off, min(4096 * rnd.randrange(1, 8), MiB - off))
        except Exception as e:       # noqa: BLE001
            errors.append(e)

    def writer(t):
        try:
            for rep in range(150):
                node.write(MiB + t * 64 * KiB + (rep % 16) * 4096, bytes([t + 2]) * 4096)
                node.write((rep * 37 % 256) * 4096, b"\x01" * 4096)
        except Exception as e:       # noqa: BLE001
            errors.append(e)

    d = threading.Thread(target=discarder)
    ws = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    d.start()
    for w in ws:
        w.start()
    for w in ws:
        w.join(60)
    stop.set()
    d.join(60)
    try:
        assert not errors, errors
        data = _read(node)
        for t in range(4):
            part = data[MiB + t * 64 * KiB:MiB + (t + 1) * 64 * KiB]
            assert part == bytes([t + 2]) * (64 * KiB)
        # the first MiB holds only 0x01 (written) or zeroes (discarded), per 4 KiB
        for k in range(0, MiB, 4096):
            assert data[k:k + 4096] in (b"\x01" * 4096, bytes(4096))
    finally:
        g.close()
    _check_clean(img)


def test_dirty_image_repaired_on_writable_open(tmp_path):
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M")
    p = subprocess.run(["qemu-io", "-c", "write -P 0x33 0 1M", "-c", "sigraise 9", str(img)],
                       capture_output=True)
    assert p.returncode != 0                          # killed: refcounts never written
    assert _header_u64(img, 72) & 1                   # dirty
    bad = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert bad.returncode != 0
    # a read-only open works and repairs nothing
    g, node = _open(img, read_only=True)
    try:
        assert _read(node, 0, MiB) == b"\x33" * MiB
    finally:
        g.close()
    assert _header_u64(img, 72) & 1
    g, node = _open(img)
    try:
        assert not node.header.dirty
        node.write(2 * MiB, b"\x44" * 4096)
    finally:
        g.close()
    assert not _header_u64(img, 72) & 1
    _check_clean(img)
    _compare(img, b"\x33" * MiB + bytes(MiB) + b"\x44" * 4096 + bytes(2 * MiB - 4096),
             tmp_path)


def test_corrupt_image_refused_writable(tmp_path):
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    for opts in ({}, {"auto-read-only": True}):
        with pytest.raises(Error) as e:
            _open(img, **opts)
        assert str(e.value) == "qcow2: Image is corrupt; cannot be opened read/write"
    p = subprocess.run(["qemu-io", "-c", "write 0 512", str(img)], capture_output=True,
                       text=True)
    assert p.returncode != 0
    assert "qcow2: Image is corrupt; cannot be opened read/write" in p.stderr
    g, node = _open(img, read_only=True)
    g.close()


def _add_unknown_extension(img, ext_type, data):
    buf = bytearray(open(img, "rb").read())
    hl = struct.unpack_from(">I", buf, 100)[0]
    off = hl
    while True:
        t, n = struct.unpack_from(">II", buf, off)
        if t == 0:
            break
        off += 8 + ((n + 7) & ~7)
    assert struct.unpack_from(">Q", buf, 8)[0] == 0     # no backing file name to move
    ext = struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    buf[off:off + len(ext) + 8] = ext + bytes(8)
    open(img, "wb").write(buf)


def test_header_rewrite_keeps_unknown_extensions(tmp_path):
    img = tmp_path / "u.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "4M")
    _add_unknown_extension(img, 0x12345678, b"hello, future!")
    g, node = _open(img)
    try:
        node.write(0, b"\x66" * 100000)
        node.rewrite_header(autoclear_features=0)
        assert (0x12345678, b"hello, future!") in node.header.extensions
    finally:
        g.close()
    head = open(img, "rb").read(4096)
    ext = struct.pack(">II", 0x12345678, 14) + b"hello, future!" + bytes(2)
    assert ext in head
    assert b"lazy refcounts" in head             # the feature-name table is still there
    _check_clean(img)
    _compare(img, b"\x66" * 100000 + bytes(4 * MiB - 100000), tmp_path)


def test_header_rewrite_keeps_backing_and_refuses_overflow(tmp_path):
    run("qemu-img", "create", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
    img = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", "-b", "b.qcow2",
        "-F", "qcow2", img)
    g, node = _open(img)
    try:
        before = dict(node.header.__dict__)
        node.rewrite_header(autoclear_features=0)
        assert node.header.backing_file == "b.qcow2"
        node.header.extensions.append((0x11112222, bytes(400)))
        with pytest.raises(Error, match="do not fit in the first cluster"):
            node.rewrite_header(autoclear_features=0)
        node.header.extensions.pop()
        assert node.header.backing_format == before["backing_format"]
    finally:
        g.close()
    info = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True)
    assert "backing file: b.qcow2" in info.stdout
    assert "backing file format: qcow2" in info.stdout
    _check_clean(img)


def test_close_hooks_run_before_final_flush(tmp_path):
    img = tmp_path / "h.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "1M")
    g, node = _open(img)
    seen = []
    node.close_hooks.append(lambda: seen.append(node.meta_lock._is_owned()))
    node.write(0, b"x" * 512)
    g.close()
    assert seen == [True]
    _check_clean(img)


MAP_CASES = [("1.1", True, ""), ("0.10", True, ""), ("1.1", False, ""),
             ("0.10", False, ""), ("1.1", True, ",extended_l2=on,cluster_size=65536"),
             ("1.1", False, ",cluster_size=4096")]


@pytest.mark.parametrize("compat, backing, extra", MAP_CASES)
def test_write_zeroes_and_discard_map_as_qemu(tmp_path, compat, backing, extra):
    """Zero writes (aligned, unaligned, with and without unmap) and discards give the same
    content and the same map (qemu-img map, offsets aside) as qemu-io doing them: v3 zero
    flag, v2 without backing file unallocated, v2 over a backing file zero data and
    ignored discards; unaligned zeroes that leave a zero (sub)cluster zero it whole."""
    opts = ["-o", "compat=" + compat + extra]
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    if backing:
        run("qemu-img", "create", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
        qemu_io(tmp_path / "b.qcow2", "write -P 0x11 0 640k")
        opts += ["-b", "b.qcow2", "-F", "qcow2"]
    for img in (ours, ref):
        run("qemu-img", "create", "-f", "qcow2", *opts, img, "1M")
    cmds = [("write", 0, 256 * KiB), ("discard", 0, 128 * KiB),
            ("discard", 192 * KiB, 100 * KiB), ("zero", 512 * KiB, 64 * KiB),
            ("zero_unmap", 64 * KiB, 64 * KiB), ("zero", 700 * KiB + 1000, 70000),
            ("write", 800 * KiB, 10 * KiB), ("zero", 800 * KiB + 1024, 2048),
            ("zero_unmap", 300 * KiB, 2 * 65536 + 100), ("zero", 1000 * KiB, 24 * KiB),
            ("write", 900 * KiB + 100, 5000), ("write", 600 * KiB + 3000, 70000)]
    g, node = _open(ours)
    try:
        for op, off, n in cmds:
            if op == "write":
                node.write(off, b"\x22" * n)
            elif op == "discard":
                node.discard(off, n)
            else:
                node.write_zeroes(off, n, may_unmap=op == "zero_unmap")
    finally:
        g.close()
    qemu_io(ref, *[{"write": "write -P 0x22 %d %d", "discard": "discard %d %d",
                    "zero": "write -z %d %d", "zero_unmap": "write -z -u %d %d"}[op]
                   % (off, n) for op, off, n in cmds])
    _check_clean(ours)
    assert subprocess.run(["qemu-img", "compare", str(ours), str(ref)]).returncode == 0

    def strip(img):
        m = subprocess.run(["qemu-img", "map", "--output=json", str(img)],
                           capture_output=True, text=True).stdout
        return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(m)]
    assert strip(ours) == strip(ref)


def test_refcount_table_growth_then_header_rewrite(tmp_path):
    """512-byte clusters, 64-bit refcounts: one table cluster describes 2 MiB; writing 3 MiB
    moves the table (header updated), a later header rewrite keeps the new table."""
    img = tmp_path / "g.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img,
        "4M")
    old_table = _header_u64(img, 48)
    g, node = _open(img)
    try:
        node.write(0, b"\x42" * (3 * MiB))
        node.flush()
        assert _header_u64(img, 48) != old_table
        node.rewrite_header(autoclear_features=0)
    finally:
        g.close()
    assert node.header.refcount_table_offset == _header_u64(img, 48)
    _check_clean(img)
    _compare(img, b"\x42" * (3 * MiB) + bytes(MiB), tmp_path)


def test_bitmaps_extension_kept_or_dropped(tmp_path):
    from blockexport.block.drivers.qcow2.header import AUTOCLEAR_BITMAPS
    img = tmp_path / "b.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "4M")
    run("qemu-img", "bitmap", "--add", img, "bm0")
    g, node = _open(img)
    try:
        ext = node.header.bitmaps
        assert ext is not None
        node.write(0, b"\x01" * 4096)
        node.rewrite_header(autoclear_features=node.header.autoclear_features)
    finally:
        g.close()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                          capture_output=True, text=True).stdout
    assert '"name": "bm0"' in info
    _check_clean(img)
    g, node = _open(img)
    try:
        # the node's bitmap goes first (else a clean close stores it again), then the header
        # drops the extension
        from blockexport.block.dirty_bitmap import bitmap_remove
        bitmap_remove(g, "q", "bm0")
        node.rewrite_header(bitmaps_ext=None,
                            autoclear_features=node.header.autoclear_features
                            & ~AUTOCLEAR_BITMAPS)
        assert node.header.bitmaps is None
    finally:
        g.close()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                          capture_output=True, text=True).stdout
    assert "bm0" not in info


def test_served_connections_write_at_once(tmp_path):
    """Four NBD connections (libnbd, one thread each) writing stripes of the same clusters
    and trimming through an in-process server; then qemu-img check and compare."""
    from helpers.inprocess import InProcessServer
    from qcow2.qcow2_util import nbd_module
    nbd = nbd_module()
    img, model = _make(tmp_path, 65536, 16, "1.1", False, True, 4 * MiB)
    g, node = _open(img)
    srv = InProcessServer(tmp_path / "s.sock", g, node="q")
    try:
        srv.add("e", writable=True)

        def client(t):
            h = nbd.NBD()
            h.connect_uri(srv.uri("e"))
            for k in range(0, 3 * MiB, 65536 + 512):
                h.pwrite(bytes([t + 1]) * 512, k + t * 512)
            h.trim(65536, 3 * MiB + t * 65536)
            h.flush()
            h.shutdown()

        errors = _in_threads(client, 4)
        assert not errors, errors
        srv.remove("e")
    finally:
        srv.stop()
        g.close()
    for t in range(4):
        for k in range(0, 3 * MiB, 65536 + 512):
            model[k + t * 512:k + t * 512 + 512] = bytes([t + 1]) * 512
    _check_clean(img)
    model[3 * MiB:3 * MiB + 4 * 65536] = bytes(4 * 65536)    # trimmed: v3 reads zeroes
    _compare(img, bytes(model), tmp_path)


def test_corrupt_refusal_over_qmp_as_qsd(tmp_path):
    """blockdev-add of a corrupt image, writable and with auto-read-only: the same replies
    as qemu-storage-daemon's; read-only works in both."""
    from qcow2.test_daemon import both
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    cmds = [{"execute": "blockdev-add", "arguments": dict(
        {"driver": "qcow2", "node-name": name, "file": {"driver": "file",
                                                         "filename": str(img)}}, **extra)}
        for name, extra in (("a", {}), ("b", {"auto-read-only": True}),
                            ("c", {"read-only": True}))]
    theirs, ours = both(tmp_path, [], cmds)
    assert ours == theirs
    assert "Image is corrupt; cannot be opened read/write" in ours[0]
    assert ours[2].strip() == '{"return": {}}'


def test_dirty_image_with_snapshot_and_bitmap_repaired(tmp_path):
    """The repair on a writable open counts the snapshot table and L1, the bitmap
    directory and bitmap clusters: nothing of them is freed (check clean, snapshot intact)."""
    img = tmp_path / "ds.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M")
    qemu_io(img, "write -P 1 0 1M")
    run("qemu-img", "snapshot", "-c", "s1", img)
    run("qemu-img", "bitmap", "--add", img, "bm")
    subprocess.run(["qemu-io", "-c", "write -P 2 512k 1M", "-c", "sigraise 9", str(img)],
                   capture_output=True)
    assert _header_u64(img, 72) & 1
    g, node = _open(img)
    try:
        node.write(3 * MiB, b"\x03" * 4096)
    finally:
        g.close()
    _check_clean(img)
    model = bytearray(4 * MiB)
    model[0:MiB] = b"\x01" * MiB
    model[512 * KiB:1536 * KiB] = b"\x02" * MiB
    model[3 * MiB:3 * MiB + 4096] = b"\x03" * 4096
    _compare(img, bytes(model), tmp_path)
    snap = tmp_path / "s1.raw"
    run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=s1", img, snap)
    assert snap.read_bytes() == b"\x01" * MiB + bytes(3 * MiB)


@pytest.mark.parametrize("opts", ["cluster_size=4096", "cluster_size=16384,extended_l2=on",
                                  "cluster_size=4096,compat=0.10"])
def test_concurrent_stripes_with_zero_writes(tmp_path, opts):
    """Eight threads own interleaved 512-byte stripes of the same clusters and write data
    or zeroes (unaligned zero writes may zero a whole cluster that reads zeroes: never
    one holding another thread's data)."""
    img = tmp_path / "st.qcow2"
    size = 2 * MiB
    run("qemu-img", "create", "-f", "qcow2", "-o", opts, img, str(size))
    g, node = _open(img)
    model = bytearray(size)
    nt = 8

    def worker(t):
        rnd = random.Random(t)
        for _ in range(250):
            off = (rnd.randrange(0, size // 512 // nt) * nt + t) * 512
            if rnd.random() < 0.7:
                data = bytes([rnd.randrange(1, 256)]) * 512
                node.write(off, data)
                model[off:off + 512] = data
            else:
                node.write_zeroes(off, 512, may_unmap=rnd.random() < 0.5)
                model[off:off + 512] = bytes(512)

    errors = _in_threads(worker, nt)
    try:
        assert not errors, errors
        assert _read(node) == model
    finally:
        g.close()
    _check_clean(img)
    _compare(img, bytes(model), tmp_path)


def test_lazy_refcounts_option_needs_v3(tmp_path):
    img = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", img, "1M")
    for ro in (False, True):
        with pytest.raises(Error, match="^Lazy refcounts require a qcow2 image with at least "
                                        "qemu 1.1 compatibility level$"):
            _open(img, read_only=ro, **{"lazy-refcounts": True})
    img3 = tmp_path / "v3.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img3, "1M")
    g, node = _open(img3, **{"lazy-refcounts": True})
    try:
        node.write(0, b"\x01" * 512)
        assert not node.header.dirty            # refcounts stay exact: never dirty
    finally:
        g.close()
    assert not _header_u64(img3, 72) & 1
    _check_clean(img3)
